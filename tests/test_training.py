"""loran/pipeline/training.py: the Trainer's arguments (W&B only through the guarded callback; gradient checkpointing
switched by the model alone) and the checkpoint folder's owner (claim_out_dir)."""
import logging
import re

import pytest
import wandb
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers.integrations import WandbCallback

import loran.pipeline.run
import loran.pipeline.training
from loran.pipeline.checks import ONE_SWITCH, ConfigError
from loran.pipeline.run import build_peft_config, cell_paths, run_cell
from loran.pipeline.training import build_trainer, claim_out_dir, training_args

from conftest import SMALL, cfg_of, nothing_under


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


@pytest.mark.parametrize("content, problem", [("{not json", "is not valid JSON"),
                                              ('["a list"]', r'is not \{"cell": ..., "config_hash": ...\}')])
def test_a_corrupt_cell_json_names_the_file_and_how_to_recover(workdir, content, problem):
    cfg = cfg_of(*SMALL, results=workdir / "results")
    owner = cell_paths(cfg)["out_dir"] / "cell.json"
    owner.parent.mkdir(parents=True)
    owner.write_text(content)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(owner))} {problem}.*Move it away and run the same "
                                          r"command again"):
        run_cell(cfg)
    assert nothing_under(workdir / "results")
    owner.unlink()
    claim_out_dir(owner.parent, cfg.cell, cfg.cell[-8:])  # moved away: the folder is claimed again


@pytest.mark.parametrize("trainer", ["cpu", "gpu"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradient_checkpointing_is_the_models_switch_alone(tmp_path, trainer, checkpointing):
    """model.load.gradient_checkpointing decides, under either trainer: the trainer groups have no switch of their own
    and building the Trainer neither adds nor removes it (for PEFT's k-bit preparation: tests/test_models.py)."""
    cfg = cfg_of(f"trainer={trainer}", "trainer.args.use_cpu=true", *SMALL,
                 f"model.load.gradient_checkpointing={str(checkpointing).lower()}")
    assert not any(OmegaConf.select(cfg, key) is not None for key in ONE_SWITCH)
    model, tokenizer = instantiate(cfg.model.load, _convert_="all")
    assert model.is_activation_checkpointing is checkpointing
    built = build_trainer(training_args(cfg, tmp_path), model, build_peft_config(cfg), tokenizer, [])
    assert built.model.get_base_model().is_activation_checkpointing is checkpointing


def test_a_checkpoint_folder_is_resumed_only_by_the_configuration_that_wrote_it(tmp_path):
    claim_out_dir(tmp_path, "a.seed0.11111111", "11111111")
    claim_out_dir(tmp_path, "a.seed0.11111111", "11111111")  # the same configuration: fine
    with pytest.raises(ValueError, match=r"holds the checkpoints of cell a.seed0.11111111, not of b"):
        claim_out_dir(tmp_path, "b.seed0.22222222", "22222222")
