"""Shared test set-up: no network, caches in a temporary folder, deterministic CPU threads; and the helpers several
test files use (import them with `from conftest import ...`): the composed train config (cfg_of), a config group's
options, the runner's tiny CPU cell (SMALL), a script run in this process (run_script), and fixtures for a working
folder, eager kernels and the tiny model."""
import os
import tempfile

# Set before transformers/datasets are imported anywhere: they read these at import time.
_CACHE = tempfile.mkdtemp(prefix="loran-test-hf-")
os.environ.setdefault("HF_HOME", _CACHE)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE, "datasets"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, not two per core
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import runpy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PY = sys.executable
# The runner's tiny CPU cell: the tiny model, a few examples, two optimizer steps, a checkpoint after each.
SMALL = ["model=tiny", "dataset=bbc_headlines", "dataset.n_train=8", "dataset.n_eval=4", "trainer.args.max_steps=2",
         "trainer.args.save_steps=1", "trainer.args.logging_steps=1", "trainer.eval_batch_size=4",
         "trainer.args.per_device_train_batch_size=2", "zero_shot=false", "logger=none"]


def cfg_of(*overrides: str, results=None, configs: Path = CONFIGS):
    """configs/train.yaml composed with these overrides, as train.py composes it (results: the results_dir; configs:
    another copy of the config tree)."""
    from hydra import compose, initialize_config_dir  # the pipeline's extra: the adapter-only CI job has no Hydra

    from loran.pipeline.cells import register_resolver

    register_resolver()  # the schema and ${loran.config_hash:} (the cell name), registered by the entry points
    with initialize_config_dir(str(configs), version_base="1.3"):
        return compose("train", overrides=[*overrides, *([f"results_dir={results}"] if results else [])])


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python <script> <args>` from the repository root, run in this process: the same `__main__` block, exit code,
    stdout and stderr as the subprocess, without its 5-8 s of interpreter start and imports (torch, PEFT). A test per
    script still runs it as a subprocess, for the entry point itself."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, cwd, root = sys.argv, os.getcwd(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        sys.argv = [script, *map(str, args)]
        os.chdir(REPO)
        root.handlers = []  # as in a new interpreter: the script's logging.basicConfig writes to its stderr
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO / script), run_name="__main__")
            except SystemExit as stop:  # as the interpreter maps it: None -> 0, a message -> stderr and 1
                if stop.code is None or isinstance(stop.code, int):
                    code = stop.code or 0
                else:
                    print(stop.code, file=sys.stderr)
                    code = 1
            except Exception:  # noqa: BLE001 - an uncaught exception: the traceback and exit code 1, as a subprocess
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
        root.handlers, root.level = handlers, level
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def options(group: str) -> list[str]:
    """The options of a config group (configs/<group>/*.yaml), sorted."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def nothing_under(folder: Path) -> bool:
    return not folder.exists() or not any(folder.rglob("*"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs/ (checkpoints) lands here
    return tmp_path


@pytest.fixture
def eager(monkeypatch):
    """The element-wise kernels run eagerly (no torch.compile)."""
    import loran.autograd as la

    monkeypatch.setattr(la, "COMPILE", "never")


@pytest.fixture(scope="module")
def tiny():
    """The tiny Llama and its tokenizer (loran.pipeline.base_models.tiny_causal_lm), once per test module."""
    from loran.pipeline.base_models import tiny_causal_lm

    return tiny_causal_lm(seed=0)


@pytest.fixture
def noisy_model(tiny, monkeypatch):
    """The tiny Llama with a strong LoRAN update behind dropout 0.9, left in train mode."""
    import copy

    import torch

    import loran.autograd as la
    from loran import LoranConfig, get_loran_model, loran_layers

    monkeypatch.setattr(la, "COMPILE", "never")
    base, tokenizer = tiny
    model = get_loran_model(copy.deepcopy(base), LoranConfig(r=4, lora_alpha=32, lora_dropout=0.9,
                                                             target_modules=["q_proj", "v_proj"], activation="tanh"))
    gen = torch.Generator().manual_seed(3)
    for _, layer in loran_layers(model):
        for lin in (layer.lora_A["default"], layer.lora_B["default"]):
            lin.weight.data = torch.randn(lin.weight.shape, generator=gen)
    return model.train(), tokenizer


def _write_fake_record(runs: Path, adapter: str, activation: str, dataset: str, seed: int, metrics: dict,
                       status: str = "ok", row: str | None = None, **extra) -> dict:
    """A run record as run_cell writes it (only the fields the tables and the notebook read). Unless `predictions`
    is given, each of 4 examples scores each metric's value (no example-to-example spread)."""
    cell = f"{dataset}.tiny.{row or f'{adapter}-{activation}'}.seed{seed}"
    identity = {"dataset": {"name": dataset}, "adapter": {"name": adapter}, "activation": {"name": activation},
                "seed": "<seed>", "trainer": {"args": {"learning_rate": 1e-3}}}
    record = {"status": status, "cell": cell, "metrics": metrics if status == "ok" else None,
              "choices": {"dataset": dataset, "model": "tiny", "adapter": adapter, "activation": activation,
                          "row": row, "seed": seed}, "identity": identity}
    if status == "ok":
        record["predictions"] = [{"id": f"e{i}", "prediction": "text", **metrics} for i in range(4)]
    record.update(extra)
    (runs / cell).mkdir(parents=True)
    (runs / cell / "record.json").write_text(json.dumps(record))
    return record


@pytest.fixture
def write_fake_record():
    """Write a fake run record: write_fake_record(runs_dir, adapter, activation, dataset, seed, metrics, ...)."""
    return _write_fake_record
