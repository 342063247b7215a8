"""Run records: one self-describing JSON per cell, and CSV tables that gain exactly one whole row per run.

Both writes are atomic (a temporary file in the same folder, then ``os.replace``), so an interrupted run
or a crash never leaves half a record or half a table; CSV appends take a file lock, so any number of
cells finishing at once add one row each.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "hydra-core", "wandb", "rouge-score")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Write `record` as JSON at `path`, atomically."""
    _atomic_write(Path(path), json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record at `path`, or None when there is none."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Add `row` to the CSV table at `path` under a lock; new columns extend the header of every row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        rows, columns = [], []
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                columns, rows = list(reader.fieldnames or []), list(reader)
        columns += [k for k in row if k not in columns]
        rows.append({k: _cell(v) for k, v in row.items()})
        with tempfile.TemporaryFile("w+", newline="") as buf:
            writer = csv.DictWriter(buf, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
            buf.seek(0)
            _atomic_write(path, buf.read())


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def git_revision(cwd: str | Path | None = None) -> dict[str, Any]:
    """Commit hash and whether the tree has uncommitted changes (None outside a git checkout)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def environment() -> dict[str, Any]:
    """Package versions and the machine, for the record."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    machine = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return {"versions": versions, "machine": machine}
