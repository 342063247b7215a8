"""Import adapters saved by the official PEFT-LoRAN code (a PEFT 0.4.0 fork; the method is "MLORA" there).

Official format: adapter_config.json with "peft_type": "MLORA", "r": [r0, d] (extra entries mean extra
P_i / b_i layers), "mlora_af" ("Sin" = Sinter), "mlora_af_sin_A" (amp), "mlora_af_sin_omega", "mlora_alpha",
"mlora_dropout", "target_modules"; weights in adapter_model.bin (a torch pickle) with keys
``<module path>.mlora_A`` of shape (r0, d_in) and ``<module path>.mlora_B`` of shape (d_out, r0).
The official forward is ``W0 x + (mlora_alpha / r0) * dropout(x) @ f(B A)^T``, which a LoranConfig with
``start="official"`` reproduces. Adapters that use P or b layers, or an activation with no equivalent here,
are refused.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from loran.compat import targets_module
from loran.config import LoranConfig

# Official activation name (lower-cased) -> (our activation, its parameters as read from the official config).
OFFICIAL_ACTIVATIONS = {
    "sin": ("sinter", lambda cfg: {"amp": float(cfg.get("mlora_af_sin_A", 5e-4)),
                                   "omega": float(cfg.get("mlora_af_sin_omega", 1e3))}),
    "sigmoid": ("sigmoid", lambda cfg: {}),
    "tanh": ("tanh", lambda cfg: {}),
    "relu": ("relu", lambda cfg: {}),
    "silu": ("silu", lambda cfg: {}),
    "identity": ("identity", lambda cfg: {}),
    "swish": ("swish", lambda cfg: {"beta": 25.0}),
    "cos": ("cos", lambda cfg: {"omega": 1e4}),
    "gaussian": ("gaussian", lambda cfg: {}),
}

# Where the official code (as PEFT 0.4) looks for the layer index when layers_to_transform has no layers_pattern.
OFFICIAL_LAYERS_PATTERN = ["layers", "h", "block", "blocks", "layer"]

_KEY = re.compile(r"^(?P<module>.+)\.mlora_(?P<which>A|B)$")
_EXTRA = re.compile(r"\.mlora_(P|b|embedding_\w+)(_\d+)?$")


class OfficialAdapterError(ValueError):
    """The official adapter uses something that has no exact LoRAN equivalent here."""


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter_model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(folder / "adapter_model.safetensors")
    return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)


def convert_official_config(cfg: dict) -> LoranConfig:
    """LoranConfig with the same forward as the official config `cfg`."""
    if cfg.get("peft_type") != "MLORA":
        raise OfficialAdapterError(f'peft_type={cfg.get("peft_type")!r}; an official LoRAN adapter has "MLORA"')
    r = cfg.get("r")
    if not isinstance(r, list) or len(r) != 2:
        raise OfficialAdapterError(
            f"r={r!r}: only r = [r0, d] (no P or b layers, as in the released adapters) can be converted; "
            "more entries mean extra P_i/b_i layers, which LoRAN here does not implement")
    af = str(cfg.get("mlora_af", "Sigmoid"))
    if af.lower() not in OFFICIAL_ACTIVATIONS:
        raise OfficialAdapterError(f"mlora_af={af!r} has no equivalent; convertible: {sorted(OFFICIAL_ACTIVATIONS)}")
    activation, params = OFFICIAL_ACTIVATIONS[af.lower()]
    layers = cfg.get("layers_to_transform")
    # Without a pattern current PEFT would take the first number in the module path: pass the official list instead.
    pattern = cfg.get("layers_pattern") or (list(OFFICIAL_LAYERS_PATTERN) if layers is not None else None)
    return LoranConfig(
        r=int(r[0]),
        layers_to_transform=layers,
        layers_pattern=pattern,
        lora_alpha=cfg.get("mlora_alpha", 8),
        lora_dropout=float(cfg.get("mlora_dropout", 0.0)),
        target_modules=cfg.get("target_modules"),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        task_type=cfg.get("task_type"),
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        activation=activation,
        activation_kwargs=params(cfg),
        start="official",  # the official code applies f as is (no centring)
    )


def convert_official_weights(state: dict[str, torch.Tensor], r0: int) -> dict[str, torch.Tensor]:
    """Rename ``X.mlora_A`` / ``X.mlora_B`` to PEFT's ``X.lora_A.weight`` / ``X.lora_B.weight``."""
    out = {}
    for key, value in state.items():
        if _EXTRA.search(key):
            if value.count_nonzero() == 0 and re.search(r"\.mlora_b_\d+$", key):
                continue  # an all-zero bias adds nothing wherever the official code applies it
            raise OfficialAdapterError(f"{key}: P/b/embedding layers are in use; they cannot be converted")
        match = _KEY.match(key)
        if match is None:
            raise OfficialAdapterError(f"{key}: not an MLoRA A/B weight; cannot be converted")
        which = match["which"]
        expected_dim = 0 if which == "A" else 1
        if value.shape[expected_dim] != r0:
            raise OfficialAdapterError(f"{key} has shape {tuple(value.shape)}; expected rank {r0} on dim {expected_dim}")
        out[f'{match["module"]}.lora_{which}.weight'] = value.detach().clone().contiguous()
    if not out:
        raise OfficialAdapterError("no mlora_A / mlora_B weights found")
    return out


def check_weights_are_targeted(config: LoranConfig, weights: dict[str, torch.Tensor]) -> None:
    """Refuse weights for a module that `config` does not target: loading would drop them silently."""
    for key in weights:
        module = key.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")
        if not targets_module(config, module):
            raise OfficialAdapterError(
                f"{key}: module {module!r} is not targeted by the converted config (target_modules="
                f"{config.target_modules}, layers_to_transform={config.layers_to_transform}, layers_pattern="
                f"{config.layers_pattern}); the official config and its weights disagree")


def import_official_adapter(src: str | Path, dst: str | Path) -> LoranConfig:
    """Convert the official adapter folder `src` into a LoRAN adapter folder `dst` (loadable by load_loran)."""
    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "adapter_config.json").read_text())
    config = convert_official_config(cfg)
    weights = convert_official_weights(_read_weights(src), config.r)
    check_weights_are_targeted(config, weights)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(weights, dst / "adapter_model.safetensors")
    config.save_pretrained(str(dst))
    return config
