"""LoRAN: low-rank adaptation with a structured non-linear transformation."""
