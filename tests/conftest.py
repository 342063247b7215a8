"""Shared test set-up: no network, caches in a temporary folder, deterministic CPU threads."""
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

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _write_fake_record(runs: Path, adapter: str, activation: str, dataset: str, seed: int, metrics: dict,
                       status: str = "ok", row: str | None = None, **extra) -> dict:
    """A run record as run_cell writes it (only the fields the tables and the notebook read)."""
    cell = f"{dataset}.tiny.{row or f'{adapter}-{activation}'}.seed{seed}"
    identity = {"dataset": {"name": dataset}, "adapter": {"name": adapter}, "activation": {"name": activation},
                "seed": "<seed>", "trainer": {"args": {"learning_rate": 1e-3}}}
    record = {"status": status, "cell": cell, "metrics": metrics if status == "ok" else None,
              "choices": {"dataset": dataset, "model": "tiny", "adapter": adapter, "activation": activation,
                          "row": row, "seed": seed}, "identity": identity, **extra}
    (runs / cell).mkdir(parents=True)
    (runs / cell / "record.json").write_text(json.dumps(record))
    return record


@pytest.fixture
def write_fake_record():
    """Write a fake run record: write_fake_record(runs_dir, adapter, activation, dataset, seed, metrics, ...)."""
    return _write_fake_record


@pytest.fixture
def eager(monkeypatch):
    """The element-wise kernels run eagerly (no torch.compile)."""
    import loran.autograd as la

    monkeypatch.setattr(la, "COMPILE", "never")
