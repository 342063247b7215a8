"""LoRAN: low-rank adaptation with a structured non-linear transformation (Sinter), on stock PEFT.

    from loran import LoranConfig, get_loran_model, load_loran
    model = get_loran_model(base, LoranConfig(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

Importing loran defines things and registers one name: the adapter type "LORAN" in PEFT's table of config types (as
PEFT registers its own methods), so ``PeftModel.from_pretrained`` can read a saved LoRAN adapter. It patches nothing:
PEFT's LoraModel and PeftModel methods are wrapped (``register_with_peft``) when the first LoranConfig is built, the
point from which LoRAN adapters can exist; for adapters that are not LoRAN the wrapped methods behave as PEFT's own.
"""
from loran.activations import ACTIVATIONS, Activation
from loran.config import LoranConfig
from loran.model import get_loran_model, load_loran, loran_layers, merge_to_full_precision, register_with_peft

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "LoranConfig",
    "__version__",
    "get_loran_model",
    "load_loran",
    "loran_layers",
    "merge_to_full_precision",
    "register_with_peft",
]
