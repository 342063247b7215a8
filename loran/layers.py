"""LoRAN as a LoRA variant of stock PEFT, on nn.Linear, transformers Conv1D, bnb Linear4bit and Linear8bitLt.

Why a variant and not a new PEFT tuner: PEFT's LoRA layers already handle quantised bases, several
adapters side by side, enabling/disabling, deleting, merging and saving. LoRAN differs from LoRA only in
how the update is formed from A and B, which is exactly what a ``LoraVariant`` overrides (forward, merge,
unmerge: ``LoranVariant``, loran/variants.py). ``LoraConfig._register_custom_module`` (through loran/compat.py) routes
each base layer type to a thin subclass of PEFT's own LoRA layer whose only change is to pick ``LoranVariant`` for a
LoranConfig, and to fold the update into W0 where ``choose_path`` says so.

This module does not import loran.config (the config imports it, for ``CUSTOM_MODULES``): a layer recognises a
LoranConfig by its variant flag ``loran``, as PEFT recognises its own variants by theirs (``use_dora``, ...).

Per adapter, the layer holds ``loran_activation[name]`` (an ``Activation``), ``loran_memory_efficient[name]``
(which autograd path to use) and ``loran_update_dtype[name]`` (the precision policy, see loran/config.py).

An adapter whose f is the identity (``Activation.identity``: by name, or Sinter with amp = 0) computes its update as
LoRA does, (x A^T) B^T, so that it equals the QLoRA row (LoranConfig with the identity) bit for bit.
"""
from __future__ import annotations

import warnings

from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from loran.autograd import loran_linear
from loran.variants import LoranVariant, Path, choose_path


class LoranLayerMixin:
    """Picks LoranVariant for a LoranConfig (any other config gets PEFT's own choice); folds where choose_path says."""

    other_param_names = LoraLayer.other_param_names + ("loran_activation", "loran_memory_efficient",
                                                       "loran_update_dtype")

    def update_layer(self, *args, **kwargs):
        if not hasattr(self, "loran_activation"):
            self.loran_activation, self.loran_memory_efficient, self.loran_update_dtype = {}, {}, {}
        return super().update_layer(*args, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        if getattr(config, "loran", False):  # LoranConfig's LoRA-variant flag, read as PEFT reads e.g. use_dora
            return LoranVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The update this adapter adds to the base weight: s f(B A) for LoRAN (PEFT's LoRA layers return s B A), in the
        adapter's dtype and the base weight's layout. PEFT's weighted combinations and analysis tools read it here."""
        if isinstance(self.lora_variant.get(adapter), LoranVariant):
            return LoranVariant.delta(self, adapter).to(self.lora_B[adapter].weight.dtype)
        return super().get_delta_weight(adapter)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x @ (W0 + sum_a s_a f_a(B_a A_a))^T + b in one matmul on the FOLDED path (``choose_path``); else PEFT's own
        forward, which calls ``LoranVariant.forward`` for each LoRAN adapter."""
        plan = choose_path(self, x, extra_args=bool(args) or any(v is not None for v in kwargs.values()))
        if plan.path is not Path.FOLDED:
            return super().forward(x, *args, **kwargs)
        return loran_linear(x, plan.weight_fn, plan.bias, plan.adapters)


class LoranLinear(LoranLayerMixin, LoraLinear):
    """LoRAN on nn.Linear (any d_out x d_in)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        if config.fan_in_fan_out:  # as PEFT's own dispatch: nn.Linear stores (d_out, d_in)
            warnings.warn("fan_in_fan_out=True but the target is nn.Linear; setting fan_in_fan_out=False.")
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config=config, **kwargs)


class LoranConv1D(LoranLayerMixin, LoraLinear):
    """LoRAN on transformers' Conv1D (GPT-2 style), whose weight is stored (d_in, d_out)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        if not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=False but the target is Conv1D; setting fan_in_fan_out=True.")
            config.fan_in_fan_out = True
        kwargs["is_target_conv_1d_layer"] = True
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
