"""LoRAN on bitsandbytes bases (4-bit NF4/FP4 and int8): imported by loran.layers only when bitsandbytes is installed."""
from __future__ import annotations

import copy

import bitsandbytes as bnb
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt
from torch import Tensor

from loran.layers import LoranLayerMixin


def unpacked_4bit(weight: bnb.nn.Params4bit) -> tuple[Tensor, "bnb.functional.QuantState"]:
    """(data, quant_state) of a 4-bit weight in bitsandbytes' standard layout, which ``dequantize_4bit`` reads.

    On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place for its CPU kernel on the first eval-mode
    forward without grad (``packing_format_for_cpu``); dequantising that layout as is gives wrong weights. The
    nibbles are put back with bitsandbytes' own inverse, on a copy of the state; the absmax is kept as the packed
    kernel uses it (bfloat16, stored (d_in / blocksize, d_out)) instead of being re-quantised as that inverse does."""
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    absmax = state.absmax
    state = copy.copy(state)
    state.original_nested = False
    data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
    state.absmax = absmax.T.reshape(-1).float()
    return data, state


class LoranLinear4bit(LoranLayerMixin, LoraLinear4bit):
    """LoRAN on a bitsandbytes 4-bit (NF4/FP4) base."""

    def _unpack_base(self) -> None:
        """PEFT's merge dequantises the weight as stored: undo a CPU repack first (in place, as bitsandbytes itself
        does before saving or moving the weight; its next eval-mode forward packs it again)."""
        weight = self.get_base_layer().weight
        weight.data, weight.quant_state = unpacked_4bit(weight)

    def merge(self, *args, **kwargs) -> None:
        self._unpack_base()
        super().merge(*args, **kwargs)

    def unmerge(self) -> None:
        self._unpack_base()
        super().unmerge()


class LoranLinear8bitLt(LoranLayerMixin, LoraLinear8bitLt):
    """LoRAN on a bitsandbytes int8 base."""
