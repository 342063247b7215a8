"""loran/pipeline/cells.py and the configs it names: a cell is its configuration: every result-relevant value changes
the hash, nothing else does; every option of every config group composes, names a valid cell and builds its trainer
arguments; each Table 2 row builds its activation with its parameters and start; committed records keep their cells."""
import json
import re
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from loran.activations import ACTIVATIONS
from loran.pipeline.cells import config_hash, flatten, identity
from loran.pipeline.checks import check_config
from loran.pipeline.run import build_peft_config, build_training_args

from conftest import CONFIGS, REPO, cfg_of, options

# The one override a machine without CUDA needs to build trainer=gpu (configs/trainer/gpu.yaml says so).
NO_CUDA = "trainer.args.use_cpu=true"
RESULT_RELEVANT = [
    "trainer.args.learning_rate=1e-2", "adapter.peft.r=4", "adapter.peft.lora_alpha=8",
    "adapter.peft.lora_dropout=0.0", "activation.params.amp=5e-3", "activation.params.omega=100.0",
    "activation.start=official", "trainer.args.max_steps=50", "trainer.args.per_device_train_batch_size=2",
    "trainer.args.warmup_steps=0", "dataset.n_train=100", "dataset.n_eval=50", "dataset.loader.seed=1",
    "dataset.prompt.max_source_tokens=64", "model.load.quantization=none", "model.target_modules=[q_proj]",
    "trainer.eval_batch_size=8", "zero_shot=false", "seed=1", "activation=tanh", "adapter=qlora",
    "dataset=bbc_headlines", "model=tiny", "trainer=gpu",
]
NOT_RESULT_RELEVANT = [
    "logger=none", "results_dir=/elsewhere", "experiment_name=other", "skip_existing=false", "trainer.resume=false",
    "trainer.args.save_steps=7", "trainer.args.save_total_limit=3", "trainer.args.logging_steps=1",
    "trainer.args.disable_tqdm=true",
]


def test_every_result_relevant_value_makes_another_cell_and_nothing_else_does():
    base = cfg_of().cell
    hashes = {}
    for override in RESULT_RELEVANT:
        cell = cfg_of(override).cell
        assert cell != base, f"{override} did not change the cell"
        hashes[override] = cell[-8:]
    assert len(set(hashes.values())) == len(hashes)  # and no two of them share a hash
    for override in NOT_RESULT_RELEVANT:
        assert cfg_of(override).cell == base, f"{override} changed the cell"


def test_seeds_share_an_identity_and_differ_in_hash():
    a, b = cfg_of("seed=0"), cfg_of("seed=1")
    assert identity(a) == identity(b)
    assert identity(a)["trainer"]["args"]["seed"] == "<seed>"  # the values interpolated from the seed, too
    assert config_hash(a) != config_hash(b)
    assert a.cell == cfg_of("seed=0").cell  # stable across compositions


def test_the_hash_follows_the_resolved_value_not_how_it_was_written():
    assert cfg_of("trainer.args.learning_rate=1e-3").cell == cfg_of("trainer.args.learning_rate=0.001").cell
    assert cfg_of("adapter.peft.r=8").cell == cfg_of().cell  # the default, set explicitly


def test_the_config_resolved_in_place_names_the_cell_the_run_uses():
    """`train.py --cfg job --resolve` resolves the config in place, key by key: the cell comes first, so its hash is
    taken while ${seed} is still symbolic below it (it printed another cell's hash when `cell` was the last key)."""
    overrides = ["seed=3", "activation=tanh"]
    shown = subprocess.run([sys.executable, "train.py", "--cfg", "job", "--resolve", *overrides], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.splitlines()[0] == f"cell: {cfg_of(*overrides).cell}"
    resolved = cfg_of(*overrides)
    OmegaConf.resolve(resolved)
    assert resolved.cell == cfg_of(*overrides).cell


ADAPTER_OF_ACTIVATION = {"none": "qlora"}


@pytest.mark.parametrize("group", ["model", "dataset", "adapter", "activation", "trainer", "logger", "row",
                                   "experiment"])
def test_every_option_of_every_group_composes_checks_and_builds(group, tmp_path):
    """Composed, checked as a run would be, its adapter config and its TrainingArguments built."""
    for option in options(group):
        overrides = [f"{group}={option}", f"results_dir={tmp_path}"]
        if group == "activation":  # activation=none is the adapters' without an activation; the others are LoRAN's
            overrides.append(f"adapter={ADAPTER_OF_ACTIVATION.get(option, 'loran')}")
        if not cfg_of(*overrides).trainer.args.use_cpu:  # a GPU trainer, built here on a CPU
            overrides.append(NO_CUDA)
        cfg = cfg_of(*overrides)
        check_config(cfg)
        assert re.fullmatch(r"[\w.+=-]+\.seed0\.[0-9a-f]{8}", cfg.cell), cfg.cell
        build_peft_config(cfg)
        args = build_training_args(cfg, tmp_path / "out")
        assert args.run_name == cfg.cell and args.logging_nan_inf_filter is False


@pytest.mark.parametrize("experiment", sorted(p.name for p in (REPO / "results/runs").iterdir() if p.is_dir()))
def test_committed_records_are_found_by_the_command_that_made_them(experiment):
    """Every committed record (Table 2 mini's, the study's): composing its overrides today gives back its cell, so
    rerunning the grid skips it instead of retraining (and a changed default would show here)."""
    records = [json.loads(p.read_text()) for p in sorted((REPO / "results/runs" / experiment).glob("*/record.json"))]
    assert records, f"results/runs/{experiment} holds no record"
    for record in records:
        cfg = cfg_of(*record["overrides"])
        assert cfg.cell == record["cell"], record["overrides"]
        assert identity(cfg) == record["identity"]


def test_migration_moves_a_record_only_when_todays_configs_reproduce_it(tmp_path):
    """A record whose stored config lacks a key today's configs have (as after a new result-relevant key): refused,
    then accepted with --assume naming that key's value; a record whose values differ stays where it is."""
    from omegaconf import OmegaConf

    overrides = ["experiment=table2_mini", "row=loran_tanh", "seed=2"]
    config = OmegaConf.to_container(cfg_of(*overrides), resolve=True)
    del config["adapter"]["peft"]["memory_efficient"]  # "the key did not exist yet"
    runs = tmp_path / "results/runs/table2_mini"
    old = {"status": "ok", "cell": "old-name", "overrides": overrides, "config": config, "experiment": "table2_mini",
           "choices": {}, "metrics": {"accuracy": 0.5}, "trainable_params": 1, "train_time_s": 1, "wall_time_s": 1,
           "peak_memory_mb": 1, "git": {"commit": None}, "finished_at": "x"}
    (runs / "old-name").mkdir(parents=True)
    (runs / "old-name/record.json").write_text(json.dumps(old))
    script = [sys.executable, str(REPO / "scripts/migrate_records.py"), "table2_mini", "--results",
              str(tmp_path / "results")]
    refused = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "adapter.peft.memory_efficient: '<absent>' -> True" in refused.stderr
    assert (runs / "old-name/record.json").exists()
    done = subprocess.run([*script, "--assume", "adapter.peft.memory_efficient=True"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    (moved,) = [json.loads(p.read_text()) for p in runs.glob("*/record.json")]
    assert moved["cell"] == cfg_of(*overrides).cell and moved["identity"] == identity(cfg_of(*overrides))
    assert moved["migrated"][0]["assumed"] == {"adapter.peft.memory_efficient": True}


def test_the_keys_that_do_not_change_a_result_are_the_schemas_result_false_fields():
    """NOT_RESULT is derived from loran/pipeline/schema.py; a field marked there moves cells, so the set is pinned here
    (changing it changes which commands share a cell: a deliberate edit of both)."""
    from loran.pipeline.cells import NOT_RESULT

    assert sorted(NOT_RESULT) == sorted([
        "hydra", "cell", "row", "experiment_name", "results_dir", "skip_existing", "logger", "trainer.resume",
        "trainer.args.output_dir", "trainer.args.run_name", "trainer.args.report_to", "trainer.args.logging_steps",
        "trainer.args.save_strategy", "trainer.args.save_steps", "trainer.args.save_total_limit",
        "trainer.args.disable_tqdm"])


def test_dora_has_the_qlora_sizes():
    """Both take LoRA's sizes from the schema's one default (loran/pipeline/schema.py, LORA_SIZES)."""
    dora, qlora = cfg_of("adapter=dora").adapter.peft, cfg_of("adapter=qlora").adapter.peft
    assert dora.use_dora is True
    assert [dora[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")] == \
        [qlora[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")]


@pytest.mark.parametrize("overrides", [
    ["adapter=dora"], ["adapter=dora", "activation=none"], ["adapter=loran", "activation=sinter"],
    ["adapter=qlora", "activation=none"], ["dataset=aclsum"], ["experiment=study_sinter_screen"],
    ["experiment=study_test"],     ["model=falcon_7b"], ["model=llama2_13b"], ["row=loran_relu_official"], ["row=loran_sigmoid_official"],
])
def test_named_options_compose_check_and_build(overrides, tmp_path):
    """The options the enumerating test reaches only indirectly, each named: composed, checked, adapter and
    TrainingArguments built."""
    cfg = cfg_of(*overrides, f"results_dir={tmp_path}")
    check_config(cfg)
    build_peft_config(cfg)
    assert build_training_args(cfg, tmp_path / "out").run_name == cfg.cell


def test_study_test_split_is_the_screening_scored_on_test():
    """Settings chosen on the screening's validation split carry over: the test-split experiment differs from it in
    the split scored and nothing else (so the two experiments' cells differ only by that key)."""
    screen = flatten(identity(cfg_of("experiment=study_sinter_screen")))
    test = flatten(identity(cfg_of("experiment=study_test")))
    assert {k for k in screen.keys() | test.keys() if screen.get(k) != test.get(k)} == {"dataset.eval_split"}
    assert (screen["dataset.eval_split"], test["dataset.eval_split"]) == ("validation", "test")


# Each Table 2 row runs its activation with its parameters and start="base".
ROWS = [r for r in options("row") if r.startswith("loran_")]


@pytest.mark.parametrize("experiment", [None, "table2_mini", "table2"])
@pytest.mark.parametrize("row", ROWS)
def test_every_loran_row_builds_its_activation_with_its_start(row, experiment):
    """Planted: `start: official` in configs/adapter/loran.yaml -> fails (it reached every row). Rows named
    *_official start as the official code does; every other row starts at the base model."""
    overrides = [f"row={row}"] + ([f"experiment={experiment}"] if experiment else [])
    cfg = cfg_of(*overrides)
    peft = instantiate(cfg.adapter.peft, target_modules=list(cfg.model.target_modules), _convert_="all")
    activation, _, official = row.removeprefix("loran_").partition("_")
    start = "official" if official else "base"
    own = OmegaConf.load(CONFIGS / "activation" / f"{activation}.yaml")  # read without the composition
    assert (peft.activation, peft.start) == (activation, start)
    assert peft.activation_kwargs == OmegaConf.to_container(own.params)
    act = peft.build_activation()
    assert (act.name, act.params, act.start) == (activation, dict(own.params), start)
    uncentred = float(ACTIVATIONS[activation].f(torch.zeros(()), **own.params))  # Sigmoid: 0.5
    assert float(act.f(torch.zeros(()))) == (uncentred if official else 0.0)


def test_start_and_params_overrides_reach_the_peft_config():
    cfg = cfg_of("row=loran_sigmoid", "activation.start=official")
    peft = instantiate(cfg.adapter.peft, target_modules=list(cfg.model.target_modules), _convert_="all")
    assert peft.start == "official" and float(peft.build_activation().f(torch.zeros(()))) == 0.5
    cfg = cfg_of("row=loran_sinter", "activation.params.amp=0.25")
    peft = instantiate(cfg.adapter.peft, target_modules=list(cfg.model.target_modules), _convert_="all")
    assert peft.activation_kwargs == {"amp": 0.25, "omega": 1e4}


def test_qlora_row_is_lora():
    """QLoRA is LoRAN with the identity, computed as LoRA (loran/config.py explains why it is not peft.LoraConfig)."""
    cfg = cfg_of("row=qlora")
    peft = instantiate(cfg.adapter.peft, target_modules=list(cfg.model.target_modules), _convert_="all")
    assert type(peft).__name__ == "LoranConfig" and peft.activation == "identity" and cfg.activation.name == "none"
    assert peft.build_activation().linear
