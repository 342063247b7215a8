"""The experiment pipeline as a whole (configs/, train.py and loran/pipeline/ together): every config composes, train.py
runs a cell end to end, bad input stops early."""
import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from loran.activations import ACTIVATIONS as REGISTERED
from loran import LoranConfig
from loran.config import LORA_FIELDS
from loran.pipeline.checks import ConfigError, check_config
from loran.pipeline.run import run_cell

from conftest import CONFIGS, REPO, cfg_of, options

MODELS, DATASETS = options("model"), options("dataset")
ACTIVATIONS = [a for a in options("activation") if a != "none"]  # none: the default of qlora and dora (no f)
# Shrinks a cell to seconds: tiny model, a few examples, two optimizer steps.
SMALL = ["model=tiny", "dataset.n_train=8", "dataset.n_eval=4", "trainer.args.max_steps=2",
         "trainer.args.save_steps=1", "trainer.args.logging_steps=1", "trainer.eval_batch_size=4",
         "trainer.args.per_device_train_batch_size=2", "zero_shot=false", "logger=none"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_combination_composes_and_builds(model, dataset):
    """model x dataset x adapter x activation: the PEFT config, prompt spec and metric all instantiate."""
    cells = [("qlora", None)] + [("loran", a) for a in ACTIVATIONS]
    for adapter, activation in cells:
        overrides = [f"model={model}", f"dataset={dataset}", f"adapter={adapter}"]
        overrides += [f"activation={activation}"] if activation else []
        cfg = cfg_of(*overrides)
        peft_config = instantiate(cfg.adapter.peft, target_modules=list(cfg.model.target_modules), _convert_="all")
        assert type(peft_config).__name__ == "LoranConfig"  # QLoRA: f = identity, so the precision policy reaches it
        assert peft_config.update_dtype == "float32"
        if adapter == "qlora":
            assert peft_config.activation == "identity"
        assert peft_config.r == 8 and peft_config.lora_alpha == 16
        if adapter == "loran":
            assert peft_config.activation == (activation or "sinter")
        spec = instantiate(cfg.dataset.prompt, _convert_="all")
        assert callable(instantiate(cfg.dataset.metric, _convert_="all"))
        assert spec.input_field and spec.target_field
        name = f"{dataset}.{model}.{adapter}-{activation or ('none' if adapter == 'qlora' else 'sinter')}.seed0"
        assert re.fullmatch(re.escape(name) + r"\.[0-9a-f]{8}", cfg.cell), cfg.cell


def test_every_registered_activation_has_its_yaml_and_every_yaml_a_registered_activation():
    """Adding an activation is its entry in loran.activations.ACTIVATIONS (f and f') plus one YAML named after it."""
    missing = sorted(set(REGISTERED) - set(ACTIVATIONS))
    assert not missing, f"add configs/activation/<name>.yaml (name, params, start) for the registered {missing}"
    for name in ACTIVATIONS:
        node = OmegaConf.load(CONFIGS / "activation" / f"{name}.yaml")
        assert node.name == name and name in REGISTERED, f"configs/activation/{name}.yaml names {node.name!r}"


def test_defaults_are_the_embedded_loran_sinter_cell():
    cfg = cfg_of()
    assert (cfg.model.name, cfg.dataset.name, cfg.adapter.name, cfg.activation.name) == \
        ("smollm2_135m", "bbc_news", "loran", "sinter")
    assert cfg.model.load.quantization == "nf4" and cfg.activation.params == {"amp": 5e-5, "omega": 1e4}


@pytest.mark.parametrize("experiment,expected", [
    ("table2_mini", {"experiment_name": "table2_mini", "zero_shot": False, "model.name": "smollm2_135m",
                     "dataset.n_eval": 100, "trainer.args.max_steps": 60, "adapter.peft.r": 8}),
    ("table2", {"experiment_name": "table2", "zero_shot": False, "model.name": "llama2_7b",
                "adapter.peft.r": 64, "adapter.peft.lora_dropout": 0.2}),
])
def test_an_experiment_overrides_the_primary_config(experiment, expected):
    """An experiment's own top-level keys must beat train.yaml's (they did not while _self_ came last)."""
    cfg = cfg_of(f"experiment={experiment}", "row=loran_relu", "dataset=bbc_headlines")
    assert {key: OmegaConf.select(cfg, key) for key in expected} == expected
    assert (cfg.adapter.name, cfg.activation.name) == ("loran", "relu")
    assert re.fullmatch(rf"bbc_headlines\.{expected['model.name']}\.loran-relu\.seed0\.[0-9a-f]{{8}}", cfg.cell)


def test_end_to_end_cell_writes_record_and_row_and_same_seed_repeats(workdir):
    results = workdir / "results"
    base = [*SMALL, "dataset=bbc_headlines", "experiment_name=e2e"]
    first = run_cell(cfg_of(*base, results=results))
    assert first["status"] == "ok"
    record = json.loads((results / "runs/e2e" / first["cell"] / "record.json").read_text())
    assert record["choices"]["seed"] == 0
    for key in ("choices", "overrides", "config", "git", "versions", "machine", "metrics", "trainable_params",
                "wall_time_s", "peak_memory_mb", "loss_history", "n_train"):
        assert key in record, key
    assert set(record["metrics"]) >= {"rouge1", "rouge2", "rougeL"}
    # Every evaluated example, keyed by its BBC id, with its own scores averaging to the record's metrics.
    predictions = record["predictions"]
    assert record["eval_split"] == "test" and len(predictions) == record["n_eval"] == 4
    assert len({p["id"] for p in predictions}) == 4 and all(re.fullmatch(r"[a-z]+/\d+", p["id"]) for p in predictions)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert sum(p[key] for p in predictions) / 4 == pytest.approx(record["metrics"][key], abs=1e-12)
    assert record["trainable_params"] == 2 * 2 * 8 * 64 + 2 * 8 * (64 + 32)  # q: 64->64, v: 64->32, r=8
    rows = list(csv.DictReader(open(results / "runs/e2e_cells.csv")))
    assert len(rows) == 1 and rows[0]["cell"] == first["cell"] and float(rows[0]["rouge1"]) == round(
        first["metrics"]["rouge1"], 6)

    # Same seed, fresh folders: the same losses and metrics.
    again = run_cell(cfg_of(*base, "skip_existing=false", "experiment_name=e2e_again", results=workdir / "results2"))
    assert again["metrics"] == first["metrics"] and again["predictions"] == first["predictions"]
    assert again["loss_history"] == first["loss_history"]

    # Running the finished cell again is skipped: no second row.
    run_cell(cfg_of(*base, results=results))
    assert len(list(csv.DictReader(open(results / "runs/e2e_cells.csv")))) == 1


# covered fast by test_a_wandb_cell_logs_its_losses_through_the_guarded_callback_and_a_failing_log_fails_nothing in
# test_training.py (a logger=wandb cell runs offline and logs its losses) and test_tracking.py's offline fallback
@pytest.mark.slow
def test_train_py_writes_an_offline_wandb_run(workdir):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    args = [a for a in SMALL if a != "logger=none"] + ["logger=wandb", "experiment_name=wb",
                                                      f"results_dir={workdir / 'results'}"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy=" in proc.stdout
    runs = list((workdir / "outputs/wb").glob("*/wandb/offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert len(list(csv.DictReader(open(workdir / "results/runs/wb_cells.csv")))) == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seed=4294967296"], r"seed=4294967296 \(int\) must be an integer in \[0, 2\*\*32\)"),
        (["dataset.n_train=0"], r"dataset.n_train=0 \(int\) must be a positive integer or null"),
        (["adapter.peft.lora_dropout=1.5"], r"adapter.peft.lora_dropout=1.5 \(float\) must be a number in \[0, 1\)"),
        (["adapter=qlora", "activation=relu"], r"adapter=qlora takes no activation, but activation=relu"),
        (["activation.name=no_such_activation"],
         re.escape(f"activation='no_such_activation' is unknown; allowed values: {sorted(REGISTERED)}")),
        (["activation.params.amp=-1"], r"activation_kwargs.amp=-1 must be finite and >= 0"),
        (["model.target_modules=[q_proj,qkv]"], r"\['qkv'\] not found in model tiny; its linear layers are "),
        (["dataset.prompt.input_field=body"], r"dataset=bbc_news: .*'body'.*available"),
    ],
)
def test_bad_input_stops_before_training_and_leaves_results_clean(workdir, overrides, message):
    results = workdir / "results"
    with pytest.raises(ConfigError, match=message):
        run_cell(cfg_of(*SMALL, *overrides, results=results))
    assert not results.exists() or not any(results.rglob("*"))
    assert not (workdir / "outputs").exists() or not any((workdir / "outputs").rglob("checkpoint-*"))


# Bad values for each of loran.config.LORA_FIELDS (a new field there needs its cases here).
BAD_LORA_VALUES = {"r": [0, -4, 2.5, True], "lora_alpha": [0, -1.0, math.inf], "lora_dropout": [1.5, -0.1, 1]}


@pytest.mark.parametrize("adapter", ["loran", "qlora", "dora"])
def test_the_pipeline_checks_lora_sizes_by_the_adapters_own_rules(adapter):
    """adapter.peft's r, lora_alpha and lora_dropout are refused before loading with the field, its type and what it
    must be, by the same rule and words as LoranConfig itself (loran.config.LORA_FIELDS), for PEFT's LoraConfig too."""
    assert set(BAD_LORA_VALUES) == set(LORA_FIELDS)
    for name, values in BAD_LORA_VALUES.items():
        for value in values:
            _, description = LORA_FIELDS[name]
            with pytest.raises(ConfigError) as err:
                check_config(cfg_of(f"adapter={adapter}", f"adapter.peft.{name}={value}"))
            assert str(err.value) == f"adapter.peft.{name}={value!r} ({type(value).__name__}) must be {description}"
            with pytest.raises(ValueError) as err:
                LoranConfig(target_modules=["q_proj"], **{name: value})
            assert str(err.value) == f"{name}={value!r} must be {description}"


def test_empty_split_is_refused(workdir):
    """A hub-format dataset (SAMSum columns, local files) whose test split is empty."""
    data = workdir / "samsum"
    data.mkdir()
    row = json.dumps({"id": "1", "dialogue": "A: hi\nB: hello", "summary": "They greet."})
    (data / "train.jsonl").write_text(row + "\n")
    (data / "validation.jsonl").write_text(row + "\n")
    (data / "test.jsonl").write_text("")
    files = f"{{train:{data}/train.jsonl,validation:{data}/validation.jsonl,test:{data}/test.jsonl}}"
    overrides = [*SMALL, "dataset=samsum", "dataset.loader.path=json", f"+dataset.loader.data_files={files}"]
    with pytest.raises(ConfigError, match=r"dataset=samsum: json: a split is empty \(Instruction .test. corresponds to no data"):
        run_cell(cfg_of(*overrides, results=workdir / "results"))
    assert not (workdir / "results").exists()


def test_unknown_group_option_names_the_allowed_ones():
    with pytest.raises(MissingConfigException) as err:
        cfg_of("adapter=lora")
    assert "Could not find 'adapter/lora'" in str(err.value)
    assert {"loran", "qlora"} <= set(err.value.options)


# covered fast by test_bad_input_stops_before_training_and_leaves_results_clean (adapter=qlora with an activation
# refused) and test_train_py_refuses_an_escaping_name_with_exit_code_2_and_makes_no_folder in test_run.py (exit 2)
@pytest.mark.slow
def test_train_py_reports_a_config_error_with_exit_code_2(workdir):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *SMALL, "adapter=qlora", "activation=tanh",
                           f"results_dir={workdir / 'results'}"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "configuration error: adapter=qlora takes no activation" in proc.stderr
    assert not (workdir / "results").exists()


def test_eval_split_chooses_the_evaluated_examples_and_not_the_seed():
    """validation to choose settings, test to report; the examples are the same for every training seed."""
    from loran.pipeline.base_models import tiny_causal_lm
    from loran.pipeline.run import load_data

    _, tokenizer = tiny_causal_lm()
    raw = instantiate(cfg_of("dataset=bbc_news").dataset.loader)
    for split in ("validation", "test"):
        ids = [list(load_data(cfg_of("dataset=bbc_news", "dataset.n_eval=20", f"dataset.eval_split={split}",
                                      f"seed={seed}"), tokenizer)[2]["example_id"]) for seed in (0, 3)]
        assert ids[0] == ids[1] and set(ids[0]) <= set(raw[split]["id"]) and len(ids[0]) == 20
    with pytest.raises(ConfigCompositionException, match=r"dataset.eval_split=train"):  # a closed choice: the schema's
        run_cell(cfg_of(*SMALL, "dataset.eval_split=train"))
