"""LoRAN as a LoRA variant of stock PEFT, on nn.Linear, transformers Conv1D, bnb Linear4bit and Linear8bitLt.

Why a variant and not a new PEFT tuner: PEFT's LoRA layers already handle quantised bases, several
adapters side by side, enabling/disabling, deleting, merging and saving. LoRAN differs from LoRA only in
how the update is formed from A and B, which is exactly what a ``LoraVariant`` overrides (forward, merge,
unmerge). ``LoraConfig._register_custom_module`` routes each base layer type to a thin subclass of PEFT's
own LoRA layer whose only change is to pick ``LoranVariant`` for a ``LoranConfig``.

Per adapter, the layer holds ``loran_activation[name]`` (an ``Activation``) and
``loran_memory_efficient[name]`` (which autograd path to use).
"""
from __future__ import annotations

import warnings

import bitsandbytes as bnb
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from loran.autograd import delta_weight, loran_update, reference_update
from loran.config import LoranConfig


class LoranVariant(LoraVariant):
    """Forward and merge of ``h = W0 x + s * dropout(x) @ f(B A)^T``."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config: LoranConfig, **kwargs) -> None:
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported by LoRAN; set lora_bias=False")
        module.loran_activation[adapter_name] = config.build_activation()
        module.loran_memory_efficient[adapter_name] = config.memory_efficient

    @staticmethod
    def delta(module: LoraLayer, adapter: str) -> Tensor:
        """s * f(B A) in float32, laid out like the base weight (transposed for Conv1D)."""
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        update = delta_weight(A, B, module.loran_activation[adapter]) * module.scaling[adapter]
        return transpose(update, getattr(module, "fan_in_fan_out", False))

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return (orig_weight.float() + LoranVariant.delta(module, active_adapter)).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> None:
        orig_weight.data = LoranVariant.merge_safe(module, active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return (orig_weight.float() - LoranVariant.delta(module, active_adapter)).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: Tensor, result: Tensor, **kwargs) -> Tensor:
        act, scaling = module.loran_activation[active_adapter], module.scaling[active_adapter]
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        x = module.lora_dropout[active_adapter](x)
        if act.linear:  # f(BA) = BA: compute it as LoRA does, (x A^T) B^T, which is exactly PEFT's LoRA
            update = lora_B(lora_A(x)) * scaling
        else:
            update_fn = loran_update if module.loran_memory_efficient[active_adapter] else reference_update
            update = update_fn(x, lora_A.weight, lora_B.weight, scaling, act)
        return result + update.to(result.dtype)


class LoranLayerMixin:
    """Chooses LoranVariant for a LoranConfig; any other config gets PEFT's own choice."""

    other_param_names = LoraLayer.other_param_names + ("loran_activation", "loran_memory_efficient")

    def update_layer(self, *args, **kwargs):
        if not hasattr(self, "loran_activation"):
            self.loran_activation, self.loran_memory_efficient = {}, {}
        return super().update_layer(*args, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        if isinstance(config, LoranConfig):
            return LoranVariant()
        return super().resolve_lora_variant(config=config, **kwargs)


class LoranLinear(LoranLayerMixin, LoraLinear):
    """LoRAN on nn.Linear (any d_out x d_in)."""


class LoranConv1D(LoranLayerMixin, LoraLinear):
    """LoRAN on transformers' Conv1D (GPT-2 style), whose weight is stored (d_in, d_out)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoranConfig, **kwargs) -> None:
        if not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=False but the target is Conv1D; setting fan_in_fan_out=True.")
            config.fan_in_fan_out = True
        kwargs["is_target_conv_1d_layer"] = True
        super().__init__(base_layer, adapter_name, config=config, **kwargs)


class LoranLinear4bit(LoranLayerMixin, LoraLinear4bit):
    """LoRAN on a bitsandbytes 4-bit (NF4/FP4) base."""


class LoranLinear8bitLt(LoranLayerMixin, LoraLinear8bitLt):
    """LoRAN on a bitsandbytes int8 base."""


# Order matters: the first isinstance match wins, and the bnb layers are nn.Linear subclasses.
CUSTOM_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    bnb.nn.Linear4bit: LoranLinear4bit,
    bnb.nn.Linear8bitLt: LoranLinear8bitLt,
    Conv1D: LoranConv1D,
    nn.Linear: LoranLinear,
}

LORAN_LAYERS = (LoranLinear, LoranConv1D, LoranLinear4bit, LoranLinear8bitLt)


