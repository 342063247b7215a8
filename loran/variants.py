"""The LoRAN variant of PEFT's LoRA layers, and the one place that decides how a layer computes its output.

``choose_path`` picks a ``Path`` (its docstring holds the table): the layer's forward asks it once per call (FOLDED,
or PEFT's own forward), and ``LoranVariant.forward``, which PEFT's forward calls per adapter, asks it for that
adapter's update. Neither decides anything itself; each path is one small function.

Shapes: x (..., d_in), A (r, d_in), B (d_out, r), W0 (d_out, d_in) (Conv1D stores W0^T), output (..., d_out).
"""
from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import transpose
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from loran.autograd import (
    Adapter, DenseWeight, WeightFn, compute_dtype, delta_weight, loran_update, lowrank_update, reference_update,
    residual_update, widened,
)
from loran.compat import LoraVariant, bnb, dequantized_4bit, is_4bit, is_8bit, prepares_4bit_as_dense


class Path(Enum):
    """How a layer computes its output (the first three) or, on PEFT's forward, one adapter's update (the rest)."""

    BASE_ONLY = "base only"  # PEFT's forward: the base layer alone (adapters disabled, merged or none active)
    UNFOLDED = "unfolded"  # PEFT's forward: the base layer, then each adapter's update onto its result
    FOLDED = "folded"  # x @ (W0 + sum_a s_a f_a(B_a A_a))^T + b, one matmul (autograd.loran_linear)
    LORA = "lora"  # f the identity: PEFT's own s lora_B(lora_A(x)), bit for bit PEFT's LoRA
    LORA_CAST = "lora cast"  # f the identity: s (x A^T) B^T in float32/float64, autocast off (lowrank_update)
    RESIDUAL = "residual"  # centred f = c z + g(z): c s (x A^T) B^T + s x g(B A)^T (autograd.residual_update)
    DENSE = "dense"  # s x f(B A)^T, f(B A) recomputed in row chunks in backward (autograd.loran_update)
    REFERENCE = "reference"  # s x f(B A)^T through plain autograd (autograd.reference_update)


class Plan(NamedTuple):
    """A path and what it needs: the update's compute dtype (adapter paths; None: float32, float64 for float64
    input), and for FOLDED the base weight W0 as a function of the compute dtype, the bias and the adapters."""

    path: Path
    dtype: torch.dtype | None = None
    weight_fn: WeightFn | None = None
    bias: Tensor | None = None
    adapters: tuple[Adapter, ...] = ()


def choose_path(layer: LoraLayer, x: Tensor, adapter: str | None = None, extra_args: bool = False) -> Plan:
    """How `layer` computes its output on input x (`adapter` None; `extra_args`: the forward got more than x), or how
    it computes LoRAN `adapter`'s update on PEFT's forward (x: that adapter's input, after its dropout).
    The first row whose condition holds decides:

        for      condition                                                                  path
        layer    adapters disabled, layer merged, or no active adapter                      BASE_ONLY
        layer    extra forward arguments (adapter_names, ...); x not float32/float64;       UNFOLDED
                 autocast on
        layer    an active adapter that is not LoRAN, not memory-efficient, has active      UNFOLDED
                 dropout (the base's input would differ), or A or B not in x's dtype
        layer    every active f the identity (LoRA's (x A^T) B^T is cheaper than folding)   UNFOLDED
        layer    the base layer does not fold exactly (``base_folds``)                      UNFOLDED
        layer    otherwise                                                                  FOLDED
        adapter  f the identity, nothing to cast: policy "autocast" under autocast, or      LORA
                 x, A, B in the compute dtype with autocast off
        adapter  f the identity                                                             LORA_CAST
        adapter  memory_efficient, f centred (f(0) = 0: any f in the "base" start)           RESIDUAL
        adapter  memory_efficient                                                           DENSE
        adapter  otherwise                                                                  REFERENCE

    BASE_ONLY and UNFOLDED run PEFT's forward, which calls ``LoranVariant.forward`` (the adapter rows) for each LoRAN
    adapter. An adapter's update is computed in autocast's dtype under policy "autocast" while autocast is on, else
    in float32 (float64 for float64 x), and added in the result's dtype. RESIDUAL keeps that meaning for the
    LoRAN-minus-LoRA part s x g(B A)^T: Z = B A and g(Z) always in float32 (float64), the products with x in that
    dtype (``autograd.residual_update``); its c-part is LoRA's, as LORA (under autocast) or LORA_CAST computes it."""
    if adapter is not None:
        autocast = torch.is_autocast_enabled(x.device.type)
        own = layer.loran_update_dtype[adapter] == "autocast" and autocast  # autocast's dtype: its own rounding
        dtype = torch.get_autocast_dtype(x.device.type) if own else None
        if layer.loran_activation[adapter].identity:
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            uncast = own or (x.dtype == A.dtype == B.dtype == compute_dtype(x) and not autocast)
            return Plan(Path.LORA if uncast else Path.LORA_CAST, dtype)
        if not layer.loran_memory_efficient[adapter]:
            return Plan(Path.REFERENCE, dtype)
        return Plan(Path.DENSE if layer.loran_activation[adapter].split is None else Path.RESIDUAL, dtype)
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if layer.disable_adapters or layer.merged or not active:
        return Plan(Path.BASE_ONLY)
    if extra_args or x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(x.device.type):
        return Plan(Path.UNFOLDED)
    if not all(_adapter_folds(layer, name, x) for name in active):
        return Plan(Path.UNFOLDED)
    adapters = tuple(Adapter(layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name],
                             layer.loran_activation[name]) for name in active)
    if all(a.act.identity for a in adapters) or not base_folds(layer.get_base_layer(), x):
        return Plan(Path.UNFOLDED)
    return Plan(Path.FOLDED, None, *base_weight(layer.get_base_layer(), x), adapters)


def _adapter_folds(layer: LoraLayer, name: str, x: Tensor) -> bool:
    """A memory-efficient LoRAN adapter that sees the base layer's own input (no active dropout), A and B in x's
    dtype."""
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    return (isinstance(layer.lora_variant.get(name), LoranVariant) and layer.loran_memory_efficient[name]
            and _dropout_inactive(layer.lora_dropout[name]) and A.dtype == B.dtype == x.dtype)


def _dropout_inactive(dropout: nn.Module) -> bool:
    """True when the adapter's dropout is the identity (p = 0, or eval mode)."""
    if isinstance(dropout, nn.Identity):
        return True
    return isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)


def _plain(module: nn.Module, cls: type) -> bool:
    """`module` runs `cls.forward` unchanged: no hooks, no patched forward (e.g. accelerate's offloading)."""
    return (type(module).forward is cls.forward and "forward" not in vars(module)
            and not module._forward_hooks and not module._forward_pre_hooks)


def base_folds(base: nn.Module, x: Tensor) -> bool:
    """True when the base layer computes x W0^T + b from a dense, frozen W0 in x's dtype, so that folding the update
    into W0 leaves its numerics alone: a plain nn.Linear or Conv1D with its weight in x's dtype, or a plain 4-bit layer
    computing in x's dtype (``compat.prepares_4bit_as_dense``); not int8 (LLM.int8() also quantises x), not a W0
    being trained (the base layer computes its gradient)."""
    if is_4bit(base):
        return _plain(base, bnb.nn.Linear4bit) and prepares_4bit_as_dense(base, x)
    if is_8bit(base) or (base.weight.requires_grad and torch.is_grad_enabled()):
        return False
    cls = Conv1D if isinstance(base, Conv1D) else nn.Linear
    return isinstance(base, cls) and _plain(base, cls) and base.weight.dtype == x.dtype


def base_weight(base: nn.Module, x: Tensor) -> tuple[WeightFn, Tensor | None]:
    """(W0 as a (d_out, d_in) ``DenseWeight`` in a given compute dtype, bias) of a base layer that folds."""
    weight = base.weight
    if is_4bit(base):  # dequantised straight to the compute dtype, as bitsandbytes' own matmul does
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return (lambda dtype: DenseWeight(dequantized_4bit(weight, dtype), True)), bias
    if isinstance(base, Conv1D):  # stored (d_in, d_out)
        return (lambda dtype: DenseWeight(weight.T, False)), base.bias
    return (lambda dtype: DenseWeight(weight, False)), base.bias


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
        return transpose(update, module.fan_in_fan_out)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        """W0 + s f(B A), summed in float32 (float64 for a float64 W0), returned in W0's dtype."""
        return (widened(orig_weight) + LoranVariant.delta(module, active_adapter)).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> None:
        orig_weight.data = LoranVariant.merge_safe(module, active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        """W0 - s f(B A), as ``merge_safe``."""
        return (widened(orig_weight) - LoranVariant.delta(module, active_adapter)).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: Tensor, result: Tensor, **kwargs) -> Tensor:
        """result + s * dropout(x) @ f(B A)^T on PEFT's forward, by the adapter's path (``choose_path``)."""
        x = module.lora_dropout[active_adapter](x)
        plan = choose_path(module, x, active_adapter)
        return UPDATES[plan.path](module, active_adapter, x, result, plan.dtype)


def _lora(module: LoraLayer, name: str, x: Tensor, result: Tensor, dtype: torch.dtype | None) -> Tensor:
    """result + s lora_B(lora_A(x)), PEFT's own LoRA computation."""
    return result + (module.lora_B[name](module.lora_A[name](x)) * module.scaling[name]).to(result.dtype)


def _lora_cast(module: LoraLayer, name: str, x: Tensor, result: Tensor, dtype: torch.dtype | None) -> Tensor:
    """result + s (x A^T) B^T computed in float32 (float64 for float64 x) with autocast off."""
    A, B = module.lora_A[name].weight, module.lora_B[name].weight
    return result + lowrank_update(x, A, B, module.scaling[name], compute_dtype(x)).to(result.dtype)


def _residual(module: LoraLayer, name: str, x: Tensor, result: Tensor, dtype: torch.dtype | None) -> Tensor:
    """result + c s (x A^T) B^T + s x g(B A)^T for a centred f = c z + g(z): the c-part as LoRA's (PEFT's modules under
    the "autocast" policy, else ``lowrank_update`` in float32/float64), the g-part by ``residual_update``; both in
    `dtype` (None: float32, float64 for float64 x), summed, then added in the result's dtype."""
    A, B = module.lora_A[name].weight, module.lora_B[name].weight
    s, act = module.scaling[name], module.loran_activation[name]
    update = residual_update(x, A, B, s, act, dtype=dtype)
    c = act.split.slope
    if c and dtype is not None:
        update = module.lora_B[name](module.lora_A[name](x)) * (s * c) + update
    elif c:
        update = lowrank_update(x, A, B, s * c, compute_dtype(x)) + update
    return result + update.to(result.dtype)


def _dense(module: LoraLayer, name: str, x: Tensor, result: Tensor, dtype: torch.dtype | None) -> Tensor:
    """result + s x f(B A)^T in `dtype`, keeping no d_out x d_in tensor for backward."""
    A, B = module.lora_A[name].weight, module.lora_B[name].weight
    return loran_update(x, A, B, module.scaling[name], module.loran_activation[name], result=result, dtype=dtype)


def _reference(module: LoraLayer, name: str, x: Tensor, result: Tensor, dtype: torch.dtype | None) -> Tensor:
    """result + s x f(B A)^T in `dtype` through plain autograd, rounded to the result's dtype."""
    A, B = module.lora_A[name].weight, module.lora_B[name].weight
    update = reference_update(x, A, B, module.scaling[name], module.loran_activation[name], dtype=dtype)
    return result + update.to(result.dtype)


# The adapter paths of choose_path and the function that computes each.
UPDATES = {Path.LORA: _lora, Path.LORA_CAST: _lora_cast, Path.RESIDUAL: _residual, Path.DENSE: _dense,
           Path.REFERENCE: _reference}
