"""Paper-width benchmarks and the report of ``make gpu-check`` (the command line is scripts/gpu_check.py).

    python -m loran.bench.gpu layer --json out.json     # one d=4096, r=64 layer, QLoRA row vs LoRAN, bf16 autocast
    python -m loran.bench.gpu block --json out.json     # one training step of a Llama-2-7B-shaped NF4 decoder block

Both compare the QLoRA row (LoranConfig with f = identity, computed as LoRA) with the LoRAN row (Sinter at the released
settings) under the same precision policy (``--policy``, default the configs' float32), on the same random weights,
with B = 0 as after LoRA's init (speed does not depend on the values; the first losses of both arms must then agree).
Time: the median over `repeats` rounds after `warmup` rounds (the first compiles LoRAN's fused kernels), the arms
alternating; CUDA is synchronised around each round. Memory: the peak allocated during one round beyond what existed
before it, plus (block) the arm's own parameters, buffers and optimizer state: the analogue of one process's
max_memory_allocated. Path: what each arm's adapted layers ran, as choose_path reports it on the benchmark's input
under its autocast state (loran/bench/cost.py). MAC ratio: the multiply-adds of the paths that ran relative to the
QLoRA row's, where the time ratio would sit if time were proportional to them (the H200 report of 2026-12 printed
the folded path's 1.49 for a layer that ran unfolded: 2.45). Floor: the cost model's time at the device's rates
(datasheet table; measured on a CPU); each arm's time / its floor is printed.
On a CPU the same code runs at any size (the tests run the smallest); peak memory is then followed op by op.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from loran.bench import adapter as bench_adapter
from loran.bench import cost
from loran.bench import train_step as bench_train



# --- measuring -----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(arms: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                 repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each arm, the arms alternating round by round; the first `warmup` rounds are dropped."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(warmup + repeats):
        for name, fn in arms.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while `fn` runs, beyond what was allocated before."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with bench_adapter.PeakMemory() as tracker:
        fn()
    return tracker.peak


def adapter_config(activation: str, r: int, dropout: float, policy: str, targets: list[str]):
    """The QLoRA row (activation "identity") or a LoRAN row, as configs/adapter builds them (alpha 16)."""
    from loran import LoranConfig

    return LoranConfig(r=r, lora_alpha=16, lora_dropout=dropout, target_modules=targets, activation=activation,
                       update_dtype=policy)


ARMS = {"qlora": "identity", "loran": "sinter"}  # row -> activation (Sinter at its released defaults)


def _summary(times: dict[str, list[float]], peaks: dict[str, float], macs: dict[str, int],
             floors: dict[str, float] | None = None, paths: dict[str, str] | None = None) -> dict:
    ms = {arm: statistics.median(t) * 1e3 for arm, t in times.items()}
    out = {f"{arm}_path": paths[arm] for arm in paths or {}}
    out.update({f"{arm}_ms": round(ms[arm], 3) for arm in ms})
    for arm, floor in (floors or {}).items():
        out.update({f"{arm}_floor_ms": round(floor * 1e3, 4), f"{arm}_over_floor": round(ms[arm] / (floor * 1e3), 2)})
    out.update({f"{arm}_min_ms": round(min(t) * 1e3, 3) for arm, t in times.items()})
    out.update({f"{arm}_peak_mib": round(peaks[arm] / 2**20, 2) for arm in peaks})
    out.update(time_ratio=round(ms["loran"] / ms["qlora"], 3),
               memory_ratio=round(peaks["loran"] / peaks["qlora"], 3) if peaks["qlora"] else None,
               mac_ratio=round(macs["loran"] / macs["qlora"], 3))
    return out


# --- one layer -------------------------------------------------------------------------------------------------


def _runs_summary(runs: dict[str, dict[str, cost.LayerRun]], dev: torch.device, base_macs: int = 0,
                  weight_bytes: float = 2.0) -> tuple[dict[str, str], dict[str, int], dict[str, float]]:
    """(path, multiply-adds, floor seconds) per arm from the recorded layers; `base_macs`: the frozen rest's MACs
    (bf16), added to both."""
    _, rates = cost.device_rates(dev)
    paths = {arm: "+".join(sorted({run.path for run in r.values()})) for arm, r in runs.items()}
    macs = {arm: base_macs + sum(sum(cost.run_multiply_adds(run).values()) for run in r.values())
            for arm, r in runs.items()}
    floors = {} if rates is None else {
        arm: cost.floor_seconds(list(r.values()), rates, weight_bytes=weight_bytes) + 2 * base_macs / rates.bf16
        for arm, r in runs.items()}
    return paths, macs, floors


def layer_bench(d: int = 4096, r: int = 64, tokens: int = 2048, dropout: float = 0.0, policy: str = "float32",
                device: str = "cuda", warmup: int = 3, repeats: int = 10, seed: int = 0, base: str = "bf16") -> dict:
    """Forward + backward of one frozen d x d layer (`base` "bf16": nn.Linear; "nf4": bitsandbytes NF4, bf16 compute)
    adapted as the QLoRA row and as LoRAN, under bf16 autocast (x in bf16, requiring its grad as inside a network)."""
    from loran import get_loran_model

    dev = torch.device(device)
    models = {}
    for arm, activation in ARMS.items():
        torch.manual_seed(seed)
        proj = bench_adapter.Proj(d, d).to(device=dev, dtype=torch.bfloat16)
        if base == "nf4":
            proj.proj = _nf4(proj.proj, device)
            proj.is_loaded_in_4bit = True
        models[arm] = get_loran_model(proj, adapter_config(activation, r, dropout, policy, ["proj"])).train()
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    x = torch.randn(tokens, d, generator=gen, device=dev, dtype=torch.bfloat16).requires_grad_()
    grad_y = torch.randn(tokens, d, generator=gen, device=dev, dtype=torch.bfloat16)

    def step(model):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            y = model(x)
        y.backward(grad_y)
        x.grad = None
        for p in model.parameters():
            p.grad = None

    arms = {arm: (lambda m=m: step(m)) for arm, m in models.items()}
    runs = {arm: cost.record_paths(models[arm], fn) for arm, fn in arms.items()}
    times = timed_rounds(arms, dev, warmup, repeats)
    peaks = {arm: peak_bytes(fn, dev) for arm, fn in arms.items()}
    paths, macs, floors = _runs_summary(runs, dev, weight_bytes=0.5 if base == "nf4" else 2.0)
    return {"d": d, "r": r, "tokens": tokens, "dropout": dropout, "policy": policy, "base": base, "device": str(dev),
            **_summary(times, peaks, macs, floors, paths)}


# --- one decoder block -----------------------------------------------------------------------------------------


@dataclass
class BlockShape:
    """Llama-2-7B's decoder block by default."""

    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    kv_heads: int = 32


class Block(nn.Module):
    """One LlamaDecoderLayer with its rotary embedding; `config` as a model's (for the multiply-add count)."""

    def __init__(self, shape: BlockShape, seq: int):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                  num_hidden_layers=1, vocab_size=32, max_position_embeddings=max(seq, 16),
                                  attn_implementation="sdpa")
        self.layer = LlamaDecoderLayer(self.config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(self.config)
        self.is_loaded_in_4bit = True

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)[None]
        out = self.layer(x, position_embeddings=self.rotary(x, positions))
        return out[0] if isinstance(out, tuple) else out


def nf4_block(shape: BlockShape, seq: int, device: str, seed: int = 0) -> Block:
    """A decoder block with random weights whose linear layers are bitsandbytes NF4 (double quantisation, bf16
    compute), as QLoRA loads Llama-2-7B."""
    torch.manual_seed(seed)
    with torch.device(device):
        block = Block(shape, seq).to(torch.bfloat16)
    for name, module in list(block.named_modules()):
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, _nf4(module, device))
    return block


def _nf4(module: nn.Linear, device: str) -> nn.Module:
    """A bitsandbytes NF4 copy of a linear layer (double quantisation, bf16 compute), on `device`."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                          compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True, device="meta")
    q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
    if module.bias is not None:
        q.bias = nn.Parameter(module.bias.data, requires_grad=False)
    q = q.to(device)
    if hasattr(q, "support_avx512bf16_for_cpu"):  # no in-place repacking on AVX512-BF16 CPUs
        q.support_avx512bf16_for_cpu = False
    return q


def block_bench(shape: BlockShape | None = None, r: int = 64, dropout: float = 0.2, batch: int = 4, seq: int = 512,
                policy: str = "float32", device: str = "cuda", warmup: int = 2, repeats: int = 5,
                seed: int = 0) -> dict:
    """One training step (forward, backward, AdamW step) of an NF4 decoder block with q_proj and v_proj adapted, for
    the QLoRA row and LoRAN, under bf16 autocast; the input requires its grad (earlier blocks' adapters train)."""
    from peft import get_peft_model

    shape = shape or BlockShape()
    dev = torch.device(device)
    arms, optimizers, first_loss = {}, {}, {}
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    x = torch.randn(batch, seq, shape.hidden, generator=gen, device=dev, dtype=torch.bfloat16).requires_grad_()
    for arm, activation in ARMS.items():
        model = get_peft_model(nf4_block(shape, seq, device, seed),
                               adapter_config(activation, r, dropout, policy, ["q_proj", "v_proj"])).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        losses: list[float] = []

        def step(model=model, optimizer=optimizer, losses=losses):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                y = model(x)
            loss = y.float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            x.grad = None
            losses.append(loss.item())

        arms[arm], optimizers[arm], first_loss[arm] = step, (model, optimizer), losses
    runs = {arm: cost.record_paths(optimizers[arm][0], fn) for arm, fn in arms.items()}
    times = timed_rounds(arms, dev, warmup, repeats)
    peaks = {arm: peak_bytes(fn, dev) + bench_train.resident_bytes(*optimizers[arm]) for arm, fn in arms.items()}
    frozen = bench_train.multiply_adds(optimizers["qlora"][0], batch * seq, seq, r, dropout)["base"]
    adapted = sum(2 * run.tokens * run.d_in * run.d_out for run in runs["qlora"].values())
    paths, macs, floors = _runs_summary(runs, dev, base_macs=frozen - adapted, weight_bytes=0.5)
    return {"hidden": shape.hidden, "intermediate": shape.intermediate, "heads": shape.heads, "r": r,
            "dropout": dropout, "batch": batch, "seq": seq, "policy": policy, "device": str(dev),
            "first_loss_qlora": first_loss["qlora"][0], "first_loss_loran": first_loss["loran"][0],
            **_summary(times, peaks, macs, floors, paths)}


# --- the report ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    part: str
    figure: str
    limit: float
    what: str


TARGETS = (
    Target("layer", "time_ratio", 1.5, "layer LoRAN/LoRA time, bf16, d=4096, r=64, no dropout"),
    Target("block", "time_ratio", 1.25, "block step LoRAN/QLoRA time, dropout 0.2"),
    Target("block", "memory_ratio", 1.05, "block step LoRAN/QLoRA peak memory, dropout 0.2"),
)


@dataclass
class PartResult:
    """One part of the check: status "ok", "failed", "not run" or "not selected"; figures: name -> value."""

    name: str
    status: str
    reason: str = ""
    seconds: float | None = None
    figures: dict = field(default_factory=dict)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def target_lines(parts: dict[str, PartResult]) -> list[str]:
    """One line per target: the measured figure against its limit (met / NOT met / not measured)."""
    lines = []
    for t in TARGETS:
        part = parts.get(t.part)
        value = part.figures.get(t.figure) if part is not None and part.status == "ok" else None
        if value is None:
            verdict = "not measured"
        else:
            verdict = "met" if value <= t.limit else "NOT met (explain below)"
        shown = "-" if value is None else _fmt(value)
        lines.append(f"| {t.what} | {shown} | <= {t.limit:g} | {verdict} |")
    return lines


def report(meta: dict, parts: list[PartResult]) -> str:
    """The markdown report: commit, device and environment, each part's status and every figure, the targets."""
    by_name = {p.name: p for p in parts}
    out = ["# GPU check", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in meta.items()]
    out += ["", "## Parts", "", "| part | status | seconds |", "|---|---|---|"]
    for p in parts:
        status = p.status + (f": {p.reason}" if p.reason else "")
        out.append(f"| {p.name} | {status} | {'-' if p.seconds is None else f'{p.seconds:.1f}'} |")
    for p in parts:
        if p.figures:
            out += ["", f"## {p.name}", "", "| figure | value |", "|---|---|"]
            out += [f"| {k} | {_fmt(v)} |" for k, v in p.figures.items()]
    out += ["", "## Targets", "", "| target | measured | limit | verdict |", "|---|---|---|---|",
            *target_lines(by_name), "", "## Notes", "",
            "(What was not met, and why; what the check found and what was fixed.)", ""]
    return "\n".join(out)


def report_path(folder: Path, date: str, device: str) -> Path:
    """results/gpu/<date>_<device>.md, the device name made a plain file name."""
    safe = "".join(c if c.isalnum() or c in "-." else "-" for c in device).strip("-") or "unknown-device"
    return Path(folder) / f"{date}_{safe}.md"


# --- command line (one benchmark per call; scripts/gpu_check.py runs them in subprocesses) ---------------------


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="One paper-width benchmark (see the module docstring)")
    p.add_argument("which", choices=["layer", "block"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--policy", default="float32", help="LoranConfig.update_dtype for both arms")
    p.add_argument("--base", default="bf16", choices=["bf16", "nf4"], help="layer: the frozen layer's kind")
    p.add_argument("--dropout", type=float, help="the adapters' dropout (default: layer 0, block 0.2)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    quick = dict(layer=dict(d=256, r=8, tokens=64, warmup=1, repeats=2),
                 block=dict(shape=BlockShape(128, 256, 4, 4), r=8, batch=2, seq=16, warmup=1, repeats=2))
    bench = {"layer": layer_bench, "block": block_bench}[args.which]
    extra = {} if args.dropout is None else {"dropout": args.dropout}
    if args.which == "layer":
        extra["base"] = args.base
    figures = bench(device=args.device, policy=args.policy, **extra, **(quick[args.which] if args.quick else {}))
    print(json.dumps(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
