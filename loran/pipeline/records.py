"""Run records: one self-describing JSON per cell; the per-cell CSV is rebuilt from the records.

Both writes are atomic (a temporary file in the same folder, then ``os.replace``), so an interrupted run
or a crash never leaves half a record or half a table. The per-cell CSV <results>/runs/<experiment>_cells.csv
(``cells_csv``; not the summary table <results>/<experiment>.csv that scripts/build_table.py writes) is
a function of the successful records (one row each, rebuilt under a file lock whenever a cell finishes or
is found finished), so a process that dies between its record and its row loses no row. A cell's lock
(``cell_lock``) lets one process at a time run it.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import reprlib
import shlex
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from loran.pipeline.record import RunRecord

log = logging.getLogger(__name__)
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


class CorruptRecord(ValueError):
    """A record file that is not a JSON object (hand-edited, or written by something else)."""


class CellBusy(RuntimeError):
    """Another process holds this cell's lock (it is running the same configuration)."""


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record at `path`, or None when there is none; CorruptRecord (naming the file) when it cannot be read."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as err:  # OSError: a folder, or no permission to read
        raise CorruptRecord(f"{path} is not a valid record ({err}). Move it away (or restore it with git) "
                            "and run the same command again to redo this cell.") from err
    if not isinstance(record, dict):
        raise CorruptRecord(f"{path} holds a {type(record).__name__}, not a record. Move it away (or restore "
                            "it with git) and run the same command again to redo this cell.")
    try:
        RunRecord.from_dict(record)  # a schema version this code reads
    except (ValueError, TypeError) as err:
        raise CorruptRecord(f"{path}: {err}") from err
    return record


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _number(v) for k, v in value.items())


def _choices(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("seed"), int) and not isinstance(value["seed"], bool)
            and all(isinstance(value[k], str) for k in ("dataset", "model", "adapter", "activation") if k in value)
            and isinstance(value.get("row"), (str, type(None))))


_ABSENT = object()

# What a record whose status is "ok" must hold to be tabulated: field -> (check, what is allowed). A record that
# fails one (hand-edited, or written by something else) is "bad": every table leaves it out with a warning naming
# its file, so it never fails another cell. RESULT_FIELDS are what every table reads (Table 2 and the study tables:
# loran.pipeline.tables.load_records); the per-cell CSV (table_row) also reads RUN_FIELDS. A record without
# "identity" (written before cells were hashed) is not bad: Table 2 asks for scripts/migrate_records.py instead.
RESULT_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "choices": (_choices, 'a mapping with an integer "seed" ("dataset", "model", "adapter" and "activation" '
                          'strings, "row" a string or null, where present)'),
    "metrics": (lambda v: _numbers(v) and bool(v), "a non-empty mapping of metric names to numbers"),
    "identity": (lambda v: v is _ABSENT or isinstance(v, dict), "a mapping (the config identity)"),
    "cell": (lambda v: isinstance(v, str), "a string"),
}
RUN_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "experiment": (lambda v: isinstance(v, str), "a string"),
    "trainable_params": (_number, "a number"),
    "train_time_s": (_number, "a number"),
    "wall_time_s": (_number, "a number"),
    "peak_memory_mb": (_number, "a number"),
    "git": (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    "finished_at": (lambda v: isinstance(v, str), "a string (a time stamp)"),
    "zero_shot": (lambda v: v is _ABSENT or v is None or _numbers(v), "a mapping of metric names to numbers"),
}


def record_problem(record: dict[str, Any], fields: dict[str, tuple[Callable[[Any], bool], str]]) -> str | None:
    """Why a successful record cannot be tabulated (the first of `fields` it lacks or holds wrongly), or None."""
    for name, (valid, allowed) in fields.items():
        value = record.get(name, _ABSENT)
        if not valid(value):
            given = "missing" if value is _ABSENT else reprlib.repr(value)
            return f'status is "ok" but {name} is {given}; it must be {allowed}'
    return None


def choices(cfg) -> dict[str, Any]:
    """A record's coordinates: the config groups chosen, the Table 2 row (None outside one) and the seed."""
    return {"dataset": cfg.dataset.name, "model": cfg.model.name, "adapter": cfg.adapter.name,
            "activation": cfg.activation.name, "row": OmegaConf.select(cfg, "row.name"), "seed": cfg.seed}


def table_row(record: RunRecord) -> dict[str, Any]:
    """The run-table row of a finished record: coordinates, hash, metrics, cost."""
    return {**record.choices, "experiment": record.experiment, "cell": record.cell, "config_hash": record.config_hash,
            **{k: round(v, 6) for k, v in record.metrics.items()},
            **{f"zero_shot_{k}": round(v, 6) for k, v in (record.zero_shot or {}).items()},
            "trainable_params": record.trainable_params, "train_time_s": round(record.train_time_s, 1),
            "wall_time_s": round(record.wall_time_s, 1), "peak_memory_mb": round(record.peak_memory_mb, 1),
            "git_commit": (record.git or {}).get("commit"), "finished_at": record.finished_at}


def cells_csv(results_dir: str | Path, experiment: str) -> Path:
    """The per-cell CSV of an experiment, one row per successful record: <results_dir>/runs/<experiment>_cells.csv."""
    return Path(results_dir) / "runs" / f"{experiment}_cells.csv"


def rebuild_table(runs_dir: str | Path, table: str | Path) -> int:
    """Write the per-cell CSV `table` from every successful record under runs_dir (oldest first); return its row count.

    Records are read under the table's lock, so of several cells finishing at once the last writer sees them
    all. An unreadable record, and a bad one (``record_problem``), is left out with a warning naming its file: it
    must not fail another cell's run. (The Table 2 builder refuses an unreadable record instead.)
    """
    table = Path(table)
    table.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(table) + ".lock"):
        rows = []
        for path in sorted(Path(runs_dir).glob("*/record.json")):
            try:
                record = read_record(path)
            except CorruptRecord as err:
                log.warning("per-cell CSV: %s", err)
                continue
            if record.get("status") != "ok":
                continue
            if problem := record_problem(record, {**RESULT_FIELDS, **RUN_FIELDS}):
                log.warning("per-cell CSV: %s left out: %s", path, problem)
                continue
            rows.append(table_row(RunRecord.from_dict(record)))
        rows.sort(key=lambda r: (str(r["finished_at"]), r["cell"]))
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        with tempfile.TemporaryFile("w+", newline="") as buf:
            writer = csv.DictWriter(buf, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
            buf.seek(0)
            _atomic_write(table, buf.read())
    return len(rows)


def with_command(markdown: str, script: str, argv: Sequence[str]) -> str:
    """A results table with, under its title, the command that wrote it: rerun that command to rebuild the file from
    its records."""
    title, _, rest = markdown.partition("\n")
    command = shlex.join(["python", script, *argv])
    return f"{title}\n\nBuilt from the run records by `{command}`.\n{rest}"


@contextmanager
def cell_lock(path: str | Path, discard_on: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Hold the cell's lock for the block; CellBusy (naming the lock file) when another process holds it.

    The lock is an flock on `path`: the kernel releases it when its process dies, so no stale lock survives
    a crash or a kill -9. When the block raises one of `discard_on` (a configuration error found after
    loading), the lock file and the folders made for it are removed again, so such a run leaves no trace.
    """
    path = Path(path)
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout as err:
        raise CellBusy(f"another process is running this cell (it holds {path}); wait for it to finish, "
                       "then run the same command again (the finished cell is then skipped)") from err
    try:
        yield
    except discard_on:
        path.unlink(missing_ok=True)
        for folder in made:  # innermost first
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    finally:
        lock.release()


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def git_revision(cwd: str | Path | None = None) -> dict[str, Any]:
    """Commit of the checkout the running `loran` comes from (or of cwd) and whether its tracked files outside
    results/ have uncommitted changes (None outside a git checkout). results/ is left out because a grid writes its
    own tracked tables there: counting them, every cell after a grid's first would call its code dirty."""
    cwd = cwd if cwd is not None else Path(__file__).resolve().parents[2]

    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ":(top,exclude)results").stdout.strip())
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
