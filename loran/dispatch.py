"""Which LoRAN layer wraps which base layer type: the table a LoranConfig registers with PEFT
(``compat.register_custom_modules``), bitsandbytes' layers only when it is installed (loran/compat.py), and the
refusal that stands last in it, so that no other layer type silently gets PEFT's plain LoRA layer."""
from __future__ import annotations

from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from loran.compat import bnb
from loran.layers import LoranConv1D, LoranLinear

# Order matters: the first isinstance match wins, and the bnb layers are nn.Linear subclasses.
COVERED: dict[type[nn.Module], type[nn.Module]] = {Conv1D: LoranConv1D, nn.Linear: LoranLinear}
COVERED_NAMES = "torch.nn.Linear, transformers Conv1D"
if bnb is not None:
    from loran.layers_bnb import LoranLinear4bit, LoranLinear8bitLt

    COVERED = {bnb.nn.Linear4bit: LoranLinear4bit, bnb.nn.Linear8bitLt: LoranLinear8bitLt, **COVERED}
    COVERED_NAMES += ", bitsandbytes Linear4bit and Linear8bitLt"


def refuse_uncovered(target: nn.Module, adapter_name: str, config: LoraConfig, target_name: str = "", **kwargs):
    """Stands last in the LoranConfig's custom modules: every other layer type would get PEFT's plain LoRA layer."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    raise ValueError(uncovered_message(target_name, base))


def uncovered_message(name: str, module: nn.Module) -> str:
    kind = type(module)
    return (f"target module {name!r} is a {kind.__module__}.{kind.__qualname__}: LoRAN covers {COVERED_NAMES} only "
            "(PEFT would build a plain LoRA layer there). Remove it from target_modules, or adapt it with a "
            "separate peft.LoraConfig adapter")


CUSTOM_MODULES: dict[type[nn.Module], object] = {**COVERED, nn.Module: refuse_uncovered}

LORAN_LAYERS = tuple(COVERED.values())
