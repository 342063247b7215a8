"""Building, loading and merging LoRAN models (thin wrappers over PEFT's own functions)."""
from __future__ import annotations

import os

import bitsandbytes as bnb
import torch
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn

from loran.config import PEFT_TYPE, LoranConfig
from loran.layers import LORAN_LAYERS


def register_with_peft() -> None:
    """Let ``PeftModel.from_pretrained`` read adapter configs typed "LORAN" (done on ``import loran``)."""
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = LoranConfig


def get_loran_model(model: nn.Module, config: LoranConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a new LoRAN adapter (as ``peft.get_peft_model``)."""
    if not isinstance(config, LoranConfig):
        raise TypeError(f"config must be a LoranConfig, got {type(config).__name__}")
    return get_peft_model(model, config, adapter_name=adapter_name)


def load_loran(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
               **kwargs) -> PeftModel:
    """Load a saved LoRAN adapter onto `model`; refuses a folder that holds plain LoRA or another method."""
    config = LoranConfig.from_pretrained(str(path))
    if not isinstance(config, LoranConfig):
        raise ValueError(f"{path} holds a {config.peft_type} adapter, not LoRAN (adapter_config.json peft_type "
                         f'must be "{PEFT_TYPE}"); load it with peft.PeftModel.from_pretrained instead')
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config, **kwargs)


def loran_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every LoRAN-adapted layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LORAN_LAYERS)]


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as a float32 (d_out, d_in) tensor, dequantising bitsandbytes layers."""
    weight = layer.weight
    if isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
        state = getattr(weight, "quant_state", None) or getattr(layer, "state", None)
        return dequantize_bnb_weight(weight, state=state).float()
    return weight.detach().float()


@torch.no_grad()
def merge_to_full_precision(peft_model: PeftModel, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Merge the active adapters into a full-precision copy of each adapted layer and unload PEFT.

    On a 4-bit base, PEFT's ``merge_and_unload`` requantises W0 + s f(BA) to NF4, which moves the outputs
    (see the README for the measured gap). Here each adapted layer becomes an ``nn.Linear`` holding the
    dequantised W0 plus the update, in `dtype`, so the merged model computes what the unmerged one did.
    Layers that were not adapted keep their (possibly quantised) type.
    """
    from loran.layers import LoranVariant

    for name, layer in loran_layers(peft_model):
        base = layer.get_base_layer()
        if layer.merged:
            raise ValueError(f"{name} is already merged; merge_to_full_precision needs the unmerged model")
        weight = _dense_weight(base)
        if getattr(layer, "fan_in_fan_out", False):
            weight = weight.T
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                delta = LoranVariant.delta(layer, adapter)
                weight = weight + (delta.T if getattr(layer, "fan_in_fan_out", False) else delta)
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device=weight.device,
                          dtype=dtype)
        dense.weight.copy_(weight.to(dtype))
        if base.bias is not None:
            dense.bias.copy_(base.bias.to(dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(peft_model.get_submodule(parent_name) if parent_name else peft_model, child, dense)
    return peft_model.get_base_model()
