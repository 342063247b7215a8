"""Singular values of one layer's learned update: does the non-linearity lift s f(BA) beyond rank r?"""
from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraLayer


def update_matrix(layer: LoraLayer, adapter: str = "default") -> torch.Tensor:
    """The layer's update s f(BA) (LoRAN) or s BA (LoRA), shape (d_out, d_in), computed in float64 from A and B:
    in float32, roundoff alone puts about 1e-15 of the energy beyond rank r, even for the identity."""
    A, B = layer.lora_A[adapter].weight.detach().double(), layer.lora_B[adapter].weight.detach().double()
    z = B @ A
    act = getattr(layer, "loran_activation", {}).get(adapter)
    return (z if act is None else act.f(z)) * layer.scaling[adapter]


def middle_layer(model: torch.nn.Module) -> tuple[str, LoraLayer]:
    """The adapted layer in the middle of the network (by module order)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and m.lora_A]
    return layers[len(layers) // 2]


@torch.no_grad()
def update_spectrum(model: torch.nn.Module, adapter: str = "default") -> dict[str, Any]:
    """Singular values of the middle adapted layer's update and the share of energy beyond rank r."""
    name, layer = middle_layer(model)
    s = torch.linalg.svdvals(update_matrix(layer, adapter))
    r = layer.r[adapter]
    energy = s.square()
    total = energy.sum().item()
    return {"module": name, "r": r, "singular_values": s.tolist(),
            "energy_beyond_r": energy[r:].sum().item() / total if total > 0 else 0.0,
            "numerical_rank": int((s > s[0] * 1e-10).sum()) if total > 0 else 0}
