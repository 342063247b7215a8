"""Optional libraries, in one place: bitsandbytes is optional, as in PEFT.

Without it (``pip install loran``), LoRAN covers nn.Linear and transformers' Conv1D, and importing loran neither loads
nor warns about bitsandbytes; with it (``pip install "loran[bnb]"``, or the pipeline's ``train`` extra) it also covers
bitsandbytes' Linear4bit (QLoRA's NF4 base) and Linear8bitLt. PEFT decides the same way (``is_bnb_available``).
"""
from __future__ import annotations

from peft.import_utils import is_bnb_available

bnb = None
if is_bnb_available():
    import bitsandbytes as bnb  # noqa: F811  (PEFT imports it too when it is installed)


def is_4bit(module) -> bool:
    """True for a bitsandbytes Linear4bit (False when bitsandbytes is not installed)."""
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_8bit(module) -> bool:
    """True for a bitsandbytes Linear8bitLt (False when bitsandbytes is not installed)."""
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)
