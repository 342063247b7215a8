"""LoRAN as a LoRA variant of stock PEFT, on nn.Linear, transformers Conv1D, bnb Linear4bit and Linear8bitLt.

Why a variant and not a new PEFT tuner: PEFT's LoRA layers already handle quantised bases, several
adapters side by side, enabling/disabling, deleting, merging and saving. LoRAN differs from LoRA only in
how the update is formed from A and B, which is exactly what a ``LoraVariant`` overrides (forward, merge,
unmerge). ``LoraConfig._register_custom_module`` routes each base layer type to a thin subclass of PEFT's
own LoRA layer whose only change is to pick ``LoranVariant`` for a ``LoranConfig``.

This module does not import loran.config (the config imports it, for ``CUSTOM_MODULES``): a layer recognises a
LoranConfig by its variant flag ``loran``, as PEFT recognises its own variants by theirs (``use_dora``, ...).

Per adapter, the layer holds ``loran_activation[name]`` (an ``Activation``), ``loran_memory_efficient[name]``
(which autograd path to use) and ``loran_update_dtype[name]`` (the precision policy, see loran/config.py).

An adapter whose f is the identity, by name or numerically (``acts_as_identity``: Sinter with amp = 0, say), computes
its update as LoRA does, (x A^T) B^T, so that it equals the QLoRA row (LoranConfig with the identity) bit for bit.
"""
from __future__ import annotations

import copy
import functools
import warnings

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from loran.activations import Activation
from loran.compat import bnb, is_4bit, is_8bit
from loran.autograd import (
    Adapter, DenseWeight, WeightFn, delta_weight, loran_linear, loran_update, lowrank_update, reference_update,
)

# The values on which an activation must leave z and f'(z) = 1 unchanged, bit for bit, to count as the identity:
# 0 and +-m 2^k for 8 mantissas m in [1, 2) and every k in [-100, 30], in float32 and float64 (|B A| of a trained
# adapter lies far inside; beyond 2^30, omega z overflows for Sinter's omega in float32).
PROBE = torch.cat([torch.zeros(1), *(sign * torch.linspace(1, 2, 9)[:-1] * 2.0**k
                                     for k in range(-100, 31) for sign in (1, -1))]).double()


def acts_as_identity(act: Activation) -> bool:
    """True when f is the identity: declared linear (f = identity), or f(z) == z and f'(z) == 1 bit for bit on
    ``PROBE`` in float32 and float64 (Sinter with amp = 0, for instance). Such an adapter is computed as LoRA."""
    return act.linear or _identity_on_probe(act.name, tuple(sorted(act.params.items())), act.start)


@functools.cache
def _identity_on_probe(name: str, params: tuple, start: str) -> bool:
    act = Activation(name, dict(params), start)
    for dtype in (torch.float32, torch.float64):
        z = PROBE.to(dtype)
        if not (torch.equal(act.f(z), z) and torch.equal(act.df(z), torch.ones_like(z))):
            return False
    return True


def update_dtype(policy: str, x: Tensor) -> torch.dtype | None:
    """The dtype an adapter's update is computed in under `policy` (LoranConfig.update_dtype); None: as autocast
    computes LoRA's matmuls (policy "autocast" while autocast is on)."""
    if policy == "autocast" and torch.is_autocast_enabled(x.device.type):
        return None
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class LoranVariant(LoraVariant):
    """Forward and merge of ``h = W0 x + s * dropout(x) @ f(B A)^T``."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported by LoRAN; set lora_bias=False")
        module.loran_activation[adapter_name] = config.build_activation()
        module.loran_memory_efficient[adapter_name] = config.memory_efficient
        module.loran_update_dtype[adapter_name] = config.update_dtype

    @staticmethod
    def delta(module: LoraLayer, adapter: str) -> Tensor:
        """s * f(B A) in float32, laid out like the base weight (transposed for Conv1D)."""
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        update = delta_weight(A, B, module.loran_activation[adapter]) * module.scaling[adapter]
        return transpose(update, getattr(module, "fan_in_fan_out", False))

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return (_wide(orig_weight) + LoranVariant.delta(module, active_adapter)).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> None:
        orig_weight.data = LoranVariant.merge_safe(module, active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return (_wide(orig_weight) - LoranVariant.delta(module, active_adapter)).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: Tensor, result: Tensor, **kwargs) -> Tensor:
        """result + s * dropout(x) @ f(B A)^T: the path when the update cannot be folded into W0 (see
        ``LoranLayerMixin.forward``), e.g. with dropout active or under autocast. The update is computed in the dtype
        of the adapter's ``update_dtype`` policy, cast to the result's dtype and added."""
        act, scaling = module.loran_activation[active_adapter], module.scaling[active_adapter]
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        x = module.lora_dropout[active_adapter](x)
        dtype = update_dtype(module.loran_update_dtype[active_adapter], x)
        if acts_as_identity(act):  # f(BA) = BA: computed as LoRA does, (x A^T) B^T
            A, B = lora_A.weight, lora_B.weight
            if dtype is None or (x.dtype == A.dtype == B.dtype == dtype and not torch.is_autocast_enabled(
                    x.device.type)):  # nothing to cast: exactly PEFT's LoRA
                return result + (lora_B(lora_A(x)) * scaling).to(result.dtype)
            return result + lowrank_update(x, A, B, scaling, dtype).to(result.dtype)
        # Policy "autocast" under autocast: B A, f(B A) and the products in autocast's dtype; else the default
        # (float32, float64 for float64 input).
        low = torch.get_autocast_dtype(x.device.type) if dtype is None else None
        if module.loran_memory_efficient[active_adapter]:
            return loran_update(x, lora_A.weight, lora_B.weight, scaling, act, result=result, dtype=low)
        update = reference_update(x, lora_A.weight, lora_B.weight, scaling, act, dtype=low)
        return result + update.to(result.dtype)


def _wide(t: Tensor) -> Tensor:
    """t in float32, or in its own dtype if that is wider (float64): merging must not round through float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _dropout_inactive(dropout: nn.Module) -> bool:
    """True when the adapter's dropout is the identity (p = 0, or eval mode)."""
    if isinstance(dropout, nn.Identity):
        return True
    return isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)


def _plain(module: nn.Module, cls: type) -> bool:
    """`module` runs `cls.forward` unchanged: no hooks, no patched forward (e.g. accelerate's offloading)."""
    return (type(module).forward is cls.forward and "forward" not in vars(module)
            and not module._forward_hooks and not module._forward_pre_hooks)


def _base_weight_fn(base: nn.Module, x: Tensor) -> tuple[WeightFn, Tensor | None] | None:
    """(W0 as (d_out, d_in) in x's dtype, bias) for a base layer whose output x @ W0^T + b can be folded with the
    update; None where folding would change the base layer's numerics (int8, bf16/fp16 compute, CPU bf16 repack)."""
    if is_4bit(base):
        if not _plain(base, bnb.nn.Linear4bit):
            return None
        bnb.nn.modules.fix_4bit_weight_quant_state_from_module(base)
        state = base.weight.quant_state
        # bnb repacks the weight for a bf16 CPU kernel on the first eval-mode forward without grad: leave that to it.
        repacks = (x.device.type == "cpu" and getattr(base, "support_avx512bf16_for_cpu", False)
                   and not base.training and not x.requires_grad)
        if state is None or getattr(state, "packing_format_for_cpu", False) or repacks:
            return None
        if not base.compute_type_is_set:  # as Linear4bit.forward does on its first call
            base.set_compute_type(x)
            base.compute_type_is_set = True
        if base.compute_dtype not in (None, x.dtype):
            return None
        weight = base.weight

        def dequantised(dtype: torch.dtype) -> DenseWeight:
            # Straight to the compute dtype, as bnb's own matmul does (not via the dtype the weight was stored in).
            state = copy.copy(weight.quant_state)
            state.dtype = dtype
            return DenseWeight(bnb.functional.dequantize_4bit(weight.data, state), True)

        return dequantised, None if base.bias is None else base.bias.to(x.dtype)
    if is_8bit(base):  # LLM.int8() also quantises x: not a dense matmul
        return None
    if base.weight.requires_grad and torch.is_grad_enabled():  # full fine-tuning: the base layer computes its grad
        return None
    if isinstance(base, Conv1D) and _plain(base, Conv1D):
        weight_t = base.weight  # stored (d_in, d_out)
        if weight_t.dtype != x.dtype:
            return None
        return (lambda dtype: DenseWeight(weight_t.T, False)), base.bias
    if isinstance(base, nn.Linear) and _plain(base, nn.Linear):
        weight = base.weight
        if weight.dtype != x.dtype:
            return None
        return (lambda dtype: DenseWeight(weight, False)), base.bias
    return None


class LoranLayerMixin:
    """Chooses LoranVariant for a LoranConfig; any other config gets PEFT's own choice."""

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
        """x @ (W0 + sum_a s_a f_a(B_a A_a))^T + b in one matmul where that is exact; else PEFT's own forward."""
        plan = self._loran_fold_plan(x, args, kwargs)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        weight_fn, bias, adapters = plan
        return loran_linear(x, weight_fn, bias, adapters)

    def _loran_fold_plan(self, x: Tensor, args: tuple, kwargs: dict):
        """(weight_fn, bias, adapters) when every active adapter is a memory-efficient LoRAN adapter whose input is
        the base layer's own (no active dropout), computing in float32/float64 without autocast; else None."""
        if args or any(v is not None for v in kwargs.values()) or self.disable_adapters or self.merged:
            return None
        if x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(x.device.type):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return None
        adapters = []
        for name in active:
            if not isinstance(self.lora_variant.get(name), LoranVariant) or not self.loran_memory_efficient[name]:
                return None
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            if not _dropout_inactive(self.lora_dropout[name]) or A.dtype != x.dtype or B.dtype != x.dtype:
                return None
            adapters.append(Adapter(A, B, self.scaling[name], self.loran_activation[name]))
        if all(acts_as_identity(a.act) for a in adapters):  # plain LoRA: (x A^T) B^T is cheaper than folding
            return None
        base = _base_weight_fn(self.get_base_layer(), x)
        if base is None:
            return None
        return base[0], base[1], adapters


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
