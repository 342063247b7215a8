"""LoRAN on bitsandbytes bases (4-bit NF4/FP4 and int8): imported by loran.dispatch only with bitsandbytes installed."""
from __future__ import annotations

from peft.tuners.lora import Linear4bit as LoraLinear4bit
from peft.tuners.lora import Linear8bitLt as LoraLinear8bitLt

from loran.compat import unpacked_4bit
from loran.layers import LoranLayerMixin


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
