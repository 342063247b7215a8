"""Faults of issue 24 (loran/pipeline/run.py's contract): W&B logs through the project's guarded calls only, and each
bad value or broken environment ends in one line naming the field or file (exit code 2 and nothing written when it is
the configuration), or in a run that is still right."""
import errno
import json
import logging
import math
import os
import re
import signal
from pathlib import Path
import subprocess

import pytest
import torch
import wandb
from transformers.integrations import WandbCallback

import loran.pipeline.base_models
import loran.pipeline.run
import loran.pipeline.training
from loran.pipeline.checks import ConfigError, check_config
from loran.pipeline.preemption import Preempted
from loran.pipeline.run import NoSpace, cell_paths, run_cell
from loran.pipeline.training import claim_out_dir, training_args

from tests.test_run_contract import PY, REPO, SMALL, cfg_of, workdir  # noqa: F401  (workdir: a fixture)


def nothing_under(folder: Path) -> bool:
    return not folder.exists() or not any(folder.rglob("*"))


def record_of(cfg) -> dict:
    return json.loads(cell_paths(cfg)["record"].read_text())


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


# --- B. bad values refused before anything is loaded -------------------------------------------------------------
LONG = "x" * 300


@pytest.mark.parametrize("overrides, message", [
    (["dataset.prompt.max_source_tokens=0"],
     r"dataset.prompt.max_source_tokens=0 \(int\) must be a positive integer"),
    (["dataset.prompt.max_source_tokens=-3"], r"dataset.prompt.max_source_tokens=-3 \(int\) must be a positive"),
    (["dataset.prompt.max_target_tokens=0"], r"dataset.prompt.max_target_tokens=0 \(int\) must be a positive"),
    ([f"experiment_name={LONG}"], r"experiment_name='x{40}\.\.\.x{12}' is 300 bytes long; at most 231 fit, since a "
                                  r"file or folder name may have 255 bytes"),
    ([f"dataset.name={'d' * 240}"], r"cell='d{40}\.\.\..*' is \d+ bytes long; at most 250 fit"),
    (["adapter=dora", "activation=relu"], r"adapter=dora takes no activation, but activation=relu was chosen\. DoRA "
                                          r"is PEFT's LoRA with a learned magnitude per output"),
])
def test_bad_values_stop_before_loading_and_write_nothing(workdir, monkeypatch, overrides, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(loran.pipeline.base_models, "tiny_causal_lm", no_loading)
    with pytest.raises(ConfigError, match=message) as refused:
        run_cell(cfg_of(*SMALL, *overrides, results=workdir / "results"))
    assert "QLoRA" not in str(refused.value) and "\n" not in str(refused.value)
    assert nothing_under(workdir / "results") and nothing_under(workdir / "outputs")


def test_an_experiment_name_that_just_fits_is_accepted(workdir):
    check_config(cfg_of(*SMALL, f"experiment_name={'x' * 231}"))
    (workdir / "results/runs").mkdir(parents=True)
    (workdir / f"results/runs/.{'x' * 231}_cells.csv.12345678.tmp").write_text("")  # the longest file it makes


@pytest.mark.parametrize("sweep", [[], ["-m"]])
def test_train_py_refuses_a_name_too_long_for_a_folder_with_exit_code_2_and_makes_no_folder(workdir, sweep):
    """It gave an OSError after Hydra made a folder."""
    proc = subprocess.run([PY, str(REPO / "train.py"), *sweep, *SMALL, f"experiment_name={LONG}",
                           f"results_dir={workdir / 'results'}"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"configuration error: experiment_name='x+\.\.\.x+' is 300 bytes long; at most 231 fit",
                     proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "OSError" not in proc.stderr
    assert not (workdir / "outputs").exists() and not (workdir / "results").exists()


# --- B. found right after loading --------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["n_train", "n_eval"])
def test_more_examples_than_the_split_has_are_refused_naming_the_field_and_the_size(workdir, field):
    """They were cut to the split's size silently, while the cell's name and hash kept the number asked for."""
    with pytest.raises(ConfigError, match=rf"dataset.{field}=100000 is more than the (\d+) examples of "
                                          rf"dataset=bbc_headlines's (train|test) split; set at most \1, or null"):
        run_cell(cfg_of(*SMALL, f"dataset.{field}=100000", results=workdir / "results"))
    assert nothing_under(workdir / "results")


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


# --- B5. a signal during the final evaluation --------------------------------------------------------------------
def test_sigterm_during_the_final_evaluation_stops_before_the_next_batch_and_the_same_command_redoes_it(
        workdir, monkeypatch):
    """It was ignored: the evaluation ran to its end and the record said "ok", however long that took."""
    cfg = cfg_of(*SMALL, "dataset.n_eval=8", "trainer.eval_batch_size=2", results=workdir / "results")
    evaluate, batches = loran.pipeline.run.evaluate, []

    def evaluate_with_sigterm(model, *args, **kwargs):
        generate = model.generate

        def first_batch_gets_a_sigterm(*a, **k):
            batches.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag; this batch still finishes
            return generate(*a, **k)

        model.generate = first_batch_gets_a_sigterm
        try:
            return evaluate(model, *args, **kwargs)
        finally:
            del model.generate

    monkeypatch.setattr(loran.pipeline.run, "evaluate", evaluate_with_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match=r"stopped on SIGTERM during the final evaluation \(nothing recorded\); run "
                                        r"the same command again to redo it: it resumes from .*checkpoint-2") as err:
        run_cell(cfg)
    assert err.value.exit_code == 143
    assert batches == [1]  # of 4 batches: stopped before the second
    assert not cell_paths(cfg)["record"].exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the run's handler is gone again

    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    record = run_cell(cfg)
    assert record["status"] == "ok" and record["resumed_from"].endswith("checkpoint-2")
    assert [e["step"] for e in record["loss_history"]] == [1, 2] and len(record["predictions"]) == 8
    straight = run_cell(cfg_of(*SMALL, "dataset.n_eval=8", "trainer.eval_batch_size=2", "experiment_name=straight",
                               results=workdir / "results"))  # the same cell, never stopped
    assert straight["cell"] == record["cell"] and straight["resumed_from"] is None
    assert record["loss_history"] == straight["loss_history"]  # no step past max_steps on resuming the last one
    assert record["predictions"] == straight["predictions"] and record["metrics"] == straight["metrics"]


# --- B7. a full disk ---------------------------------------------------------------------------------------------
def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("how", ["ENOSPC", "torch's writer"])
def test_a_checkpoint_on_a_full_disk_ends_in_one_line_and_a_failed_record(workdir, monkeypatch, how):
    """It ended in a traceback whose record said only 'OSError: [Errno 28] ...' (or torch's 'unexpected pos')."""
    if how == "ENOSPC":
        monkeypatch.setattr(torch, "save", _full)
    else:  # what torch.save raises on a full disk; the free space left tells it apart
        def unexpected_pos(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

        monkeypatch.setattr(torch, "save", unexpected_pos)
        usage = loran.pipeline.run.shutil.disk_usage
        monkeypatch.setattr(loran.pipeline.run.shutil, "disk_usage", lambda p: usage(p)._replace(free=4096))
    cfg = cfg_of(*SMALL, results=workdir / "results")
    with pytest.raises(NoSpace, match=r"^no space left on the device writing .*outputs/default/bbc_headlines\.\S+ "
                                      r"\(.*\); free space there \(df -h .*\) and run the same command again$") as err:
        run_cell(cfg)
    assert "\n" not in str(err.value)
    record = record_of(cfg)
    assert record["status"] == "failed" and record["error"] == str(err.value)


@pytest.mark.parametrize("then", ["fits", "does not fit"])
def test_a_record_on_a_full_disk_ends_in_one_line_and_a_failed_record_if_one_fits(workdir, monkeypatch, caplog, then):
    write_record, written = loran.pipeline.run.write_record, []

    def full_for_ok_records(path, record):
        if record["status"] == "ok" or then == "does not fit":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(record)
        write_record(path, record)

    monkeypatch.setattr(loran.pipeline.run, "write_record", full_for_ok_records)
    cfg = cfg_of(*SMALL, results=workdir / "results")
    record_path = cell_paths(cfg)["record"]
    with pytest.raises(NoSpace, match=rf"^no space left on the device writing {re.escape(str(record_path))} "):
        run_cell(cfg)
    if then == "fits":
        record = record_of(cfg)
        assert record["status"] == "failed" and record["error"].startswith("no space left on the device writing")
        assert record.get("predictions") is None and math.isfinite(record["metrics"]["rougeL"])
    else:
        assert not record_path.exists()
        assert f"the failed record could not be written to {record_path}" in caplog.text
    assert not (workdir / "results/runs/default_cells.csv").exists() or "ok" not in (
        workdir / "results/runs/default_cells.csv").read_text()
