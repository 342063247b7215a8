"""One cell of the grid, end to end: check, load, (zero-shot) evaluate, train, evaluate, record.

``run_cell(cfg)`` is what ``python train.py`` calls with the Hydra config. Every object is built from the
config with ``hydra.utils.instantiate``; this file orders the steps and writes the outputs:
  - <results_dir>/runs/<experiment>/<cell>/record.json  (written last; a failed or diverged run records why)
  - <results_dir>/runs/<experiment>_cells.csv           (rebuilt from the successful records: one row each)
  - a W&B run (group = experiment), online when wandb finds a key, else offline with a warning
    (loran/pipeline/tracking.py)
The cell's name carries the hash of its result-relevant config (loran/pipeline/cells.py). Training state lives in
the cell's output folder (outputs/<experiment>/<cell>/), so running the same command again resumes from the
last complete checkpoint, and a cell whose record says "ok" (or "diverged") is not run again. One process runs a
cell at a time.

The contract in full (tests/test_run.py checks it; the README has the summary):
- Refused while Hydra composes (exit code 2 through train.py, the message naming the field's full key, no folder
  made): a value of the wrong type or outside a closed choice (dataset.eval_split), by the schema's types
  (loran/pipeline/schema.py).
- Checked before anything is loaded (exit code 2, nothing written under results/; check_config's checks, in
  loran/pipeline/checks.py, run for a single run before Hydra makes its output folder): unknown keys anywhere
  (`+anything=1`; a typo in trainer.args gets a "did you mean"), ranges (seed in [0, 2**32), zero_shot a
  boolean, positive batch sizes, accumulation steps and learning rate, max_steps a positive integer or -1, LoRA's r /
  lora_alpha / lora_dropout by the adapter's own rules), closed choices (model.load.quantization, model.load.dtype),
  an empty model.target_modules, folder names (experiment_name=../x, /tmp/x or a name with / are refused, and so is
  an experiment_name or cell name too long for a file name), positive prompt token budgets, an unwritable
  results_dir, a second checkpointing switch in trainer.args, and the adapter's config itself (its own checks: the
  activation and its parameters); then (in run_cell) TrainingArguments. Target modules missing from the
  model, dataset columns and a dataset.n_train / n_eval above its split's size are checked right after loading, also
  with exit code 2 and nothing under results/.
- Not a result, not a row: zero training steps are refused up front; a non-finite loss or gradient norm stops
  training at the first logged step that shows it (NaN stays NaN in the record's history; no checkpoint of the NaN
  weights), the record says "diverged", exit code 3.
- One process per cell: a second launch of a running cell stops at once (exit code 4) without touching its record;
  the lock (<results_dir>/runs/<experiment>/<cell>.lock, git-ignored) is an flock, released if its process dies.
- Skip and resume: a cell whose record says "ok" is skipped (and its row restored if a crash lost it); one whose
  record says "diverged" is not run again either (exit code 3 again, the message naming the record: a divergence is a
  result; skip_existing=false runs it again); otherwise (no record, or "failed")
  training resumes from the newest complete checkpoint (every file present and readable; a truncated newest one is
  moved aside as checkpoint-N.incomplete with a warning).
- Signals: SIGTERM, SIGUSR1/2 and Ctrl-C save a checkpoint at the end of the current step and exit with 128 + the
  signal (143, 130); the same command resumes. During an evaluation they stop it before the next generation batch,
  with the same exit code and no record; the same command redoes it from the final checkpoint. A second Ctrl-C stops
  at once.
- A corrupt record.json or outputs/<experiment>/<cell>/cell.json stops the cell (exit code 2) naming the file and
  how to recover.
- A full disk (a checkpoint, the record or the table cannot be written: ENOSPC) ends the run with NoSpace, one line
  naming the path and "no space left", and a failed record saying so when that can still be written.
  scripts/build_table.py refuses to pool records whose configs differ in more than the seed, naming the keys.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import shlex
import shutil
import sys
import time
import traceback
from contextlib import nullcontext
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from loran.pipeline.cells import config_hash, identity
from loran.pipeline.checks import (
    ConfigError, build_peft_config, cause, check_config, check_target_modules, to_plain,
)
from loran.pipeline.data import eval_dataset, subset, train_dataset, validate_columns
from loran.pipeline.evaluation import evaluate
from loran.pipeline.generation import GenerationStopped, stop_generation_when
from loran.pipeline.preemption import Preempted, PreemptionCallback
from loran.pipeline.record import RunRecord
from loran.pipeline.records import (
    RESULT_FIELDS, RUN_FIELDS, CorruptRecord, cell_lock, cells_csv, choices, environment, git_revision, read_record,
    rebuild_table, record_problem, write_record,
)
from loran.pipeline.spectrum import update_spectrum
from loran.pipeline.tracking import finish_wandb, start_wandb
from loran.pipeline.training import (
    build_trainer, claim_out_dir, last_checkpoint, loss_history, train_or_load, training_args,
)

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """Training met a non-finite loss or gradient norm; the record says where, and the cell gets no row."""


class NoSpace(RuntimeError):
    """A write failed because its disk is full; the message names the path and what to do."""


NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"; safetensors and others wrap it in their own error
# torch.save reports a short write only as "[enforce fail at inline_container.cc:...] unexpected pos ...": then the
# free space left on the disk tells whether it was full
TORCH_WRITER = ("inline_container", "PytorchStreamWriter")
FULL_BELOW_BYTES = 2**20


def _chain(err: BaseException | None):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _says_no_space(err: BaseException, path: Path) -> bool:
    """Whether err (or an error it came from) is ENOSPC, or torch's writer failing on a disk with no space left."""
    if any((isinstance(e, OSError) and e.errno == errno.ENOSPC) or NO_SPACE in str(e) for e in _chain(err)):
        return True
    if any(mark in str(e) for e in _chain(err) for mark in TORCH_WRITER):
        free = _free_bytes(path)
        return free is not None and free < FULL_BELOW_BYTES
    return False


def _free_bytes(path: Path) -> int | None:
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def no_space(err: BaseException, path: Path, then: str = "run the same command again") -> NoSpace | None:
    """NoSpace naming the file (the error's, else `path`) when `err` comes from a full disk, else None."""
    if not _says_no_space(err, path):
        return None
    where = getattr(err, "filename", None) or path
    said = (str(err).splitlines() or [""])[0][:200]
    return NoSpace(f"no space left on the device writing {where} ({type(err).__name__}: {said}); free "
                   f"space there (df -h {Path(path).absolute().parent}) and {then}")


def cell_paths(cfg: DictConfig) -> dict[str, Path]:
    """Where this cell's record, lock, per-cell CSV and working folder live."""
    runs = Path(cfg.results_dir) / "runs"
    try:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside a Hydra app (tests composing configs)
        out_dir = Path("outputs") / cfg.experiment_name / cfg.cell
    return {"record": runs / cfg.experiment_name / cfg.cell / "record.json",
            "lock": runs / cfg.experiment_name / f"{cfg.cell}.lock",
            "runs": runs / cfg.experiment_name,
            "cells_csv": cells_csv(cfg.results_dir, cfg.experiment_name),
            "out_dir": out_dir}


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def build_training_args(cfg: DictConfig, out_dir: Path):
    """TrainingArguments, built before anything is loaded; a bad value becomes a ConfigError."""
    try:
        return training_args(cfg, out_dir)
    except (ValueError, TypeError, InstantiationException) as err:
        raise ConfigError(f"trainer.args: {cause(err)}") from err


def check_sizes(cfg: DictConfig, raw) -> None:
    """dataset.n_train and n_eval fit their splits: a larger number would be cut silently, while the cell's name and
    hash keep the number asked for."""
    for field, split in (("n_train", "train"), ("n_eval", cfg.dataset.eval_split)):
        asked, size = cfg.dataset[field], len(raw[split])
        if asked is not None and asked > size:
            raise ConfigError(f"dataset.{field}={asked} is more than the {size} examples of dataset="
                              f"{cfg.dataset.name}'s {split} split; set at most {size}, or null for the whole split")


def load_data(cfg: DictConfig, tokenizer):
    """Tokenised train split and prompt/target eval split, after checking the dataset's fields, splits and sizes."""
    try:
        spec = instantiate(cfg.dataset.prompt, _convert_="all")
        raw = instantiate(cfg.dataset.loader, _convert_="all")
        validate_columns(raw, spec)
    except (ValueError, TypeError, KeyError, InstantiationException) as err:
        raise ConfigError(f"dataset={cfg.dataset.name}: {cause(err)}") from err
    check_sizes(cfg, raw)
    train = train_dataset(subset(raw["train"], cfg.dataset.n_train, cfg.seed), spec, tokenizer)
    evaluated = raw[cfg.dataset.eval_split]  # "validation" to choose settings, "test" to report them
    test = eval_dataset(subset(evaluated, cfg.dataset.n_eval, 0), spec, tokenizer)  # same examples for every seed
    return spec, train, test


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that evaluates and writes results."""
    return int(os.environ.get("RANK", "0")) == 0


def evaluate_or_stop(preemption: PreemptionCallback, out_dir: Path, during: str, *args, **kwargs) -> dict[str, Any]:
    """evaluate(*args, **kwargs), stopped before its next generation batch by a termination signal (Preempted)."""
    try:
        with stop_generation_when(preemption.requested):
            return evaluate(*args, **kwargs)
    except GenerationStopped:
        preemption.handover(last_checkpoint(out_dir), during=during)
        raise  # handover raises Preempted; this only satisfies the reader


def write_failed(path: Path, record: RunRecord) -> None:
    """Write a failed (or diverged) record if the disk allows it; an error doing so is logged, not raised, so the
    run's own error is the one reported."""
    try:
        write_record(path, record.to_dict())
    except OSError as err:
        log.error("the %s record could not be written to %s (%s: %s)", record.status, path, type(err).__name__, err)


def finished(paths: dict[str, Path], cfg: DictConfig) -> dict[str, Any] | None:
    """The cell's successful record when it should be skipped (its row is restored if a crash lost it); Diverged when
    its record says it diverged: that is a result (a grid counts the run, its learning rate not eligible), and running
    it again until it does not diverge would choose among outcomes. A failed run (an error, not a result) runs again."""
    try:
        existing = read_record(paths["record"])
    except CorruptRecord as err:
        raise ConfigError(str(err)) from err
    status = RunRecord.from_dict(existing).status if existing else None
    if cfg.skip_existing and status == "diverged":
        step = (existing.get("divergence") or {}).get("step")
        raise Diverged(f"cell {cfg.cell} diverged before ({f'at step {step}; ' if step else ''}{paths['record']}); a "
                       "diverged run is a result and is not run again: skip_existing=false, or move the record away, "
                       "to run it again")
    if not (cfg.skip_existing and status == "ok"):
        return None
    if problem := record_problem(existing, {**RESULT_FIELDS, **RUN_FIELDS}):
        raise ConfigError(f"{paths['record']} is not a usable record ({problem}): move it away to run the cell again")
    if is_main_process():
        rebuild_table(paths["runs"], paths["cells_csv"])
    log.info("cell %s already done (%s); skipping", cfg.cell, paths["record"])
    return existing


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    """Run one cell and return its record (or the existing record when the cell is already done)."""
    check_config(cfg)
    paths = cell_paths(cfg)
    peft_config = build_peft_config(cfg)
    args = build_training_args(cfg, paths["out_dir"])
    if done := finished(paths, cfg):
        return done
    main = is_main_process()
    with cell_lock(paths["lock"], discard_on=(ConfigError,)) if main else nullcontext():
        if done := finished(paths, cfg):  # another process finished it while this one waited to start
            return done
        try:
            claim_out_dir(paths["out_dir"], cfg.cell, config_hash(cfg))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        except OSError as err:
            if full := no_space(err, paths["out_dir"] / "cell.json"):
                raise full from err
            raise
        return _train_and_record(cfg, paths, peft_config, args, main)


@dataclass
class Loaded:
    """What the load step makes: the model, its tokenizer, the data and how to score it."""

    model: Any
    tokenizer: Any
    train: Any
    test: Any
    metric: Callable
    eval_kwargs: dict[str, Any]


def start_record(cfg: DictConfig, paths: dict[str, Path]) -> RunRecord:
    """The record of a cell about to run: what it is, how it was asked for, the code and the machine."""
    return RunRecord(experiment=cfg.experiment_name, cell=cfg.cell, config_hash=config_hash(cfg),
                     choices=choices(cfg), overrides=_overrides(),
                     command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), identity=identity(cfg),
                     config=to_plain(cfg), git=git_revision(), **environment(), record_path=str(paths["record"]))


def load(cfg: DictConfig, peft_config, record: RunRecord) -> Loaded:
    """The base model, its tokenizer and the data, checked against the config (ConfigError naming the field)."""
    model, tokenizer = instantiate(cfg.model.load, _convert_="all")
    check_target_modules(model, peft_config.target_modules, cfg.model.name)
    spec, train, test = load_data(cfg, tokenizer)
    record.n_train, record.n_eval = len(train), len(test)
    return Loaded(model, tokenizer, train, test, instantiate(cfg.dataset.metric, _convert_="all"),
                  {"max_new_tokens": spec.max_target_tokens, "batch_size": cfg.trainer.eval_batch_size})


def train(cfg: DictConfig, paths: dict[str, Path], args, peft_config, data: Loaded, record: RunRecord,
          preemption: PreemptionCallback, wandb_run):
    """The adapter, trained (or resumed from the newest checkpoint, or loaded when training had finished); Diverged
    when the loss or the gradient norm stopped being finite."""
    trainer = build_trainer(args, data.model, peft_config, data.tokenizer, data.train, wandb_run=wandb_run)
    trainer.add_callback(preemption)
    record.trainable_params, record.total_params = trainer.model.get_nb_trainable_parameters()
    record.world_size = trainer.args.world_size
    if torch.distributed.is_initialized():
        record.distributed_backend = torch.distributed.get_backend()
    resume = last_checkpoint(paths["out_dir"]) if cfg.trainer.resume else None
    if resume:
        log.info("resuming %s from checkpoint %s", cfg.cell, resume)
    started = time.time()
    train_or_load(trainer, resume)
    if preemption.signum is not None:
        preemption.handover(last_checkpoint(paths["out_dir"]))
    record.train_time_s, record.resumed_from = time.time() - started, resume
    record.loss_history = loss_history(trainer.state.log_history)
    if trainer.divergence.found:
        record.divergence = trainer.divergence.found
        raise Diverged(f"training diverged at step {trainer.divergence.found['step']}: "
                       f"{trainer.divergence.found}; lower trainer.args.learning_rate or check the data")
    return trainer


def evaluate_trained(cfg: DictConfig, paths: dict[str, Path], trainer, data: Loaded, record: RunRecord,
                     preemption: PreemptionCallback) -> None:
    """The trained model's metrics, its per-example predictions and its update's spectrum, into the record."""
    started = time.time()
    result = evaluate_or_stop(preemption, paths["out_dir"], "final evaluation", trainer.model, data.tokenizer,
                              data.test, data.metric, **data.eval_kwargs)
    record.update_spectrum = update_spectrum(trainer.model)
    record.eval_time_s, record.metrics, record.examples = time.time() - started, result["metrics"], result["examples"]
    record.eval_split, record.predictions = cfg.dataset.eval_split, result["predictions"]


def _train_and_record(cfg: DictConfig, paths: dict[str, Path], peft_config, args, main: bool) -> dict[str, Any]:
    """start, load, (zero-shot evaluate), train, evaluate, write: the record is written here and in write_failed."""
    torch.manual_seed(cfg.seed)
    started = time.time()
    record = start_record(cfg, paths)
    wandb_run = None
    preemption = PreemptionCallback().install()
    try:
        data = load(cfg, peft_config, record)
        wandb_run = start_wandb(cfg, paths["out_dir"], record.to_dict()) if main else None
        if cfg.zero_shot and main:
            record.zero_shot = evaluate_or_stop(preemption, paths["out_dir"], "zero-shot evaluation", data.model,
                                                data.tokenizer, data.test, data.metric, **data.eval_kwargs)["metrics"]
            log.info("zero-shot %s", record.zero_shot)
        trainer = train(cfg, paths, args, peft_config, data, record, preemption, wandb_run)
        if not main:
            return record.to_dict()  # rank 0 evaluates and writes the results
        evaluate_trained(cfg, paths, trainer, data, record, preemption)
        record.status, record.wall_time_s, record.peak_memory_mb = "ok", time.time() - started, peak_memory_mb()
        record.finished_at = datetime.now(timezone.utc).isoformat()
    except Preempted:
        finish_wandb(wandb_run, {**record.to_dict(), "status": "preempted"})
        raise
    except ConfigError:
        raise  # bad input: stopped before training, nothing written
    except Exception as err:
        full = no_space(err, paths["out_dir"])  # a checkpoint (or another file of the cell's folder) did not fit
        record.status = "diverged" if isinstance(err, Diverged) else "failed"
        record.error = str(full) if full else f"{type(err).__name__}: {err}"
        record.traceback, record.wall_time_s = traceback.format_exc(), time.time() - started
        if main:
            write_failed(paths["record"], record)
            finish_wandb(wandb_run, record.to_dict())
        if full:
            raise full from err
        raise
    finally:
        preemption.restore()
    _record_ok(paths, record, wandb_run)
    log.info("%s: %s", cfg.cell, record.metrics)
    return record.to_dict()


def _record_ok(paths: dict[str, Path], record: RunRecord, wandb_run) -> None:
    """Write the successful record and the cell's table row; a full disk fails the cell (NoSpace) instead."""
    try:
        write_record(paths["record"], record.to_dict())
    except OSError as err:
        if not (full := no_space(err, paths["record"])):
            raise
        failed = record.without_predictions()  # smaller: it may still fit
        failed.status, failed.error = "failed", str(full)
        write_failed(paths["record"], failed)
        finish_wandb(wandb_run, failed.to_dict())
        raise full from err
    try:
        rebuild_table(paths["runs"], paths["cells_csv"])
    except OSError as err:
        then = "run the same command again to add its row (the record is written; the cell is not run again)"
        if full := no_space(err, paths["cells_csv"], then):
            raise full from err
        raise
    finally:
        finish_wandb(wandb_run, record.to_dict())
