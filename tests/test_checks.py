"""loran/pipeline/checks.py: bad values stop a cell before anything is loaded or written, with one line naming the
field (logger.init_timeout, prompt lengths, name lengths, DoRA with an activation), as run_cell and train.py meet them;
a wrong type fails earlier, while Hydra composes (the schema: loran/pipeline/schema.py)."""
import re
import subprocess

import pytest
from hydra.errors import ConfigCompositionException

import loran.pipeline.base_models
from loran.pipeline.checks import ConfigError, check_config
from loran.pipeline.run import run_cell

from conftest import PY, REPO, SMALL, cfg_of, nothing_under


# W&B.
def test_logger_init_timeout_is_a_known_key_that_does_not_change_the_cell(workdir):
    check_config(cfg_of("logger=wandb"))  # configs/logger/wandb.yaml sets it
    check_config(cfg_of("logger=wandb", "logger.init_timeout=2.5"))
    check_config(cfg_of("logger=none", "logger.init_timeout=5"))  # the schema holds it for every logger
    assert cfg_of("logger=wandb").logger.init_timeout == 30
    assert cfg_of("logger.init_timeout=5").cell == cfg_of().cell == cfg_of("logger=none").cell


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_logger_init_timeout_is_refused(workdir, value):
    with pytest.raises(ConfigError, match=r"logger.init_timeout=.* must be a positive number of seconds"):
        check_config(cfg_of("logger=wandb", f"logger.init_timeout={value}"))


# A value of the wrong type, or outside a closed choice, fails while Hydra composes (the schema's types,
# loran/pipeline/schema.py), naming the field; train.py makes that exit code 2 with no folder made (tested below).
@pytest.mark.parametrize("override, key", [
    ("logger.init_timeout=soon", "logger.init_timeout"), ("logger.init_timeout=true", "logger.init_timeout"),
    ("logger.init_timeout=null", "logger.init_timeout"), ("seed=abc", "seed"), ("zero_shot=maybe", "zero_shot"),
    ("dataset.n_train=1.5", "dataset.n_train"), ("dataset.eval_split=train", "dataset.eval_split"),
    ("trainer.eval_batch_size=many", "trainer.eval_batch_size"), ("adapter.takes_activation=maybe", "adapter.takes_activation"),
])
def test_a_value_of_the_wrong_type_fails_while_composing_naming_the_field(override, key):
    with pytest.raises(ConfigCompositionException, match=re.escape(f"Error merging override {override}")) as refused:
        cfg_of("logger=wandb", override)
    assert f"full_key: {key}" in str(refused.value.__cause__)


def test_train_py_refuses_a_wrong_type_with_exit_code_2_naming_the_field_and_makes_no_folder(workdir):
    proc = subprocess.run([PY, str(REPO / "train.py"), *SMALL, "dataset.eval_split=train",
                           f"results_dir={workdir / 'results'}"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Invalid value 'train', expected one of [test, validation]" in proc.stderr
    assert "full_key: dataset.eval_split" in proc.stderr and "Traceback" not in proc.stderr
    assert not (workdir / "outputs").exists() and not (workdir / "results").exists()


# Bad values refused before anything is loaded.
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


# the single run ([]) is covered fast by test_bad_values_stop_before_loading_and_write_nothing (the long name refused)
# and test_train_py_refuses_an_escaping_name_with_exit_code_2_and_makes_no_folder in test_run.py (exit 2, no folder)
@pytest.mark.parametrize("sweep", [pytest.param([], marks=pytest.mark.slow), ["-m"]])
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
