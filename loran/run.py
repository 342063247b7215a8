"""One cell of the grid, end to end: check, load, (zero-shot) evaluate, train, evaluate, record.

``run_cell(cfg)`` is what ``python train.py`` calls with the Hydra config. Every object is built from the
config with ``hydra.utils.instantiate``; this file only orders the steps and writes the outputs:
  - <results_dir>/runs/<experiment>/<cell>/record.json  (written last; a failed run records its error)
  - <results_dir>/runs/<experiment>.csv                 (one row per successful run, never for a failure)
  - a W&B run (group = experiment), offline when no API key is set
Training state lives under the cell's output folder (outputs/<experiment>/<cell>/), so running the same
command again resumes from the last checkpoint, and a cell whose record exists is skipped.
"""
from __future__ import annotations

import logging
import os
import resource
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from loran.checks import ConfigError, check_activation_choice, check_target_modules, check_types, to_plain
from loran.data import subset, train_dataset, eval_dataset, validate_columns
from loran.evaluation import evaluate
from loran.preemption import Preempted, PreemptionCallback
from loran.spectrum import update_spectrum
from loran.records import append_row, environment, git_revision, read_record, write_record
from loran.training import build_trainer, last_checkpoint

log = logging.getLogger(__name__)


def cell_paths(cfg: DictConfig) -> dict[str, Path]:
    """Where this cell's record, CSV table and working folder live."""
    results = Path(cfg.results_dir)
    try:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside a Hydra app (tests composing configs)
        out_dir = Path("outputs") / cfg.experiment_name / cfg.cell
    return {"record": results / "runs" / cfg.experiment_name / cfg.cell / "record.json",
            "table": results / "runs" / f"{cfg.experiment_name}.csv",
            "out_dir": out_dir}


def choices(cfg: DictConfig) -> dict[str, Any]:
    """The cell's coordinates."""
    return {"dataset": cfg.dataset.name, "model": cfg.model.name, "adapter": cfg.adapter.name,
            "activation": cfg.activation.name, "seed": cfg.seed}


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def cause(err: Exception) -> str:
    """The message of the error a Hydra instantiation wrapped (or of `err` itself)."""
    return str(err.__cause__) if isinstance(err, InstantiationException) and err.__cause__ else str(err)


def build_peft_config(cfg: DictConfig):
    """The adapter's PEFT config (LoraConfig or LoranConfig); a bad value becomes a ConfigError."""
    try:
        return instantiate(cfg.adapter.peft, target_modules=list(cfg.model.target_modules), _convert_="all")
    except (ValueError, TypeError, InstantiationException) as err:
        raise ConfigError(f"adapter={cfg.adapter.name}, activation={cfg.activation.name}: {cause(err)}") from err


def load_data(cfg: DictConfig, tokenizer):
    """Tokenised train split and prompt/target eval split, after checking the dataset's fields and splits."""
    try:
        spec = instantiate(cfg.dataset.prompt, _convert_="all")
        raw = instantiate(cfg.dataset.loader, _convert_="all")
        validate_columns(raw, spec)
    except (ValueError, TypeError, KeyError, InstantiationException) as err:
        raise ConfigError(f"dataset={cfg.dataset.name}: {cause(err)}") from err
    train = train_dataset(subset(raw["train"], cfg.dataset.n_train, cfg.seed), spec, tokenizer)
    test = eval_dataset(subset(raw["test"], cfg.dataset.n_eval, 0), spec, tokenizer)  # same eval set for all seeds
    return spec, train, test


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that evaluates and writes results."""
    return int(os.environ.get("RANK", "0")) == 0


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    """Run one cell and return its record (or the existing record when the cell is already done)."""
    paths = cell_paths(cfg)
    existing = read_record(paths["record"])
    if cfg.skip_existing and existing and existing.get("status") == "ok":
        log.info("cell %s already done (%s); skipping", cfg.cell, paths["record"])
        return existing

    check_types(cfg)
    check_activation_choice(cfg)
    peft_config = build_peft_config(cfg)
    torch.manual_seed(cfg.seed)
    started = time.time()
    main = is_main_process()
    record: dict[str, Any] = {
        "status": "running", "experiment": cfg.experiment_name, "cell": cfg.cell, "choices": choices(cfg),
        "overrides": _overrides(), "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": to_plain(cfg), "git": git_revision(), **environment(),
    }
    wandb_run = None
    preemption = PreemptionCallback().install()
    try:
        model, tokenizer = instantiate(cfg.model.load, _convert_="all")
        check_target_modules(model, peft_config.target_modules, cfg.model.name)
        spec, train, test = load_data(cfg, tokenizer)
        metric = instantiate(cfg.dataset.metric, _convert_="all")
        eval_kwargs = {"max_new_tokens": spec.max_target_tokens, "batch_size": cfg.trainer.eval_batch_size}
        record.update(n_train=len(train), n_eval=len(test))
        wandb_run = start_wandb(cfg, paths["out_dir"], record) if main else None
        if cfg.zero_shot and main:
            record["zero_shot"] = evaluate(model, tokenizer, test, metric, **eval_kwargs)["metrics"]
            log.info("zero-shot %s", record["zero_shot"])
        trainer = build_trainer(cfg, model, peft_config, tokenizer, train, paths["out_dir"])
        trainer.add_callback(preemption)
        record["trainable_params"], record["total_params"] = trainer.model.get_nb_trainable_parameters()
        record["world_size"] = trainer.args.world_size
        if torch.distributed.is_initialized():
            record["distributed_backend"] = torch.distributed.get_backend()
        resume = last_checkpoint(paths["out_dir"]) if cfg.trainer.resume else None
        if resume:
            log.info("resuming %s from checkpoint %s", cfg.cell, resume)
        t_train = time.time()
        trainer.train(resume_from_checkpoint=resume)
        if preemption.signum is not None:
            preemption.handover(last_checkpoint(paths["out_dir"]))
        record.update(train_time_s=time.time() - t_train, resumed_from=resume,
                      loss_history=[{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history
                                    if "loss" in e])
        if not main:
            return record  # rank 0 evaluates and writes the results
        t_eval = time.time()
        result = evaluate(trainer.model, tokenizer, test, metric, **eval_kwargs)
        record["update_spectrum"] = update_spectrum(trainer.model)
        record.update(eval_time_s=time.time() - t_eval, metrics=result["metrics"], examples=result["examples"][:5],
                      status="ok", wall_time_s=time.time() - started, peak_memory_mb=peak_memory_mb(),
                      finished_at=datetime.now(timezone.utc).isoformat(), record_path=str(paths["record"]))
    except Preempted:
        finish_wandb(wandb_run, {**record, "status": "preempted"})
        raise
    except ConfigError:
        raise  # bad input: stopped before training, nothing written
    except Exception as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(),
                      wall_time_s=time.time() - started)
        if main:
            write_record(paths["record"], record)
            finish_wandb(wandb_run, record)
        raise
    finally:
        preemption.restore()
    write_record(paths["record"], record)
    append_row(paths["table"], table_row(record))
    finish_wandb(wandb_run, record)
    log.info("%s: %s", cfg.cell, record["metrics"])
    return record


def table_row(record: dict[str, Any]) -> dict[str, Any]:
    """The CSV row of a finished record: coordinates, metrics, cost."""
    return {**record["choices"], "experiment": record["experiment"], "cell": record["cell"],
            **{k: round(v, 6) for k, v in record["metrics"].items()},
            **{f"zero_shot_{k}": round(v, 6) for k, v in (record.get("zero_shot") or {}).items()},
            "trainable_params": record["trainable_params"], "train_time_s": round(record["train_time_s"], 1),
            "wall_time_s": round(record["wall_time_s"], 1), "peak_memory_mb": round(record["peak_memory_mb"], 1),
            "git_commit": (record["git"] or {}).get("commit"), "finished_at": record["finished_at"]}


def start_wandb(cfg: DictConfig, out_dir: Path, record: dict[str, Any]):
    """A W&B run for this cell (offline without an API key), or None when the logger is off."""
    if "wandb" not in list(cfg.logger.report_to) or os.environ.get("WANDB_MODE") == "disabled":
        return None
    import wandb

    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"  # sync later with `wandb sync <dir>`
    out_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.logger.project, group=cfg.logger.group, tags=list(cfg.logger.tags),
                      name=cfg.cell, config={**record["choices"], **record["config"]}, dir=str(out_dir),
                      reinit="finish_previous")


def finish_wandb(run, record: dict[str, Any]) -> None:
    """Log the final metrics to the run's summary and close it."""
    if run is None:
        return
    run.summary.update({"status": record["status"], **{f"test/{k}": v for k, v in (record.get("metrics") or {}).items()},
                        **{f"zero_shot/{k}": v for k, v in (record.get("zero_shot") or {}).items()}})
    run.finish(exit_code=0 if record["status"] == "ok" else 1)
