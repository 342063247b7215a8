"""The experiment pipeline on top of the LoRAN adapter: Hydra configs -> data, base model, Trainer, evaluation,
records and tables. ``python train.py`` runs it (``run.run_cell``). Importing ``loran`` alone (the adapter) pulls
in none of this; the pipeline needs the ``train`` extra (Hydra, datasets, W&B, rouge-score, ...)."""
