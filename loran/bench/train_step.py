"""SmolLM2-135M: one optimizer step of LoRAN against LoRA on the same base, and generation after merging.

    .venv/bin/python scripts/bench_train.py                 # NF4 and fp32 bases, dropout 0 and 0.05, then generation
    .venv/bin/python scripts/bench_train.py --quick         # smoke run: 1 timed step, short generation
    .venv/bin/python scripts/bench_train.py --bases nf4 --dropouts 0.05 --steps 10

Training arms, each on a freshly loaded model (q_proj and v_proj adapted, r = 8, alpha = 16 as configs/adapter):
- base nf4:  QLoRA (PEFT's LoRA on the 4-bit NF4 base, fp32 compute) vs LoRAN on the same base;
- base none: LoRA on the fp32 base vs LoRAN on it.
One step = forward + backward + AdamW step + zero_grad on a batch of 4 x 128 random token ids (labels = inputs).
Time: median over `--steps` steps after `--warmup`; the arms of one (base, dropout) cell alternate step by step so
that load from other processes hits them alike. Memory: the parameters, buffers and optimizer state that exist
before the step, plus the peak of the tensors allocated during one step (followed op by op, as
scripts/bench_adapter.py does); the ratio LoRAN / LoRA of that total is the analogue of CUDA's
max_memory_allocated. Path: the paths the adapted layers took, as choose_path reports them on one untimed step
(loran/bench/cost.py). GMAC: the step's matmul multiply-adds, the frozen model's counted from its shapes
(`multiply_adds`) plus, per adapted layer, what the path it took adds (``cost.path_multiply_adds``), and their
ratio to (Q)LoRA's. About 40 % of a QLoRA step is not matmul work here (torch.profiler, dropout 0.05:
softmax over the vocabulary, dropout masks, dequantisation, the optimizer) and LoRAN adds little to it, so the time
ratio sits below the GMAC ratio unless LoRAN's own element-wise work and call overhead outweigh that.

Generation: the adapters (B drawn at a trained-like scale) merged into the fp32 base with PEFT's merge_and_unload,
greedy decoding of `--new-tokens` tokens for a batch of `--gen-batch` prompts; tokens per second for LoRA, LoRAN
and the bare base model, alternating.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch


from loran.bench import cost
from loran.bench.adapter import CLOCKS, PeakMemory, header
from loran.bench.adapter import multiply_adds as layer_multiply_adds
from peft import LoraConfig, get_peft_model

from loran import LoranConfig, get_loran_model
from loran.pipeline.base_models import load_causal_lm, tiny_causal_lm
from transformers.utils import logging as hf_logging

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "v_proj"]


def load(quantization: str, name: str = MODEL):
    """`name`: a load_causal_lm name (the embedded SmolLM2 by default), or "tiny" (random, fp32 only: tests)."""
    if name == "tiny":
        if quantization != "none":
            raise ValueError("the tiny test model has no quantized form; use --bases none")
        model, tokenizer = tiny_causal_lm()
    else:
        model, tokenizer = load_causal_lm(name, quantization=quantization)
    for module in model.modules():  # no in-place bf16 repacking of 4-bit weights on AVX512-BF16 CPUs (loran.pipeline.base_models.keep_4bit_weights_packed)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model, tokenizer


def adapt(model, method: str, r: int, alpha: float, dropout: float, seed: int = 0):
    """Wrap `model` with LoRA or LoRAN (default Sinter at the released settings); B at a trained-like scale."""
    kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    if method == "lora":
        peft_model = get_peft_model(model, LoraConfig(**kwargs))
    else:
        peft_model = get_loran_model(model, LoranConfig(**kwargs))
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.02
    return peft_model


def batch(vocab: int, size: int, length: int, seed: int = 0) -> dict:
    ids = torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def step(model, optimizer, inputs: dict) -> None:
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def resident_bytes(model, optimizer) -> int:
    """Bytes of the distinct storages of parameters, buffers and optimizer state."""
    storages = {}
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def train_cells(quantization: str, dropouts: list[float], args) -> list[dict]:
    """Step time and memory of LoRA (QLoRA on nf4) and LoRAN on one base, for each dropout."""
    bases = {}
    for method in ("lora", "loran"):  # one base model per arm, re-used across dropouts (an NF4 load takes ~20 s)
        bases[method], tokenizer = load(quantization, args.model)
    inputs = batch(len(tokenizer), args.batch, args.seq)
    tokens = args.batch * args.seq
    now = CLOCKS[args.clock]
    rows = []
    for dropout in dropouts:
        arms = {}
        for method, model in bases.items():
            peft_model = adapt(model, method, args.r, args.alpha, dropout).train()
            optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
            arms[method] = (peft_model, optimizer)
        runs = {m: cost.record_paths(model, lambda m=m: step(*arms[m], inputs)) for m, (model, _) in arms.items()}
        times = {m: [] for m in arms}
        for i in range(args.warmup + args.steps):
            for method, (model, optimizer) in arms.items():
                start = now()
                step(model, optimizer, inputs)
                if i >= args.warmup:
                    times[method].append(now() - start)
        cell = []
        macs = multiply_adds(bases["lora"], tokens, args.seq, args.r, dropout)
        ran = {m: macs["base"] + sum(sum(cost.run_multiply_adds(run).values()) - 2 * run.tokens * run.d_in * run.d_out
                                     for run in runs[m].values()) for m in arms}
        for method, (model, optimizer) in arms.items():
            resident = resident_bytes(model, optimizer)
            with PeakMemory() as tracker:
                step(model, optimizer, inputs)
            name = {"lora": "QLoRA" if quantization == "nf4" else "LoRA", "loran": "LoRAN"}[method]
            cell.append({"base": quantization, "dropout": dropout, "method": name,
                         "step_s": statistics.median(times[method]), "min_s": min(times[method]),
                         "spread": _spread(times[method]), "resident_mib": resident / 2**20,
                         "step_peak_mib": tracker.peak / 2**20, "total_mib": (resident + tracker.peak) / 2**20,
                         "path": "+".join(sorted({run.path for run in runs[method].values()})),
                         "gmacs": ran[method] / 1e9})
            bases[method] = model.unload()  # the bare base again, for the next dropout
        print(f"# base={quantization} dropout={dropout:g}: "
              + ", ".join(f"{r['method']} {r['step_s']:.3f} s {r['total_mib']:.0f} MiB" for r in cell), flush=True)
        rows += cell
        del arms
        gc.collect()
    return rows


def multiply_adds(model, tokens: int, seq: int, r: int, dropout: float) -> dict[str, float]:
    """Matmul multiply-adds of one training step on a frozen base, from the model's shapes (where the time ratio
    would sit if time were proportional to them).

    base:  every linear layer (4-bit ones included) forward and dL/dx, 2 N d_in d_out, plus attention (Q K^T and
           A V forward, about twice that backward: 6 N seq d_model per layer, causal masking not discounted);
    lora, loran: base plus, per adapted layer, what the method adds to a frozen layer in bench_adapter's cost model
           (LoRAN with dropout: x W0^T and dropout(x) f(B A)^T, g W0 and g f(B A) cannot be shared).
    """
    base, extra = 0, {"lora": 0, "loran": 0}
    for name, module in model.named_modules():
        d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if not isinstance(d_in, int) or not isinstance(d_out, int) or "lora_" in name or "base_layer" in name:
            continue
        frozen = 2 * tokens * d_in * d_out
        base += frozen
        if name.split(".")[-1] in TARGETS:
            for method in extra:
                extra[method] += layer_multiply_adds(method, d_in, r, tokens, dropout, d_out) - frozen
    config = model.config
    base += 6 * tokens * seq * config.hidden_size * config.num_hidden_layers
    return {"base": base, **{method: base + macs for method, macs in extra.items()}}


def _spread(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


@torch.no_grad()
def generation(args) -> list[dict]:
    """Tokens/s of greedy decoding: LoRA and LoRAN merged into the fp32 base, and the bare base."""
    models = {}
    for method in ("base", "lora", "loran"):
        model, tokenizer = load("none", args.model)
        if method != "base":
            model = adapt(model, method, args.r, args.alpha, 0.0).merge_and_unload()
        models[method] = model.eval()
    layouts = {m: _layout(model) for m, model in models.items()}
    if len(set(layouts.values())) != 1:  # then a throughput difference would have a cause other than noise
        raise RuntimeError(f"the merged models differ in modules or parameter layout: {sorted(layouts)}")
    print("# merged models: the same module types and parameter names, shapes, dtypes and strides as the base",
          flush=True)
    prompts = batch(len(tokenizer), args.gen_batch, args.prompt_len, seed=1)
    inputs = {"input_ids": prompts["input_ids"], "attention_mask": prompts["attention_mask"]}
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    times = {m: [] for m in models}
    for i in range(1 + args.gen_repeats):
        for method, model in models.items():
            start = time.perf_counter()
            out = model.generate(**inputs, **kwargs)
            if i >= 1:
                times[method].append(time.perf_counter() - start)
            assert out.shape[1] == args.prompt_len + args.new_tokens
    tokens = args.gen_batch * args.new_tokens
    return [{"method": m, "tokens_per_s": tokens / statistics.median(t), "best_tokens_per_s": tokens / min(t),
             "spread": _spread(t)} for m, t in times.items()]


def _layout(model) -> tuple:
    """What decides a forward's speed apart from the values: module types, parameter names, shapes, dtypes, strides."""
    modules = tuple(type(m).__name__ for m in model.modules())
    params = tuple((n, tuple(p.shape), p.dtype, p.stride()) for n, p in model.named_parameters())
    return modules, params


def report(train_rows: list[dict], gen_rows: list[dict]) -> str:
    out = []
    if train_rows:
        out += ["| base | dropout | method | path | step s (median) | min s | spread | /LoRA time | /LoRA (min) "
                "| matmul GMAC | /LoRA GMAC | resident MiB | step peak MiB | total MiB | /LoRA memory |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cells = {}
    for row in train_rows:
        cells.setdefault((row["base"], row["dropout"]), []).append(row)
    for (base, dropout), rows in cells.items():
        ref = rows[0]
        for row in rows:
            out.append(f"| {base} | {dropout:g} | {row['method']} | {row.get('path', '-')} | {row['step_s']:.3f} "
                       f"| {row['min_s']:.3f} "
                       f"| {row['spread']:.0%} | {row['step_s'] / ref['step_s']:.3f} "
                       f"| {row['min_s'] / ref['min_s']:.3f} | {row['gmacs']:.1f} | {row['gmacs'] / ref['gmacs']:.3f} "
                       f"| {row['resident_mib']:.1f} "
                       f"| {row['step_peak_mib']:.1f} | {row['total_mib']:.1f} "
                       f"| {row['total_mib'] / ref['total_mib']:.3f} |")
    if gen_rows:
        ref = {r["method"]: r for r in gen_rows}
        out += ["", "| merged model | tokens/s (median) | best | spread | /LoRA | /LoRA (best) | /base |",
                "|---|---|---|---|---|---|---|"]
        for row in gen_rows:
            out.append(f"| {row['method']} | {row['tokens_per_s']:.1f} | {row['best_tokens_per_s']:.1f} "
                       f"| {row['spread']:.0%} | {row['tokens_per_s'] / ref['lora']['tokens_per_s']:.3f} "
                       f"| {row['best_tokens_per_s'] / ref['lora']['best_tokens_per_s']:.3f} "
                       f"| {row['tokens_per_s'] / ref['base']['tokens_per_s']:.3f} |")
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL, help='load_causal_lm name, or "tiny" (a random 2-layer Llama: tests)')
    p.add_argument("--bases", default="nf4,none", help="quantization of the base, comma-separated: nf4, none")
    p.add_argument("--dropouts", default="0,0.05", help="0: LoRAN folds into W0; 0.05: configs/adapter's default")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1, help="steps before timing (the first compiles LoRAN's kernels)")
    p.add_argument("--steps", type=int, default=20,
                   help="timed steps per arm (a step spreads by 5-25 %% here; 9 steps left the ratio to +-0.05)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gen-repeats", type=int, default=12, help="timed generate() calls per model, interleaved")
    p.add_argument("--no-generation", action="store_true")
    p.add_argument("--no-train", action="store_true", help="generation only")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--json", help="also write the rows and the machine to this file")
    p.add_argument("--quick", action="store_true", help="smoke run: nf4 only, dropout 0, 1 step, 4 new tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.bases, args.dropouts, args.warmup, args.steps = "nf4", "0", 1, 1
        args.new_tokens, args.gen_repeats, args.gen_batch = 4, 1, 1
    return args


def main(argv=None) -> tuple[list[dict], list[dict]]:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = header("bench_train", argv, args.clock)
    train_rows = []
    for quantization in [] if args.no_train else args.bases.split(","):
        train_rows += train_cells(quantization, [float(v) for v in args.dropouts.split(",")], args)
    gen_rows = [] if args.no_generation else generation(args)
    print(report(train_rows, gen_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "train": train_rows, "generation": gen_rows}, f, indent=1)
    return train_rows, gen_rows


if __name__ == "__main__":
    main()
