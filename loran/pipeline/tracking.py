"""Experiment tracking: one W&B run per cell (group = experiment); W&B never stops a run.

Online when wandb finds credentials the way it does itself (WANDB_API_KEY, netrc, its settings files: `wandb login`)
and its mode is not offline; an online start that fails or takes over logger.init_timeout seconds (30) falls back to
an offline run, with a warning naming why and the `wandb sync <dir>` command. No W&B error (init, log, summary, finish)
leaves this module: each is a logged warning and the run goes on. logger=none or WANDB_MODE=disabled: no run.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

log = logging.getLogger(__name__)

DEFAULT_INIT_TIMEOUT = 30.0  # s: an online wandb.init takes a few; wandb's own 90 stalls each cell on a node offline
OFFLINE_MODES = ("offline", "dryrun")


def _guarded(what: str, call: Callable[[], Any]) -> Any:
    """call(), or None with a warning if it raises: a W&B failure never stops a run."""
    try:
        return call()
    except Exception as err:  # noqa: BLE001 -- any W&B failure is only worth a warning
        log.warning("W&B %s failed, the run goes on without it: %s: %s", what, type(err).__name__, err)
        return None


def _why_not_online(settings) -> str | None:
    """Why this run cannot try W&B online (None: it can), from wandb's own credential lookup."""
    if settings.mode in OFFLINE_MODES:
        return f"mode is {settings.mode} (WANDB_MODE or `wandb offline`)"
    try:
        from wandb.sdk.lib import wbauth  # what wandb.init and wandb.login use to find the key

        found = wbauth.authenticate_session(host=settings.base_url, source="loran", prompt=False,
                                            update_session=False)
    except ImportError:
        return None  # another wandb layout: try online, the bounded init decides
    except Exception as err:  # noqa: BLE001 -- e.g. a malformed key
        return f"the W&B credentials are unusable ({type(err).__name__}: {err})"
    return None if found else (f"no W&B API key for {settings.base_url} (none in WANDB_API_KEY, netrc or wandb's "
                               "settings; run `wandb login` to log online)")


def start_wandb(cfg: DictConfig, out_dir: Path, record: dict[str, Any]):
    """A W&B run for this cell (online if possible, else offline), or None when the logger is off or W&B fails."""
    if "wandb" not in list(cfg.logger.report_to) or os.environ.get("WANDB_MODE") == "disabled":
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    timeout = float(cfg.logger.get("init_timeout", DEFAULT_INIT_TIMEOUT))
    args = dict(project=cfg.logger.project, group=cfg.logger.group, tags=list(cfg.logger.tags), name=cfg.cell,
                config={**record["choices"], **record["config"]}, dir=str(out_dir), reinit="finish_previous")
    wandb = _guarded("import", lambda: importlib.import_module("wandb"))
    settings = wandb and _guarded("setup", lambda: wandb.setup().settings)
    if settings is None or settings.mode == "disabled":
        return None
    why = _why_not_online(settings)
    if why is None:
        try:
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout), **args)
        except Exception as err:  # noqa: BLE001 -- no network, server down, key refused, timeout: go offline
            first_line = (str(err).splitlines() or [""])[0]  # wandb's advice below it names its own setting
            why = f"wandb.init online failed (timeout {timeout:g} s): {type(err).__name__}: {first_line}"
    return _guarded("offline init", lambda: _offline(wandb, args, why, chosen=settings.mode in OFFLINE_MODES))


def _offline(wandb, args: dict[str, Any], why: str, chosen: bool):
    """An offline run, announced with why and the command that uploads it later."""
    run = wandb.init(mode="offline", **args)
    log.log(logging.INFO if chosen else logging.WARNING, "W&B is logging OFFLINE because %s; upload this run later "
            "with: wandb sync %s", why, run.settings.sync_dir)
    return run


def log_wandb(run, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log metrics to the run (nothing when it is None); never raises."""
    if run is not None:
        _guarded("log", lambda: run.log(metrics, step=step))


def finish_wandb(run, record: dict[str, Any]) -> None:
    """Log the final metrics to the run's summary and close it; never raises."""
    if run is None:
        return
    _guarded("summary update", lambda: run.summary.update({
        "status": record["status"], **{f"test/{k}": v for k, v in (record.get("metrics") or {}).items()},
        **{f"zero_shot/{k}": v for k, v in (record.get("zero_shot") or {}).items()}}))
    _guarded("finish", lambda: run.finish(exit_code=0 if record.get("status") == "ok" else 1))
