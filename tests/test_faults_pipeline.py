"""Faults of issue 24 (loran/pipeline/run.py's contract): W&B logs through the project's guarded calls only, and each
bad value or broken environment ends in one line naming the field or file (exit code 2 and nothing written when it is
the configuration), or in a run that is still right."""
import logging
from pathlib import Path

import pytest
import wandb
from hydra import compose, initialize_config_dir
from transformers.integrations import WandbCallback

import loran.pipeline.run
import loran.pipeline.training
from loran.pipeline.checks import ConfigError, check_config
from loran.pipeline.run import run_cell
from loran.pipeline.training import training_args

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model=tiny", "dataset=bbc_headlines", "dataset.n_train=8", "dataset.n_eval=4", "trainer.args.max_steps=2",
         "trainer.args.save_steps=1", "trainer.args.logging_steps=1", "trainer.eval_batch_size=4",
         "trainer.args.per_device_train_batch_size=2", "zero_shot=false", "logger=none"]


def cfg_of(*overrides, results=None):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[*overrides, *([f"results_dir={results}"] if results else [])])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs/ lands here
    return tmp_path


# --- A. W&B ------------------------------------------------------------------------------------------------------
def test_logger_init_timeout_is_a_known_key_that_does_not_change_the_cell(workdir):
    check_config(cfg_of("logger=wandb"))  # configs/logger/wandb.yaml sets it
    check_config(cfg_of("logger=wandb", "logger.init_timeout=2.5"))
    check_config(cfg_of("logger=none", "+logger.init_timeout=5"))
    assert cfg_of("logger=wandb").logger.init_timeout == 30
    assert cfg_of("logger.init_timeout=5").cell == cfg_of().cell == cfg_of("logger=none").cell


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon", "true", "null"])
def test_a_bad_logger_init_timeout_is_refused(workdir, value):
    with pytest.raises(ConfigError, match=r"logger.init_timeout=.* must be a positive number of seconds"):
        check_config(cfg_of("logger=wandb", f"logger.init_timeout={value}"))


def test_the_trainer_reports_to_wandb_only_through_the_guarded_callback(tmp_path):
    """transformers' WandbCallback (unguarded log, unbounded init of its own) is never installed."""
    assert training_args(cfg_of("logger=wandb"), tmp_path).report_to in ([], ["none"], "none")
    keep = training_args(cfg_of("logger=wandb", "logger.report_to=[wandb,tensorboard]"), tmp_path).report_to
    assert keep == ["tensorboard"]


def test_a_wandb_cell_logs_its_losses_through_the_guarded_callback_and_a_failing_log_fails_nothing(
        workdir, monkeypatch, caplog):
    """With logger=wandb (offline: tests/conftest.py), every logged step reaches the cell's own run via
    tracking.log_wandb; that run's log (and wandb.log, which transformers' callback used) raising fails nothing."""
    def refuse(*args, **kwargs):
        raise ConnectionError("W&B is down")

    runs, sent, trainers = [], [], []
    start, log_wandb, build = (loran.pipeline.run.start_wandb, loran.pipeline.training.log_wandb,
                               loran.pipeline.run.build_trainer)

    def start_failing_run(*args, **kwargs):
        run = start(*args, **kwargs)
        monkeypatch.setattr(type(run), "log", refuse)
        monkeypatch.setattr(wandb, "log", refuse)  # what transformers' callback called (wandb.init had just set it)
        runs.append(run)
        return run

    def log_and_keep(run, metrics, step=None):
        sent.append((run, dict(metrics), step))
        log_wandb(run, metrics, step=step)

    monkeypatch.setattr(loran.pipeline.run, "start_wandb", start_failing_run)
    monkeypatch.setattr(loran.pipeline.training, "log_wandb", log_and_keep)
    monkeypatch.setattr(loran.pipeline.run, "build_trainer", lambda *a, **k: trainers.append(build(*a, **k))
                        or trainers[-1])
    with caplog.at_level(logging.WARNING, logger="loran.pipeline.tracking"):
        record = run_cell(cfg_of(*SMALL, "logger=wandb", results=workdir / "results"))
    assert record["status"] == "ok"
    (run,) = runs
    losses = [(step, metrics["train/loss"]) for r, metrics, step in sent if r is run and "train/loss" in metrics]
    assert losses == [(e["step"], e["loss"]) for e in record["loss_history"]] and [s for s, _ in losses] == [1, 2]
    assert any("W&B log failed" in r.getMessage() and "W&B is down" in r.getMessage() for r in caplog.records)
    assert not any(isinstance(c, WandbCallback) for c in trainers[0].callback_handler.callbacks)
