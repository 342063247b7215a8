"""Which path an adapted layer ran, that path's multiply-adds, and the time floor a small cost model gives them.

Every benchmark asks ``choose_path`` (loran/variants.py) on the benchmarked layers with the benchmark's own input,
under its autocast state (``record_paths``: forward pre-hooks during one step), and counts the multiply-adds of THAT
path (``path_multiply_adds``), split into parts that may run in different dtypes. Per forward + backward of one
d_out x d_in layer, N tokens, x requiring its grad, W0 frozen (derived from loran/autograd.py and variants.py):

    path        base (x W0^T, g W0)   low-rank (x A^T B^T, dL/dx, dL/dA, dL/dB)   dense (x F^T, g F, g^T x)   Z = B A
    lora        2 N d_out d_in        3 N (d_in + d_out) r                         -                           -
    lora cast   2 N d_out d_in        3 N (d_in + d_out) r                         -                           -
    folded      (in the dense part)   -                                            3 N d_out d_in              4 d_out d_in r
    dense       2 N d_out d_in        -                                            3 N d_out d_in              4 d_out d_in r
    residual    2 N d_out d_in        3 N (d_in + d_out) r  (none if c = 0)        3 N d_out d_in              4 d_out d_in r
    reference   2 N d_out d_in        -                                            3 N d_out d_in              3 d_out d_in r

so folded 3 N d_out d_in + 4 d_out d_in r; dense 5 N d_out d_in + 4 d_out d_in r; residual 5 N d_out d_in +
3 N (d_in + d_out) r + 4 d_out d_in r. Z = B A is 4 d_out d_in r wherever f(Z) is recomputed: B A in forward, again
in backward, dL/dB = dL/dZ A^T and dL/dA = B^T dL/dZ (plain autograd keeps f(B A): 3).

Floor (``floor_seconds``): sum over parts of MACs / the peak MAC rate of the dtype the part runs in (bf16 tensor
cores, fp32; TF32 is listed but no path uses it: Z must stay IEEE fp32), plus bytes / bandwidth, where the bytes are
the activations (x, y, dL/dy, dL/dx, about 8 N d elements in their dtype), the base weight read twice, and for paths
with a dense part about 40 bytes per d_out x d_in element (the f(Z) or g(Z) blocks written, cast and read, G and
dL/dZ, forward and backward). A floor, not a prediction: no launch or host time, perfect overlap.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple

import torch
from torch import nn


class Rates(NamedTuple):
    """Peak rates: FLOP/s of bf16 tensor cores, TF32 tensor cores, fp32 (CUDA cores), and memory bandwidth B/s."""

    bf16: float
    tf32: float
    fp32: float
    bandwidth: float


# Public datasheet peaks (dense, no sparsity), SXM parts.
RATES = {
    "H200": Rates(989e12, 494e12, 67e12, 4.8e12),
    "H100": Rates(989e12, 494e12, 67e12, 3.35e12),
    "A100": Rates(312e12, 156e12, 19.5e12, 2.0e12),
}
DENSE_BYTES_PER_ELEMENT = 40


def path_multiply_adds(path: str, d_in: int, d_out: int, r: int, tokens: int, slope: float = 1.0) -> dict[str, int]:
    """Multiply-adds of one forward + backward by part (base, lowrank, dense, z), per the module docstring's table;
    `path` a ``Path`` value ("lora", "folded", "residual", ...; "base only": the frozen layer), `slope` c = f'(0)."""
    nd, ndr, dr = tokens * d_in * d_out, tokens * (d_in + d_out) * r, d_in * d_out * r
    parts = {"base only": {"base": 2 * nd}, "lora": {"base": 2 * nd, "lowrank": 3 * ndr},
             "lora cast": {"base": 2 * nd, "lowrank": 3 * ndr}, "folded": {"dense": 3 * nd, "z": 4 * dr},
             "dense": {"base": 2 * nd, "dense": 3 * nd, "z": 4 * dr},
             "residual": {"base": 2 * nd, "lowrank": 3 * ndr if slope else 0, "dense": 3 * nd, "z": 4 * dr},
             "reference": {"base": 2 * nd, "dense": 3 * nd, "z": 3 * dr}}
    return parts[path]


class LayerRun(NamedTuple):
    """What one adapted layer ran: its path, whether the update's products ran in autocast's (low) dtype, whether the
    base ran low (autocast on, or a bf16/fp16 input), (d_in, d_out), rank, tokens, slope c of the first adapter."""

    path: str
    update_low: bool
    base_low: bool
    d_in: int
    d_out: int
    r: int
    tokens: int
    slope: float


def layer_run(layer: nn.Module, x: torch.Tensor, extra_args: bool = False) -> LayerRun:
    """Ask choose_path, as the layer's forward will, which path `layer` takes on input x (PEFT's own LoRA: "lora")."""
    from loran.variants import LoranVariant, Path, choose_path

    autocast = torch.is_autocast_enabled(x.device.type)
    base_low = autocast or x.dtype in (torch.bfloat16, torch.float16)
    names = [n for n in layer.active_adapters if n in layer.lora_A]
    name = names[0]
    d_in, d_out = layer.lora_A[name].weight.shape[1], layer.lora_B[name].weight.shape[0]
    shape = (d_in, d_out, layer.lora_A[name].weight.shape[0], x.numel() // x.shape[-1])
    if not all(isinstance(getattr(layer, "lora_variant", {}).get(n), LoranVariant) for n in names):
        return LayerRun("lora", autocast, base_low, *shape, 1.0)
    split = layer.loran_activation[name].split
    slope = 1.0 if split is None else split.slope
    plan = choose_path(layer, x, extra_args=extra_args)
    if plan.path is not Path.UNFOLDED:
        return LayerRun(plan.path.value, False, base_low, *shape, slope)
    adapter = choose_path(layer, x, name)
    return LayerRun(adapter.path.value, adapter.dtype is not None, base_low, *shape, slope)


def record_paths(model: nn.Module, run: Callable[[], object]) -> dict[str, LayerRun]:
    """{module name: LayerRun} of every adapted (PEFT LoRA) layer of `model` during one call of run(), each asked with
    the input that layer got, under the autocast state it ran in."""
    from peft.tuners.lora import LoraLayer

    runs: dict[str, LayerRun] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and any(n in module.lora_A for n in module.active_adapters):
            def hook(mod, args, kwargs, name=name):
                runs[name] = layer_run(mod, args[0], extra_args=bool(kwargs) or len(args) > 1)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return runs


def run_multiply_adds(run: LayerRun) -> dict[str, int]:
    """``path_multiply_adds`` of a recorded layer."""
    return path_multiply_adds(run.path, run.d_in, run.d_out, run.r, run.tokens, run.slope)


def part_dtypes(run: LayerRun) -> dict[str, str]:
    """The dtype ("bf16" or "fp32") each part of a recorded layer ran in: the base as the base; the update's products in
    autocast's dtype when the path computes it there; Z = B A in fp32 on the residual path always."""
    low = "bf16" if run.update_low else "fp32"
    return {"base": "bf16" if run.base_low else "fp32", "lowrank": low, "dense": low,
            "z": "fp32" if run.path == "residual" else low}


def floor_seconds(runs: list[LayerRun], rates: Rates, act_bytes: int = 2, weight_bytes: float = 2.0) -> float:
    """The cost model's floor of one forward + backward of the recorded layers at `rates` (module docstring)."""
    seconds = 0.0
    for run in runs:
        dtypes = part_dtypes(run)
        for part, macs in run_multiply_adds(run).items():
            seconds += 2 * macs / getattr(rates, dtypes[part])
        moved = 8 * run.tokens * max(run.d_in, run.d_out) * act_bytes + 2 * run.d_in * run.d_out * weight_bytes
        if "dense" in run_multiply_adds(run):
            moved += DENSE_BYTES_PER_ELEMENT * run.d_in * run.d_out
        seconds += moved / rates.bandwidth
    return seconds


def device_rates(device: torch.device | str) -> tuple[str, Rates]:
    """(name, Rates) of the device: the datasheet table for a known GPU; on a CPU one measured fp32 matmul rate (a
    1024^3 product, best of 3) for every dtype and one measured 64 MiB copy for the bandwidth; unknown GPU: ("", None)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, rates in RATES.items():
            if key in name:
                return key, rates
        return name, None
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    src, dst = torch.empty(2**24), torch.empty(2**24)
    best_mm = best_copy = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best_mm = min(best_mm, time.perf_counter() - start)
        start = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - start)
    flops = 2 * 1024**3 / best_mm
    return "cpu (measured)", Rates(flops, flops, flops, 2 * src.numel() * 4 / best_copy)
