"""What bf16 autocast does to Sinter at the released amp under each precision policy (LoranConfig.update_dtype).

    python -m loran.bench.precision            # prints one JSON line per policy (results/adapter_measurements.md)

One adapted layer, the same weights for every row: A as LoRA initialises it, B at a trained-like scale (N(0, 0.02^2)),
x ~ N(0, 1), under CPU bf16 autocast in train mode without dropout. Sinter (amp 5e-5, omega 1e4) is compared with the
QLoRA row (LoranConfig with the identity, which Sinter with amp = 0 equals bit for bit):
- update_changed: fraction of the elements of f(B A), in the policy's compute dtype, that differ from B A;
- output_changed / grad_B_changed: fraction of the layer's outputs / of dL/dB that differ from QLoRA's;
- f_output_changed: fraction of the outputs that f itself changes: Sinter against amp = 0 through Sinter's own
  path x f(B A)^T (QLoRA computes (x A^T) B^T: a different order of the products, which rounds differently in bf16);
- output_max_diff: the largest |y_sinter - y_qlora|, against output_ulp, the largest bf16 spacing of |y| there.
"""
from __future__ import annotations

import argparse
import json

import torch

from loran.activations import Activation
from loran.bench.adapter import Proj
from loran.autograd import loran_update
from loran.config import UPDATE_DTYPES, LoranConfig

RELEASED = {"amp": 5e-5, "omega": 1e4}


def _adapted(activation: str, params: dict, policy: str, d_in: int, d_out: int, r: int, seed: int):
    from loran.model import get_loran_model

    torch.manual_seed(seed)
    config = LoranConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"], activation=activation,
                         activation_kwargs=params, update_dtype=policy)
    model = get_loran_model(Proj(d_in, d_out), config)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.02
    return model.train()


def _run(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().sum().backward()
    grad_B = next(p.grad for n, p in model.named_parameters() if "lora_B" in n)
    return y.detach(), grad_B


def sinter_under_bf16(policy: str, d_in: int = 1024, d_out: int = 1024, r: int = 64, tokens: int = 256,
                      seed: int = 0) -> dict:
    """The figures of the module docstring for one policy."""
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(seed + 2))
    runs = {name: _run(_adapted(act, params, policy, d_in, d_out, r, seed), x)
            for name, (act, params) in {"qlora": ("identity", {}), "sinter": ("sinter", RELEASED)}.items()}
    (y_q, g_q), (y_s, g_s) = runs["qlora"], runs["sinter"]
    layer = _adapted("sinter", RELEASED, policy, d_in, d_out, r, seed).base_model.model.proj
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    dtype = torch.bfloat16 if policy == "autocast" else torch.float32
    z = B.to(dtype) @ A.to(dtype)
    act = layer.loran_activation["default"]
    fz = act.f(z)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = layer.base_layer(x)
        low = torch.bfloat16 if policy == "autocast" else None
        y_f, y_0 = (loran_update(x, A, B, layer.scaling["default"], a, result=base, dtype=low)
                    for a in (act, Activation("sinter", {**RELEASED, "amp": 0.0})))
    spacing = torch.finfo(torch.bfloat16).eps * y_q.float().abs().max().item()
    return {"policy": policy, "update_dtype": str(dtype).removeprefix("torch."),
            "update_changed": (fz != z).float().mean().item(), "f_output_changed": (y_f != y_0).float().mean().item(),
            "output_changed": (y_s != y_q).float().mean().item(),
            "output_max_diff": (y_s.float() - y_q.float()).abs().max().item(), "output_ulp": spacing,
            "grad_B_changed": (g_s != g_q).float().mean().item()}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args(argv)
    rows = [sinter_under_bf16(policy, args.d, args.d, args.r, args.tokens) for policy in UPDATE_DTYPES]
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
