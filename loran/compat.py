"""Optional libraries and the private APIs of bitsandbytes and PEFT that LoRAN uses, in one place.

bitsandbytes is optional, as in PEFT: without it (``pip install loran``), LoRAN covers nn.Linear and transformers'
Conv1D, and importing loran neither loads nor warns about bitsandbytes; with it (``pip install "loran[bnb]"``, or the
pipeline's ``train`` extra) it also covers bitsandbytes' Linear4bit (QLoRA's NF4 base) and Linear8bitLt. PEFT decides
the same way (``is_bnb_available``).

The adapter's other modules reach the internals of bitsandbytes and PEFT (names starting with _, attributes the
library documents nowhere, names importable only from a non-public module) through the functions and names here.
Each says the version it was written for; ``TESTED`` holds the ranges, checked once per process: a version outside
them gets one warning (not an error) when LoRAN is first used, since the internals may have moved.
"""
from __future__ import annotations

import copy
import re
import warnings

import peft
import torch
from peft import LoraConfig, PeftConfig
from peft.import_utils import is_bnb_available  # peft 0.21: not exported from the package
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import LoraVariant  # noqa: F401  (peft 0.21: the variants' base class, not exported)
from peft.utils.integrations import dequantize_bnb_weight  # peft 0.21: not exported
from torch import Tensor, nn

bnb = None
if is_bnb_available():
    import bitsandbytes as bnb  # noqa: F811  (PEFT imports it too when it is installed)

# Versions whose internals this module was written against: name -> (lowest, first one not tested; None: open).
TESTED: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {
    "peft": ((0, 21, 0), None),
    "bitsandbytes": ((0, 50, 0), (0, 51, 0)),
}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: '0.50.2' -> (0, 50, 2), '0.21.0.dev0' -> (0, 21, 0)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def untested(installed: dict[str, str]) -> list[str]:
    """A message for each installed library whose version lies outside ``TESTED``."""
    messages = []
    for name, version in installed.items():
        low, high = TESTED[name]
        if not (low <= release(version) and (high is None or release(version) < high)):
            span = ".".join(map(str, low)) + (f" up to before {'.'.join(map(str, high))}" if high else " or later")
            messages.append(f"LoRAN uses private APIs of {name} written for {span}; {version} is installed. "
                            "Check loran/compat.py if its layers misbehave")
    return messages


_checked = False


def check_versions() -> None:
    """Warn (once per process) for each installed library outside ``TESTED``; run when LoRAN is first used
    (``loran.register_with_peft``), not on import."""
    global _checked
    if _checked:
        return
    _checked = True
    installed = {"peft": peft.__version__, **({"bitsandbytes": bnb.__version__} if bnb is not None else {})}
    for message in untested(installed):
        warnings.warn(message, stacklevel=3)


def is_4bit(module) -> bool:
    """True for a bitsandbytes Linear4bit (False when bitsandbytes is not installed)."""
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_8bit(module) -> bool:
    """True for a bitsandbytes Linear8bitLt (False when bitsandbytes is not installed)."""
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


# ---------------------------------------------------------------------------------------------------------------
# PEFT 0.21 internals.

NEW_ADAPTER_CHECK = "_check_new_adapter_config"
"""The LoraModel method PEFT calls before it injects an adapter (get_peft_model, add_adapter, load_adapter)."""


def register_custom_modules(config: LoraConfig, mapping: dict[type[nn.Module], object]) -> None:
    """Route base layer types to LoRA layer classes for `config` (``LoraConfig._register_custom_module``, which PEFT
    calls experimental)."""
    config._register_custom_module(mapping)


def targets_module(config: PeftConfig, key: str) -> bool:
    """Whether `config`'s target_modules select the module named `key` (``LoraModel._check_target_module_exists``)."""
    return bool(LoraModel._check_target_module_exists(config, key))


def hub_kwargs(peft_model, kwargs: dict) -> dict:
    """The keyword arguments PeftModel.load_adapter passes on to the hub download (``PeftModel._split_kwargs``)."""
    return peft_model._split_kwargs(dict(kwargs))[0]


def saved_peft_type(model_id: str, hub: dict) -> str:
    """The peft_type saved in a local folder's or hub repo's adapter_config.json (``PeftConfig._get_peft_type``)."""
    return PeftConfig._get_peft_type(model_id, **hub)


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes 0.50 internals (only called with bitsandbytes installed).


def prepares_4bit_as_dense(base: nn.Module, x: Tensor) -> bool:
    """Get a Linear4bit ready for input x as its forward does, and say whether that forward then computes
    x @ dequantize_4bit(W)^T + b in x's dtype from a weight in the standard layout.

    bitsandbytes 0.50's ``Linear4bit.forward``: ``fix_4bit_weight_quant_state_from_module`` restores a lost
    quant_state; on CPUs with AVX512-BF16 (``support_avx512bf16_for_cpu``) the first eval-mode forward without grad
    repacks the weight for a bf16 kernel (``quant_state.packing_format_for_cpu``); the first call sets the compute
    dtype from x (``compute_type_is_set``, ``set_compute_type``)."""
    bnb.nn.modules.fix_4bit_weight_quant_state_from_module(base)
    state = base.weight.quant_state
    repacks = (x.device.type == "cpu" and getattr(base, "support_avx512bf16_for_cpu", False)
               and not base.training and not x.requires_grad)
    if state is None or _packed_for_cpu(state) or repacks:
        return False
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return base.compute_dtype in (None, x.dtype)


def _packed_for_cpu(state) -> bool:
    """The weight is in the layout of bitsandbytes' bf16 CPU kernel (``QuantState.packing_format_for_cpu``)."""
    return getattr(state, "packing_format_for_cpu", False)


def unpacked_4bit(weight) -> tuple[Tensor, "bnb.functional.QuantState"]:
    """(data, quant_state) of a 4-bit weight in bitsandbytes' standard layout, which ``dequantize_4bit`` reads.

    A weight repacked for the CPU kernel (see ``prepares_4bit_as_dense``) reads wrong as stored. The nibbles are put
    back with bitsandbytes' own inverse (``functional._convert_weight_packed_for_cpu_inverse``), on a copy of the
    state; the absmax is kept as the packed kernel uses it (bfloat16, stored (d_in / blocksize, d_out)) instead of
    being re-quantised as that inverse does (``QuantState.original_nested``)."""
    state = weight.quant_state
    if not _packed_for_cpu(state):
        return weight.data, state
    absmax = state.absmax
    state = copy.copy(state)
    state.original_nested = False
    data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
    state.absmax = absmax.T.reshape(-1).float()
    return data, state


def dequantized_4bit(weight, dtype: torch.dtype | None = None) -> Tensor:
    """A 4-bit weight as a dense (d_out, d_in) tensor, read straight into `dtype` as bitsandbytes' own matmul does
    (default: the dtype it was quantised from); unpacked first if repacked for the CPU kernel."""
    data, state = unpacked_4bit(weight)
    if dtype is not None:
        state = copy.copy(state)
        state.dtype = dtype
    return bnb.functional.dequantize_4bit(data, state)


def fix_4bit_quant_state(layer: nn.Module) -> None:
    """Restore a 4-bit layer's lost quant_state (``nn.modules.fix_4bit_weight_quant_state_from_module``)."""
    bnb.nn.modules.fix_4bit_weight_quant_state_from_module(layer)


def dequantized_8bit(layer: nn.Module) -> Tensor:
    """An int8 layer's weight as a dense tensor (``peft.utils.integrations.dequantize_bnb_weight``)."""
    return dequantize_bnb_weight(layer.weight, state=layer.state)
