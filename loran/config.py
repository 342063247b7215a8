"""LoranConfig: PEFT's LoraConfig plus the activation applied to the update B A.

In memory a LoranConfig is a LoRA config (``peft_type == LORA``), so every PEFT code path for LoRA (state
dicts, adapters side by side, merging, quantised bases) applies unchanged. On disk it is written with
``"peft_type": "LORAN"``: stock PEFT cannot read that (``KeyError: 'LORAN'``) instead of silently loading
the adapter as plain LoRA, and ``import loran`` registers the type so that ``PeftModel.from_pretrained``
loads it as LoRAN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig

from loran.activations import Activation, activation_params, validate_activation

PEFT_TYPE = "LORAN"


@dataclass
class LoranConfig(LoraConfig):
    """LoRA config with ``h = W0 x + s * dropout(x) @ f(B A)^T``; see ``loran.activations`` for f."""

    activation: str = field(
        default="sinter", metadata={"help": "Element-wise f applied to B A; a key of loran.activations.ACTIVATIONS."}
    )
    activation_kwargs: dict = field(
        default_factory=dict, metadata={"help": "Parameters of f, e.g. {'amp': 5e-5, 'omega': 1e4} for sinter."}
    )
    start: Literal["base", "official"] = field(
        default="base",
        metadata={"help": "'base': centred f(x) - f(0) so every activation starts at the base model and trains; "
                  "'official': f as the official code has it (Sigmoid shifts the model at step 0, ReLU never trains)."},
    )
    memory_efficient: bool = field(
        default=True,
        metadata={"help": "Recompute f(B A) in backward (keeps no d_out x d_in tensor); False = plain autograd."},
    )

    def __post_init__(self) -> None:
        self._check_lora_fields()
        super().__post_init__()
        # Fill in the activation's defaults so the saved config states every parameter explicitly.
        validate_activation(self.activation, dict(self.activation_kwargs or {}), self.start)
        self.activation_kwargs = {**activation_params(self.activation), **dict(self.activation_kwargs or {})}
        for unsupported in ("use_dora", "use_bdlora", "arrow_config", "alora_invocation_tokens", "velora_config",
                            "monteclora_config", "kasa_config"):
            if getattr(self, unsupported, None):
                raise ValueError(f"{unsupported} cannot be combined with LoRAN; leave it unset")
        from loran.layers import CUSTOM_MODULES  # late import: layers imports this module

        self._register_custom_module(CUSTOM_MODULES)

    def _check_lora_fields(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"lora_alpha={alpha!r} must be a finite number > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if not isinstance(self.memory_efficient, bool):
            raise ValueError(f"memory_efficient={self.memory_efficient!r} must be true or false")

    def build_activation(self) -> Activation:
        """The activation with its parameters bound."""
        return Activation(self.activation, dict(self.activation_kwargs), self.start)

    def to_dict(self) -> dict:
        """As LoraConfig.to_dict, but typed "LORAN" so stock PEFT refuses rather than loads it as LoRA."""
        out = super().to_dict()
        out["peft_type"] = PEFT_TYPE
        return out
