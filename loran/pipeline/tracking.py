"""Experiment tracking: one W&B run per cell (group = experiment), offline when no API key is set."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


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
