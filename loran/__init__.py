"""LoRAN: low-rank adaptation with a structured non-linear transformation (Sinter), on stock PEFT.

    from loran import LoranConfig, get_loran_model, load_loran
    model = get_loran_model(base, LoranConfig(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
"""
from loran.activations import ACTIVATIONS, Activation
from loran.config import LoranConfig
from loran.model import get_loran_model, load_loran, loran_layers, merge_to_full_precision, register_with_peft

__version__ = "0.1.0"

register_with_peft()

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "LoranConfig",
    "__version__",
    "get_loran_model",
    "load_loran",
    "loran_layers",
    "merge_to_full_precision",
]
