"""LoranConfig: PEFT's LoraConfig plus the activation applied to the update B A.

In memory a LoranConfig is a LoRA config (``peft_type == LORA``), so every PEFT code path for LoRA (state
dicts, adapters side by side, merging, quantised bases) applies unchanged. On disk it is written with
``"peft_type": "LORAN"``: stock PEFT cannot read that (``KeyError: 'LORAN'``) instead of silently loading
the adapter as plain LoRA, and this module registers the type so that ``PeftModel.from_pretrained``
loads it as LoRAN.

Precision policy (``update_dtype``), one for every row of a table: the dtype in which the update s f(B A) x is
computed before it is added to the base layer's output (in that output's dtype).
- ``"float32"`` (default): in float32 (float64 for float64 input: ``autograd.compute_dtype``) with autocast off,
  whatever the base computes in. Sinter's perturbation (5e-5 relative at the released amp) survives; bf16 (eps 8e-3)
  would round it away.
- ``"autocast"``: while autocast is on (``trainer=gpu``: bf16), in autocast's dtype: B A, f(B A) and the products
  each rounded to bf16, and an identity f exactly as PEFT computes LoRA under autocast. Off autocast, as "float32".
Without autocast and in float32 (the CPU runs) the two policies compute the same thing.

QLoRA is this config with ``activation="identity"`` (configs/adapter/qlora.yaml), not ``peft.LoraConfig``: so the
policy reaches the QLoRA row through the same code as every LoRAN row. Its update is computed as LoRA's
(x A^T) B^T, which without a cast is PEFT's LoRA itself (bit for bit, tests/test_precision.py), and every f declared
the identity at its parameters (``Activation.identity``: Sinter with amp = 0) takes that same path, so the identity
control equals QLoRA bit for bit under either policy. The price: a QLoRA adapter the pipeline saves is typed "LORAN",
so stock PEFT does not load it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, LoraConfig

from loran.activations import Activation, activation_params, validate_activation
from loran.compat import register_custom_modules
from loran.dispatch import CUSTOM_MODULES

PEFT_TYPE = "LORAN"
UPDATE_DTYPES = ("float32", "autocast")
# Called (no arguments) whenever a LoranConfig is built: loran.model adds register_with_peft, which wraps the PEFT
# methods LoRAN needs at the point LoRAN adapters can first exist instead of on import (it is idempotent).
ON_NEW_CONFIG: list[Callable[[], None]] = []


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What LoRA's size fields must be, defined once: LoranConfig checks itself against it, and the experiment pipeline
# (loran.pipeline.checks) checks adapter.peft against it before anything is loaded, whatever the adapter's class.
LORA_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "lora_alpha": (lambda v: _number(v) and math.isfinite(v) and v > 0, "a finite number > 0"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
}

# Inits that leave W0 alone and start from B A = 0 (so f(0) - f(0) = 0: the model starts at the base). The others
# (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) move W0 by -s B A, which only LoRA's linear update cancels; MiCA is a variant.
INITS_FOR_NON_LINEAR_F = (True, False, "gaussian", "orthogonal", "eva")


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
    update_dtype: Literal["float32", "autocast"] = field(
        default="float32",
        metadata={"help": "Precision policy of the update s f(B A) x: 'float32' (autocast off for it) or 'autocast' "
                  "(autocast's dtype while autocast is on, as PEFT's LoRA); see the module docstring."},
    )

    # Declared a LoRA variant (PEFT's own mechanism), so that a PEFT LoRA layer that has no LoRAN forward, e.g. one a
    # plain LoraConfig built, refuses a LoranConfig ("unsupported variant combination") instead of running plain LoRA.
    loran: bool = field(default=True, init=False, repr=False, metadata={"is_lora_variant": True})

    def __post_init__(self) -> None:
        self._check_lora_fields()
        # Fill in the activation's defaults so the saved config states every parameter explicitly.
        validate_activation(self.activation, dict(self.activation_kwargs or {}), self.start)
        self.activation_kwargs = {**activation_params(self.activation), **dict(self.activation_kwargs or {})}
        self._check_peft_options()  # before LoraConfig's own checks, which need e.g. scipy for LoftQ
        super().__post_init__()
        register_custom_modules(self, CUSTOM_MODULES)
        for hook in ON_NEW_CONFIG:
            hook()

    def _check_peft_options(self) -> None:
        """Refuse the PEFT options whose effect LoRAN would silently drop or change."""
        for f in dataclasses.fields(LoraConfig):  # every other LoRA variant (DoRA, aLoRA, ...), read from PEFT itself
            if f.metadata.get("is_lora_variant") and getattr(self, f.name, None):
                raise ValueError(f"{f.name} cannot be combined with LoRAN (it is another LoRA variant); leave it unset")
        init = self.init_lora_weights
        init_variants = tuple(LoraConfig.__dataclass_fields__["init_lora_weights"].metadata.get("lora_variants", ()))
        linear = self.build_activation().linear
        if init in init_variants or (not linear and init not in INITS_FOR_NON_LINEAR_F):
            allowed = "any but " + repr(list(init_variants)) if linear else repr(list(INITS_FOR_NON_LINEAR_F))
            raise ValueError(
                f"init_lora_weights={init!r} is not supported with activation={self.activation!r}: it assumes LoRA's "
                f"linear update (it moves W0 by -s B A, or is a variant of its own); allowed: {allowed}")
        if self.target_parameters:
            raise ValueError(f"target_parameters={self.target_parameters!r}: LoRAN adapts modules only (nn.Linear, "
                             "Conv1D, bitsandbytes Linear4bit/Linear8bitLt); PEFT would wrap the parameters in plain "
                             "LoRA. Use target_modules")

    def _check_lora_fields(self) -> None:
        for name, (valid, description) in LORA_FIELDS.items():
            if not valid(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be {description}")
        if not isinstance(self.memory_efficient, bool):
            raise ValueError(f"memory_efficient={self.memory_efficient!r} must be true or false")
        if not isinstance(self.update_dtype, str) or self.update_dtype not in UPDATE_DTYPES:
            raise ValueError(f"update_dtype={self.update_dtype!r} is unknown; allowed values: {list(UPDATE_DTYPES)}")
        if self.activation_kwargs is not None and not isinstance(self.activation_kwargs, Mapping):
            raise ValueError(f"activation_kwargs={self.activation_kwargs!r} must be a mapping of the activation's "
                             'parameters, such as {"amp": 5e-5, "omega": 1e4}')

    def build_activation(self) -> Activation:
        """The activation with its parameters bound."""
        return Activation(self.activation, dict(self.activation_kwargs), self.start)

    def to_dict(self) -> dict:
        """As LoraConfig.to_dict, but typed "LORAN" so stock PEFT refuses rather than loads it as LoRA."""
        out = super().to_dict()
        out.pop("loran", None)
        out["peft_type"] = PEFT_TYPE
        return out


# The adapter type in PEFT's table of config types, as PEFT registers its own methods: PeftModel.from_pretrained then
# reads an adapter_config.json typed "LORAN" as a LoranConfig (whose construction wraps the PEFT methods).
PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = LoranConfig
