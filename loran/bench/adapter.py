"""One adapted layer, forward + backward: PEFT's LoRA, naive LoRAN and this package's LoRAN, time and memory.

    .venv/bin/python scripts/bench_adapter.py                 # d in 1024 2048 4096, r in 8 64, N = 512
    .venv/bin/python scripts/bench_adapter.py --quick         # smoke run, seconds
    .venv/bin/python scripts/bench_adapter.py --sizes 2048 --ranks 64 --dropouts 0 --repeats 20

Methods (all on the same frozen nn.Linear(d, d, bias=False), fp32, x requires grad as inside a network):
- lora:        PEFT's own LoRA layer, h = W0 x + s B A dropout(x).
- loran_naive: LoRAN through plain autograd, h = W0 x + s dropout(x) @ f(B A)^T, as the official code computes it
               (``LoranConfig(memory_efficient=False)``): f(B A) is materialised and autograd keeps it.
- loran:       this package's default path (``loran.autograd``): folded into one matmul without active
               dropout, recomputing f(B A) in backward; see loran/autograd.py for the cost model.

Time: median over `--repeats` rounds after `--warmup` rounds; each round runs every method once, in turn, so that
load from other processes hits all methods alike; the spread column is the interquartile range / median, and the
min column the best round (on a busy machine the better estimate of the unloaded time).
Path: the path each arm's layer took, as choose_path reports it on the benchmark's input (``cost.record_paths``);
MACs and the floor are that path's (loran/bench/cost.py: the formulas, the cost model, the measured CPU rates).
MAC ratio: matmul multiply-adds relative to LoRA's, where the time ratio would sit if time were
proportional to them; work that is not a matmul moves it either way (LoRAN's element-wise f and f', memory-bound
thin products; LoRA's dropout mask, which is slow on CPUs).
Memory, measured in a separate untimed pass:
- peak: the largest total size of the tensors allocated during forward + backward and alive at the same time
  (a TorchDispatchMode follows every storage an op creates until it is freed);
- saved: bytes of the distinct tensors autograd keeps between forward and backward, module parameters excluded
  (saved_tensors_hooks), and the largest of them in elements (a d_out x d_in tensor has d^2).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


import peft
from peft import LoraConfig, get_peft_model

from loran import LoranConfig, get_loran_model
from loran.bench import cost

METHODS = ("lora", "loran_naive", "loran")


class Proj(nn.Module):
    """A single frozen projection, adapted as "proj"."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def build(method: str, d: int, r: int, dropout: float, seed: int = 0, alpha: float = 16.0) -> nn.Module:
    """The adapted layer for `method`, in train mode, with B drawn at a trained-like scale (not LoRA's zeros)."""
    torch.manual_seed(seed)
    base = Proj(d, d)
    kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"])
    if method == "lora":
        model = get_peft_model(base, LoraConfig(**kwargs))
    elif method in ("loran", "loran_naive"):
        model = get_loran_model(base, LoranConfig(**kwargs, memory_efficient=method == "loran"))
    else:
        raise ValueError(f"method={method!r}; allowed: {METHODS}")
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.02
    return model.train()


def fwd_bwd(model: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> None:
    """One forward + backward; gradients are dropped afterwards (set to None), as an optimizer step would."""
    model(x).backward(grad_y)
    x.grad = None
    for p in model.parameters():
        p.grad = None


class PeakMemory(TorchDispatchMode):
    """Peak total bytes of storages created by ops while active and still alive (views and in-place ops excluded)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for ptr, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.current -= size
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self.live or storage.nbytes() == 0:
                continue
            self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(model: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> int:
    """Peak bytes allocated during one forward + backward, beyond what existed before."""
    with PeakMemory() as tracker:
        fwd_bwd(model, x, grad_y)
    return tracker.peak


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes, largest numel) of the distinct non-parameter tensors autograd keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, int]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = (storage.nbytes(), t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    del y
    x.grad = None
    return sum(b for b, _ in seen.values()), max((n for _, n in seen.values()), default=0)


@dataclass
class Row:
    d: int
    r: int
    tokens: int
    dropout: float
    method: str
    ms: float
    min_ms: float
    spread: float
    peak_mib: float
    saved_mib: float
    saved_max_numel: int
    path: str = ""
    macs: int = 0
    floor_ms: float = 0.0


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def method_path(method: str, dropout: float) -> str:
    """The path each method's fp32 layer takes without autocast (what ``bench`` records): lora; loran_naive plain
    autograd ("reference"); loran folded without active dropout, else the residual split (Sinter is centred)."""
    return {"lora": "lora", "loran_naive": "reference", "loran": "residual" if dropout > 0 else "folded"}[method]


def multiply_adds(method: str, d: int, r: int, tokens: int, dropout: float, d_out: int | None = None) -> int:
    """Matmul multiply-adds of one forward + backward of a d_out x d layer (d_out = d if None; x requires grad,
    W0 frozen) on the path `method` takes in fp32 without autocast (``method_path``), by ``cost.path_multiply_adds``:

    lora:        x W0^T, g W0 (2 N d_out d) and the update's 3 N r (d + d_out) (x A^T, then B; dL/dx through both;
                 dL/dA, dL/dB);
    loran_naive: x W0^T, dropout(x) F^T, g W0, g F, dL/dF = g^T dropout(x) (5 N d_out d); B A, dL/dA, dL/dB
                 (3 d_out d r);
    loran:       without dropout folded: x W^T, g W, G = g^T x (3 N d_out d); B A twice, dL/dA, dL/dB (4 d_out d r);
                 with dropout the residual split: the base (2 N d_out d), LoRA's 3 N r (d + d_out), the g part
                 x g^T, g_y g, g_y^T x (3 N d_out d), B A twice, dL/dA, dL/dB (4 d_out d r).
    """
    d_out = d if d_out is None else d_out
    return sum(cost.path_multiply_adds(method_path(method, dropout), d, d_out, r, tokens).values())


def int_list(text: str) -> list[int]:
    """argparse type: "1024,2048" -> [1024, 2048]."""
    return [int(v) for v in text.split(",")]


def float_list(text: str) -> list[float]:
    """argparse type: "0,0.05" -> [0.0, 0.05]."""
    return [float(v) for v in text.split(",")]


def bench(d: int, r: int, tokens: int, dropout: float, warmup: int, repeats: int, methods=METHODS,
          clock: str = "wall", rates: cost.Rates | None = None) -> list[Row]:
    """Time and memory of every method for one (d, r, N, dropout) cell, with the path each took (one untimed step
    asks choose_path), its multiply-adds and its floor at `rates`."""
    models = {m: build(m, d, r, dropout) for m in methods}
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, d, generator=gen).requires_grad_()
    grad_y = torch.randn(tokens, d, generator=gen)
    runs = {m: list(cost.record_paths(models[m], lambda m=m: fwd_bwd(models[m], x, grad_y)).values())
            for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    now = CLOCKS[clock]
    for i in range(warmup + repeats):
        for m in methods:
            start = now()
            fwd_bwd(models[m], x, grad_y)
            if i >= warmup:
                times[m].append(now() - start)
    rows = []
    for m in methods:
        t = sorted(times[m])
        median = statistics.median(t)
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [median, median, median]
        saved, saved_max = saved_for_backward(models[m], x)
        floor = cost.floor_seconds(runs[m], rates, act_bytes=4, weight_bytes=4) * 1e3 if rates else 0.0
        rows.append(Row(d, r, tokens, dropout, m, median * 1e3, t[0] * 1e3, (q[2] - q[0]) / median,
                        peak_bytes(models[m], x, grad_y) / 2**20, saved / 2**20, saved_max,
                        "+".join(run.path for run in runs[m]),
                        sum(sum(cost.run_multiply_adds(run).values()) for run in runs[m]), floor))
    return rows


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "load_1min": round(load, 2)}


def header(script: str, argv, clock: str) -> dict:
    """Print the command line and the machine (the first lines of every benchmark's output) and return the latter."""
    info = {**machine(), "clock": clock, "compile": os.environ.get("LORAN_COMPILE", "auto")}
    print(f"# {script} {' '.join(argv if argv is not None else sys.argv[1:])}")
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    return info


def table(rows: list[Row]) -> str:
    """Markdown table with ratios to LoRA and to naive LoRAN in the same cell (medians; min: best of the repeats)."""
    out = ["| d | r | N | dropout | method | path | fwd+bwd ms (median) | min ms | spread | /LoRA | /LoRA (min) | /naive "
           "| GMAC | /LoRA MAC | floor ms | /floor | peak MiB | peak /LoRA | saved MiB | largest saved "
           "| keeps d_out x d_in |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cells: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        cells.setdefault((row.d, row.r, row.tokens, row.dropout), {})[row.method] = row
    for (d, r, n, p), cell in cells.items():
        lora, naive = cell.get("lora"), cell.get("loran_naive")

        def ratio(a: float, ref: Row | None, field: str) -> str:
            return f"{a / getattr(ref, field):.2f}" if ref is not None and getattr(ref, field) else "-"

        for m, row in cell.items():
            out.append(
                f"| {d} | {r} | {n} | {p:g} | {m} | {row.path} | {row.ms:.1f} | {row.min_ms:.1f} | {row.spread:.0%} "
                f"| {ratio(row.ms, lora, 'ms')} | {ratio(row.min_ms, lora, 'min_ms')} | {ratio(row.ms, naive, 'ms')} "
                f"| {row.macs / 1e9:.3g} | {ratio(row.macs, lora, 'macs')} "
                f"| {row.floor_ms:.2f} | {row.ms / row.floor_ms if row.floor_ms else float('nan'):.1f} "
                f"| {row.peak_mib:.1f} | {ratio(row.peak_mib, lora, 'peak_mib')} "
                f"| {row.saved_mib:.2f} | {row.saved_max_numel} | {'yes' if row.saved_max_numel >= d * d else 'no'} |")
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int_list, default=[1024, 2048, 4096], help="d (square d x d layer), comma-separated")
    p.add_argument("--ranks", type=int_list, default=[8, 64])
    p.add_argument("--tokens", type=int, default=512, help="N = batch x sequence")
    p.add_argument("--dropouts", type=float_list, default=[0.0, 0.05],
                   help="0: the update folds into W0; 0.05 is configs/adapter's training default")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--big-repeats", type=int, default=3, help="repeats for d >= 4096 (about 1 s per round)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, steadier on a shared machine with "
                        "--threads 1 (with more threads it also counts threads waiting for each other)")
    p.add_argument("--json", help="also write the rows and the machine to this file")
    p.add_argument("--quick", action="store_true", help="smoke run: d=256, r=8, N=64, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.ranks, args.tokens, args.dropouts = [256], [8], 64, [0.0, 0.1]
        args.warmup, args.repeats = 1, 2
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = header("bench_adapter", argv, args.clock)
    device, rates = cost.device_rates("cpu")
    info["rates"] = dict(device=device, **rates._asdict())
    print(f"# floor rates ({device}): {rates.fp32 / 1e9:.0f} GFLOP/s fp32 matmul, {rates.bandwidth / 1e9:.1f} GB/s",
          flush=True)
    rows = []
    for d in args.sizes:
        for r in args.ranks:
            for p in args.dropouts:
                repeats = args.big_repeats if d >= 4096 else args.repeats
                cell = bench(d, r, args.tokens, p, args.warmup, repeats, clock=args.clock, rates=rates)
                rows += cell
                print(f"# d={d} r={r} p={p:g}: " + ", ".join(f"{c.method} {c.ms:.1f} ms" for c in cell), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "rows": [asdict(r) for r in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
