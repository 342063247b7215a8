"""The run record: one typed, versioned object per cell, written as <results>/runs/<experiment>/<cell>/record.json.

``RunRecord`` is the schema: every field a record can hold, in the order the JSON shows them, each with its type and
the step that fills it (run.py: start, load, train, evaluate). ``SCHEMA`` is written into every record; ``from_dict``
reads every version written so far:

- version 1 (no "schema" key; records up to 2026-12-06): the same fields as version 2, any of them absent. Read as is.
- version 2: ``schema: 2``; every field of the schema present, null where its step did not run.

A key the schema does not know (a later version's, or a note such as scripts/migrate_records.py's "migrated") is kept
in ``extra`` and written back unchanged, so reading and rewriting a record loses nothing.

To add a field: declare it here with a default (None), fill it in the step of run.py that knows it, bump ``SCHEMA``
and say above what changed; readers of older records see the default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 2
STATUSES = ("running", "ok", "failed", "diverged", "preempted")


@dataclass
class RunRecord:
    # --- start: the cell and how it was asked for (run.start_record) ------------------------------------------
    status: str = "running"                        # one of STATUSES; only "ok" records make table rows
    experiment: str | None = None                  # results/runs/<experiment>/
    cell: str | None = None                        # <dataset>.<model>.<adapter>-<activation>.seed<seed>.<hash>
    config_hash: str | None = None                 # loran.pipeline.cells.config_hash
    choices: dict[str, Any] | None = None          # the groups chosen, the Table 2 row and the seed
    overrides: list[str] | None = None             # the command line's Hydra overrides
    command: str | None = None
    identity: dict[str, Any] | None = None         # the result-relevant config, seed symbolic (cells.identity)
    config: dict[str, Any] | None = None           # the whole resolved config
    git: dict[str, Any] | None = None              # {"commit", "dirty"} of the code that ran
    versions: dict[str, Any] | None = None         # package versions
    machine: dict[str, Any] | None = None          # python, platform, CPUs, threads, GPU
    # --- load -----------------------------------------------------------------------------------------------
    n_train: int | None = None
    n_eval: int | None = None
    zero_shot: dict[str, float] | None = None      # metrics of the base model before training (zero_shot: true)
    trainable_params: int | None = None
    total_params: int | None = None
    world_size: int | None = None
    distributed_backend: str | None = None         # set under torch.distributed only
    # --- train ----------------------------------------------------------------------------------------------
    train_time_s: float | None = None
    resumed_from: str | None = None                # the checkpoint this run continued from
    loss_history: list[dict[str, Any]] | None = None
    divergence: dict[str, Any] | None = None       # the first non-finite loss or gradient norm (status "diverged")
    # --- evaluate -------------------------------------------------------------------------------------------
    update_spectrum: dict[str, Any] | None = None  # singular values of the middle adapted layer's update
    eval_time_s: float | None = None
    metrics: dict[str, float] | None = None
    examples: list[dict[str, Any]] | None = None   # a few generated examples, for reading
    eval_split: str | None = None
    predictions: list[dict[str, Any]] | None = None  # every evaluated example: id, prediction, reference, scores
    wall_time_s: float | None = None
    peak_memory_mb: float | None = None
    finished_at: str | None = None                 # ISO time stamp, UTC
    record_path: str | None = None
    # --- a failed run ---------------------------------------------------------------------------------------
    error: str | None = None
    traceback: str | None = None
    # --- the schema and what it does not know ---------------------------------------------------------------
    schema: int = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every field (null where its step has not run), then ``extra``'s keys."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """A record of any schema version (see the module docstring); keys it does not know go to ``extra``."""
        version = data.get("schema", 1)
        if not isinstance(version, int) or not 1 <= version <= SCHEMA:
            raise ValueError(f"record schema {version!r} is not one this version of loran reads (1 to {SCHEMA}); "
                             "update loran")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "schema"}
        return cls(**{k: v for k, v in data.items() if k in known}, schema=SCHEMA,
                   extra={k: v for k, v in data.items() if k not in known and k != "schema"})

    def without_predictions(self) -> RunRecord:
        """The same record without the per-example predictions (smaller, for a disk with little space left)."""
        return dataclasses.replace(self, predictions=None)

