"""loran/pipeline/run.py and its contract (its docstring; the README summarises it): distinct cells per configuration,
checks before loading, no result from a run that is not one, one process per cell, one row per finished cell, and
recoverable faults (a signal during the final evaluation, a full disk, a truncated checkpoint); load_data's splits;
train.py's exit codes."""
import csv
import errno
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback

import loran.pipeline.base_models
import loran.pipeline.run
from loran.pipeline.checks import ConfigError
from loran.pipeline.preemption import Preempted
from loran.pipeline.records import CellBusy, cell_lock
from loran.pipeline.run import Diverged, NoSpace, cell_paths, load_data, run_cell
from loran.pipeline.training import checkpoint_problem, last_checkpoint

from conftest import PY, REPO, SMALL, cfg_of, nothing_under, options


def rows(results, experiment="default"):
    path = results / "runs" / f"{experiment}_cells.csv"
    return list(csv.DictReader(open(path))) if path.exists() else []


# The cell is the configuration.
# covered fast by test_every_result_relevant_value_makes_another_cell_and_nothing_else_does in test_cells.py (the
# learning rate makes another cell) and test_each_make_grid_composes_into_distinct_checked_cells_and_tables_them in
# test_make_grids.py (every -m sweep value is a distinct cell)
@pytest.mark.slow
def test_a_learning_rate_sweep_gives_two_cells_with_their_own_results(workdir):
    """`train.py -m trainer.args.learning_rate=1e-3,1e-2` once trained the first and reported it for both."""
    results = workdir / "results"
    proc = subprocess.run([PY, str(REPO / "train.py"), "-m", *SMALL, "trainer.args.max_steps=4",
                           "trainer.args.learning_rate=1e-3,1e-2",
                           f"results_dir={results}", "experiment_name=lr"], cwd=workdir, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already done" not in proc.stdout + proc.stderr
    records = [json.loads(p.read_text()) for p in sorted((results / "runs/lr").glob("*/record.json"))]
    assert sorted(r["identity"]["trainer"]["args"]["learning_rate"] for r in records) == [1e-3, 1e-2]
    assert records[0]["cell"] != records[1]["cell"]
    # (step 1 trains at learning rate 0: the warm-up starts there, so the losses part from step 3 on)
    assert records[0]["loss_history"][-1]["loss"] != records[1]["loss_history"][-1]["loss"]
    assert sorted(r["cell"] for r in rows(results, "lr")) == sorted(r["cell"] for r in records)
    outs = sorted(p.name for p in (workdir / "outputs/lr").iterdir() if p.is_dir() and p.name[0] != ".")
    assert outs == sorted(r["cell"] for r in records)  # two checkpoint folders, one per configuration


# Every trainer and experiment config runs.
@pytest.mark.parametrize("overrides", [
    ["trainer=gpu", "trainer.args.use_cpu=true",                         # bf16 autocast, paged AdamW (CPU fallback)
     "model.load.gradient_checkpointing=true"],                          # as the 7B/13B models train
    ["experiment=table2", "trainer.args.use_cpu=true", "row=loran_sinter"],  # r=64, dropout 0.2, trainer=gpu
    ["experiment=table2_mini", "row=qlora"],
    ["adapter=dora"],                                                   # the study's DoRA arm
    ["experiment=study_sinter_screen", "activation.params.amp=0.5"],   # the study's experiments: validation ...
    ["experiment=study_tuned_val", "activation=sine"],
    ["experiment=study_test"],                                          # ... and test (the confirmations)
    ["experiment=study_tuned_test", "trainer.args.learning_rate=3e-3"],
])
def test_paper_scale_trainer_and_experiments_train_two_steps(workdir, overrides):
    # model and dataset after the experiment: its hub model and data are swapped for the tiny ones
    record = run_cell(cfg_of(*overrides, *SMALL, results=workdir / "results"))
    assert record["status"] == "ok" and [e["step"] for e in record["loss_history"]] == [1, 2]
    assert all(isinstance(e["grad_norm"], float) for e in record["loss_history"])
    if "trainer=gpu" in overrides or "experiment=table2" in overrides:
        assert record["config"]["trainer"]["args"]["bf16"] is True
    if overrides[0].startswith("experiment=study"):   # a study scores the split its name says, every example kept
        assert record["eval_split"] == ("test" if overrides[0].endswith("test") else "validation")
        assert len(record["predictions"]) == 4 and all("rougeL" in p for p in record["predictions"])


# Every row of Table 2 and every activation option, beyond those the tests above and the sweep test run.
@pytest.mark.parametrize("overrides", [
    ["row=loran_identity"], ["row=loran_sigmoid"], ["row=loran_sigmoid_official"], ["row=loran_relu_official"],
    ["row=loran_relu"],                                                  # the centred start: relu's gradient flows
    ["activation=cos"], ["activation=gaussian"], ["activation=silu"], ["activation=swish"],
])
def test_every_row_and_activation_trains_two_steps(workdir, overrides):
    cfg = cfg_of("experiment=table2_mini", *overrides, *SMALL, results=workdir / "results")
    record = run_cell(cfg)
    assert record["status"] == "ok" and [e["step"] for e in record["loss_history"]] == [1, 2]
    name, value = overrides[0].split("=")
    if name == "activation":
        assert record["identity"]["activation"]["name"] == value
    grads = [e["grad_norm"] for e in record["loss_history"]]
    if overrides == ["row=loran_relu_official"]:   # B = 0 and relu'(0) = 0: no gradient ever reaches A or B
        assert grads == [0.0, 0.0]
    else:
        assert all(g > 0 for g in grads)


def _newsgroups_files(tmp_path) -> list[str]:
    """20 Newsgroups as SetFit/20_newsgroups holds it: text, an int label and its label_text, train and test only.
    SetFit's label ids are sklearn's target ids, whose target_names are the 20 names sorted."""
    names = sorted(cfg_of("dataset=newsgroups20").dataset.prompt.labels)
    folder = tmp_path / "newsgroups"
    folder.mkdir()
    for split, per_class in (("train", 10), ("test", 1)):   # validation: 1 a class of train
        rows = [json.dumps({"text": f"{split} post {i} about {names[k]}", "label": k, "label_text": names[k]})
                for k in range(20) for i in range(per_class)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    files = ",".join(f"{s}:{folder}/{s}.jsonl" for s in ("train", "test"))
    return ["dataset.loader.path=json", f"+dataset.loader.data_files={{{files}}}"]


@pytest.mark.parametrize("dataset", ["samsum", "newsgroups20", "aclsum"])
def test_the_paper_and_aclsum_datasets_train_two_steps_through_their_configs(workdir, dataset):
    """The hub datasets' configs on local files made here (as the hub holds them), ACLSum from its wheel: two steps
    and the evaluation, each target as the data holds it (20 Newsgroups: the int label through the config's names)."""
    extra = {"samsum": _samsum_files, "newsgroups20": _newsgroups_files}.get(dataset, lambda _: [])(workdir)
    n_eval = 20 if dataset == "newsgroups20" else 4   # every class's test post
    small = [o for o in SMALL if not o.startswith(("dataset=", "dataset.n_eval="))]
    record = run_cell(cfg_of(f"dataset={dataset}", *small, *extra, "dataset.prompt.max_source_tokens=256",
                             f"dataset.n_eval={n_eval}", results=workdir / "results"))
    assert record["status"] == "ok" and [e["step"] for e in record["loss_history"]] == [1, 2]
    assert len(record["predictions"]) == n_eval and record["eval_split"] == "test"
    metric = "accuracy" if dataset == "newsgroups20" else "rougeL"
    assert all(0.0 <= p[metric] <= 1.0 for p in record["predictions"])
    if dataset == "newsgroups20":   # each scored post's target is its label_text (ids: sha1 of the text, 16 hex)
        rows = [json.loads(line) for line in (workdir / "newsgroups/test.jsonl").read_text().splitlines()]
        names = {hashlib.sha1(r["text"].encode()).hexdigest()[:16]: r["label_text"] for r in rows}
        assert [p["target"] for p in record["predictions"]] == [names[p["id"]] for p in record["predictions"]]


def _hub_model_folder(folder: Path, family: str) -> dict[str, tuple[int, int]]:
    """A tiny random model of the hub model's family saved as a local folder (the real SmolLM2 tokenizer), and the
    (in, out) features of each adapted layer in one decoder block: Llama (GQA: v_proj is 64 -> 32) or Falcon-7B's
    form (multi-query: one fused query_key_value, 64 -> 64 + 2 x 16)."""
    from transformers import FalconConfig, FalconForCausalLM

    model, tokenizer = loran.pipeline.base_models.tiny_causal_lm()
    layers = {"q_proj": (64, 64), "v_proj": (64, 32)}
    if family == "falcon":
        config = FalconConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model, layers = FalconForCausalLM(config), {"query_key_value": (64, 96)}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return layers


@pytest.mark.parametrize("name, family", [("llama2_7b", "llama"), ("llama2_13b", "llama"), ("falcon_7b", "falcon")])
def test_the_hub_model_configs_train_two_steps_on_a_local_folder_of_their_family(workdir, name, family):
    """Each hub model's config as written (NF4, bfloat16, gradient checkpointing, its target modules) loading a tiny
    model of its family from a folder, as `model.load.name_or_path=/path` does offline: two steps, an adapter of
    r (in + out) weights on every targeted layer (Falcon's fused QKV is non-square)."""
    layers = _hub_model_folder(workdir / "model", family)
    small = [o for o in SMALL if not o.startswith("model=")]
    cfg = cfg_of(f"model={name}", f"model.load.name_or_path={workdir / 'model'}", *small,
                 results=workdir / "results")
    assert cfg.model.load.quantization == "nf4" and cfg.model.load.gradient_checkpointing is True
    assert list(cfg.model.target_modules) == list(layers)
    record = run_cell(cfg)
    assert record["status"] == "ok" and [e["step"] for e in record["loss_history"]] == [1, 2]
    assert all(e["grad_norm"] > 0 for e in record["loss_history"])
    r = cfg.adapter.peft.r
    assert record["trainable_params"] == 2 * sum(r * (n_in + n_out) for n_in, n_out in layers.values())  # 2 blocks


def test_the_default_cell_make_demo_runs_trains_a_step_and_scores_in_its_smallest_real_form(workdir):
    """`make demo` (python train.py, every default: SmolLM2-135M on NF4, LoRAN-Sinter, BBC News), one step on 4
    articles and 2 scored: the real pretrained model through its config, an adapter on its 30 blocks' q_proj
    (576 -> 576) and v_proj (576 -> 192, GQA)."""
    cfg = cfg_of("trainer.args.max_steps=1", "dataset.n_train=4", "dataset.n_eval=2", "zero_shot=false", "logger=none",
                 "trainer.args.per_device_train_batch_size=2", "trainer.eval_batch_size=2",
                 "trainer.args.logging_steps=1", results=workdir / "results")
    assert (cfg.model.name, cfg.dataset.name, cfg.adapter.name, cfg.activation.name) == (
        "smollm2_135m", "bbc_news", "loran", "sinter")
    record = run_cell(cfg)
    assert record["status"] == "ok" and [e["step"] for e in record["loss_history"]] == [1]
    assert record["trainable_params"] == 30 * cfg.adapter.peft.r * ((576 + 576) + (576 + 192))
    labels = set(cfg.dataset.prompt.labels)
    assert len(record["predictions"]) == 2 and all(p["target"] in labels for p in record["predictions"])


def test_the_smoke_preset_runs_its_ten_steps_without_a_logger(workdir):
    """experiment=smoke in its smallest real form (the tiny model): its own 10 steps on 40 examples, 16 scored, no
    W&B, its own experiment folder; every other choice still applies (here the tiny model)."""
    cfg = cfg_of("experiment=smoke", "model=tiny", results=workdir / "results")
    assert "wandb" not in list(cfg.logger.report_to)
    record = run_cell(cfg)
    assert record["status"] == "ok" and record["experiment"] == "smoke"
    assert (record["n_train"], record["n_eval"]) == (40, 16) and record["loss_history"][-1]["step"] == 10
    assert (workdir / "results" / "runs" / "smoke").is_dir()


# Checks before anything is loaded.
@pytest.mark.parametrize("overrides, message", [
    (["model.target_modules=[]"], r"model.target_modules=\[\] \(list\) must be a non-empty list of module names"),
    (["seed=-1"], r"seed=-1 \(int\) must be an integer in \[0, 2\*\*32\)"),
    (["trainer.args.gradient_accumulation_steps=0"], r"gradient_accumulation_steps=0 \(int\) must be a positive"),
    (["trainer.args.max_steps=2.5"], r"trainer.args.max_steps=2.5 \(float\) must be a positive integer, or -1"),
    (["trainer.args.max_steps=0"], r"trainer.args.max_steps=0 \(int\) must be a positive integer, or -1"),
    (["trainer.args.learning_rate=inf"], r"learning_rate=inf \(float\) must be a positive number"),
    (["+trainer.args.warmup_ratio=0.1"], r"trainer.args.warmup_ratio: transformers.TrainingArguments takes no "
                                         r"argument 'warmup_ratio'; did you mean 'warmup_steps'\?"),
    (["model=smollm2_135m", "model.load.quantization=nf5"], r"model.load.quantization='nf5' \(str\) must be one "
                                                            r"of \['int8', 'nf4', 'none'\]"),
    (["activation.start=centred"], r"activation.start='centred' \(str\) must be one of \['base', 'official'\]"),
    (["+anything=1"], r"anything: unknown key \(nothing reads it\); the top level has \["),
    (["+dataset.n_tarin=5"], r"dataset.n_tarin: unknown key .* did you mean 'dataset.n_train'\?"),
    (["+adapter.rank=8"], r"adapter.rank: unknown key .* did you mean 'adapter.peft.r'\?"),   # one level deeper
    (["+adapter.peft.rank=8"], r"adapter.peft.rank: loran.LoranConfig takes no argument 'rank'; did you mean 'r'\?"),
    (["+trainer.args.lr=1e-4"], r"trainer.args.lr: .* takes no argument 'lr'; did you mean 'learning_rate'\?"),
    (["experiment_name=../../x"], r"experiment_name='../../x' must be a plain folder name"),
    (["experiment_name=/tmp/x"], r"experiment_name='/tmp/x' must be a plain folder name"),
    (["experiment_name=''"], r"experiment_name='' must be a plain folder name"),
    (["dataset.name=a/b"], r"dataset.name='a/b' must be a plain folder name"),
    (["+trainer.args.activation_checkpointing=true"], r"trainer.args.activation_checkpointing=True: this is switched "
                                                      r"by model.load.gradient_checkpointing only"),
    (["trainer=gpu", "trainer.args.use_cpu=true", "+trainer.args.gradient_checkpointing=false"],
     r"trainer.args.gradient_checkpointing=False: this is switched by model.load.gradient_checkpointing only"),
])
def test_bad_values_stop_before_loading_and_write_nothing(workdir, monkeypatch, overrides, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(loran.pipeline.base_models, "tiny_causal_lm", no_loading)
    monkeypatch.setattr(loran.pipeline.base_models, "load_causal_lm", no_loading)
    with pytest.raises(ConfigError, match=message):
        run_cell(cfg_of(*SMALL, *overrides, results=workdir / "results"))
    assert nothing_under(workdir / "results") and nothing_under(workdir / "outputs")


def test_an_unwritable_results_dir_is_found_before_loading(workdir, monkeypatch):
    locked = workdir / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):   # root writes anywhere: the folder reads as root's permission check would not
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked and mode & os.W_OK
                            else access(p, mode, **kw))
    with pytest.raises(ConfigError, match=r"results_dir='.*ro/results': .*ro is not a writable folder"):
        run_cell(cfg_of(*SMALL, results=locked / "results"))


def test_a_results_dir_that_cannot_be_a_folder_is_found_before_loading(workdir):
    (workdir / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"results_dir='.*a_file/results': .*a_file is not a writable folder"):
        run_cell(cfg_of(*SMALL, results=workdir / "a_file/results"))


def test_train_py_refuses_an_escaping_name_with_exit_code_2_and_makes_no_folder(workdir):
    proc = subprocess.run([PY, str(REPO / "train.py"), *SMALL, "experiment_name=../escaped",
                           f"results_dir={workdir / 'results'}"], cwd=workdir / ".", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error: experiment_name='../escaped' must be a plain folder name" in proc.stderr
    assert not (workdir / "escaped").exists() and not (workdir / "outputs").exists()
    assert not (workdir / "results").exists()


@pytest.mark.parametrize("sweep, bad", [
    (["activation.params.amp=0.1,-1", "seed=0,1"], ["cell #2 (activation.params.amp=-1 seed=0): ",
                                                    "cell #3 (activation.params.amp=-1 seed=1): "]),
    (["experiment=table2_mini", "seed=-1"], ["cell #0 (dataset=bbc_news row=qlora): seed=-1"]),  # its own 16 cells
    (["activation=sinter,nosuch"], ["cell #1 (activation=nosuch): In 'adapter/loran': Could not find "
                                    "'activation/nosuch'"]),
])
def test_a_sweep_checks_every_cell_before_any_runs(workdir, sweep, bad):
    """A bad value in a -m list stops the sweep before its first cell (exit 2, one line per bad cell, named by the
    values that vary), not after the good cells before it; nothing is written. The experiment's own
    hydra.sweeper.params are expanded as the sweeper expands them (the command's seed replaces its 0,1,2)."""
    small = [o for o in SMALL if not o.startswith("dataset=")] if sweep[0].startswith("experiment") else SMALL
    proc = subprocess.run([PY, str(REPO / "train.py"), "-m", *sweep, *small, f"results_dir={workdir / 'results'}"],
                          cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    count = 16 if sweep[0].startswith("experiment") else len(bad)
    assert f"configuration error in {count} of the sweep's cells; none was run:" in proc.stderr
    assert all(line in proc.stderr for line in bad), proc.stderr[-2000:]
    assert nothing_under(workdir / "outputs") and nothing_under(workdir / "results")


# covered fast by test_bad_input_stops_before_training_and_leaves_results_clean in test_pipeline.py (amp=-1 refused
# before training) and test_train_py_refuses_an_escaping_name_with_exit_code_2_and_makes_no_folder (train.py's exit 2)
@pytest.mark.slow
def test_train_py_refuses_a_bad_activation_with_exit_code_2_and_makes_no_folder(workdir):
    """The adapter's own checks (LoranConfig: the activation and its parameters) run in check_config, so a single run
    stops before Hydra makes its output folder."""
    proc = subprocess.run([PY, str(REPO / "train.py"), *SMALL, "activation.params.amp=-1",
                           f"results_dir={workdir / 'results'}"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error: adapter=loran, activation=sinter: activation_kwargs.amp=-1 must be finite" in proc.stderr
    assert not (workdir / "outputs").exists() and not (workdir / "results").exists()


# A run that is not a result is not recorded as one.
class PoisonAtStep(TrainerCallback):
    """Sets every trainable weight to NaN after step 3, as an exploding update would."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 3:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))


def test_a_diverging_run_is_recorded_as_diverged_with_its_step_and_gets_no_row(workdir, monkeypatch):
    build = loran.pipeline.run.build_trainer

    def poisoned(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(PoisonAtStep())
        return trainer

    monkeypatch.setattr(loran.pipeline.run, "build_trainer", poisoned)
    results = workdir / "results"
    cfg = cfg_of(*SMALL, "trainer.args.max_steps=12", "dataset.n_train=24", "trainer.args.save_steps=4",
                 results=results)
    with pytest.raises(Diverged, match=r"training diverged at step 4"):
        run_cell(cfg)
    record = json.loads(Path(cell_paths(cfg)["record"]).read_text())
    assert record["status"] == "diverged" and record["metrics"] is None  # schema 2: every field, null if not run
    assert record["divergence"]["step"] == 4 and math.isnan(record["divergence"]["loss"])
    history = record["loss_history"]
    assert [e["step"] for e in history] == [1, 2, 3, 4]  # stopped at the first non-finite value
    assert all(math.isfinite(e["loss"]) for e in history[:3]) and math.isnan(history[3]["loss"])
    assert math.isnan(history[3]["grad_norm"])  # NaN stays NaN in the history (transformers would filter it)
    assert rows(results) == []
    ckpts = Path(cell_paths(cfg)["out_dir"]) / "checkpoints"
    assert not (ckpts / "checkpoint-4").exists()  # no checkpoint of NaN weights, though step 4 was a save step
    # a divergence is a result: the same command does not run the cell again (it would only choose among outcomes)
    written = Path(cell_paths(cfg)["record"]).read_bytes()
    with pytest.raises(Diverged, match=r"diverged before \(at step 4; .*record.json\); a diverged run is a result "
                                       r"and is not run again: skip_existing=false"):
        run_cell(cfg)
    assert Path(cell_paths(cfg)["record"]).read_bytes() == written
    with pytest.raises(Diverged, match=r"training diverged at step 4"):   # asked for: it runs (and diverges) again
        run_cell(cfg_of(*SMALL, "trainer.args.max_steps=12", "dataset.n_train=24", "trainer.args.save_steps=4",
                        "skip_existing=false", results=results))
    assert Path(cell_paths(cfg)["record"]).read_bytes() != written


# One process per cell, one row per finished cell.
def _hold(path, held, release):
    with cell_lock(path):
        held.set()
        release.wait(60)


def test_a_second_launch_of_a_running_cell_stops_without_touching_its_record(workdir):
    cfg = cfg_of(*SMALL, results=workdir / "results")
    lock = cell_paths(cfg)["lock"]
    ctx = mp.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(lock, held, release))
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(CellBusy, match="another process is running this cell"):
            run_cell(cfg)
        assert not cell_paths(cfg)["record"].exists()
    finally:
        release.set()
        holder.join(30)
    assert run_cell(cfg)["status"] == "ok"  # once the other process is gone, the cell runs


def test_a_process_dying_between_record_and_row_leaves_the_row_to_the_next_run(workdir, monkeypatch):
    results = workdir / "results"
    cfg = cfg_of(*SMALL, results=results)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # killed right after the record was written

    monkeypatch.setattr(loran.pipeline.run, "rebuild_table", die)
    with pytest.raises(KeyboardInterrupt):
        run_cell(cfg)
    assert json.loads(cell_paths(cfg)["record"].read_text())["status"] == "ok" and rows(results) == []
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    again = run_cell(cfg)  # skipped as done, and its row restored
    assert [r["cell"] for r in rows(results)] == [again["cell"]]


# Faults.
def test_a_corrupt_record_names_its_file_before_anything_runs(workdir):
    cfg = cfg_of(*SMALL, results=workdir / "results")
    record = cell_paths(cfg)["record"]
    record.parent.mkdir(parents=True)
    record.write_text('{"status": "ok", "metr')
    with pytest.raises(ConfigError, match=rf"{record.name} is not a valid record .* Move it away"):
        run_cell(cfg)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_complete_one(workdir, caplog):
    cfg = cfg_of(*SMALL, "trainer.args.max_steps=3", "trainer.args.save_total_limit=5", results=workdir / "results")
    first = run_cell(cfg)
    ckpts = Path(cell_paths(cfg)["out_dir"]) / "checkpoints"
    assert checkpoint_problem(ckpts / "checkpoint-3") is None
    optimizer = ckpts / "checkpoint-3/optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # the process died while writing it
    assert "optimizer.pt cannot be read" in checkpoint_problem(ckpts / "checkpoint-3")
    weights = next((ckpts / "checkpoint-2").glob("*.safetensors"))
    broken_weights = weights.read_bytes()
    weights.write_bytes(broken_weights[: len(broken_weights) // 2])
    assert "safetensors cannot be read" in checkpoint_problem(ckpts / "checkpoint-2")
    weights.write_bytes(broken_weights)
    assert last_checkpoint(cell_paths(cfg)["out_dir"]).endswith("checkpoint-2")
    assert "checkpoint-3 is not resumable (optimizer.pt cannot be read" in caplog.text
    assert (ckpts / "checkpoint-3.incomplete").is_dir()

    cell_paths(cfg)["record"].unlink()
    resumed = run_cell(cfg)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["loss_history"][-1]["loss"] == pytest.approx(first["loss_history"][-1]["loss"], rel=1e-6)


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(workdir):
    """SIGINT is handled like SIGTERM: a checkpoint at the step it arrived in (no periodic one), exit 130."""
    cmd = [PY, str(REPO / "train.py"), *SMALL, "dataset.n_train=40", "trainer.args.max_steps=16",
           "trainer.args.save_steps=1000", f"results_dir={workdir / 'results'}", "experiment_name=ctrlc"]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.time() + 300, ""
    while "'loss'" not in seen:  # the first logged step: training is under way
        assert time.time() < deadline and proc.poll() is None, seen[-2000:]
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, (seen + out)[-2000:]
    (folder,) = (workdir / "outputs/ctrlc").glob("bbc_headlines.*")
    (ckpt,) = (folder / "checkpoints").glob("checkpoint-*")
    assert 0 < int(ckpt.name.split("-")[1]) < 16 and checkpoint_problem(ckpt) is None
    assert not list((workdir / "results/runs/ctrlc").glob("*/record.json"))

    resumed = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (record,) = [json.loads(p.read_text()) for p in (workdir / "results/runs/ctrlc").glob("*/record.json")]
    assert record["resumed_from"] == str(ckpt.absolute()) or record["resumed_from"].endswith(ckpt.name)
    assert record["loss_history"][-1]["step"] == 16


def record_of(cfg) -> dict:
    return json.loads(cell_paths(cfg)["record"].read_text())


# Found right after loading.
@pytest.mark.parametrize("field", ["n_train", "n_eval"])
def test_more_examples_than_the_split_has_are_refused_naming_the_field_and_the_size(workdir, field):
    """They were cut to the split's size silently, while the cell's name and hash kept the number asked for."""
    with pytest.raises(ConfigError, match=rf"dataset.{field}=100000 is more than the (\d+) examples of "
                                          rf"dataset=bbc_headlines's (train|test) split; set at most \1, or null"):
        run_cell(cfg_of(*SMALL, f"dataset.{field}=100000", results=workdir / "results"))
    assert nothing_under(workdir / "results")


# A signal during the final evaluation.
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


# A full disk.
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
    if how == "ENOSPC":   # a failed run is no result: once there is space, the same command runs the cell
        monkeypatch.undo()
        monkeypatch.chdir(workdir)
        assert run_cell(cfg)["status"] == "ok" and record_of(cfg)["status"] == "ok"


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
    assert rows(workdir / "results") == []   # the cells table holds ok records only: none was written


# The evaluation split does not depend on the training seed (so seeds are paired on the same examples).
@pytest.mark.parametrize("dataset", options("dataset"))
def test_dataset_loader_config_does_not_depend_on_the_seed(dataset):
    """Planted: `seed: ${seed}` in configs/dataset/bbc_news.yaml's loader -> fails (and in load_data below)."""
    loaders = [OmegaConf.to_container(cfg_of(f"dataset={dataset}", f"seed={s}").dataset.loader, resolve=True)
               for s in (0, 1, 7)]
    assert loaders[0] == loaders[1] == loaders[2]


def _samsum_files(tmp_path) -> list[str]:
    folder = tmp_path / "samsum"
    folder.mkdir()
    for split, n in (("train", 30), ("validation", 5), ("test", 30)):
        rows = [json.dumps({"id": f"{split}{i}", "dialogue": f"A: {split} message {i}\nB: ok {i}",
                            "summary": f"{split} summary {i}."}) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    files = ",".join(f"{s}:{folder}/{s}.jsonl" for s in ("train", "validation", "test"))
    return ["dataset.loader.path=json", f"+dataset.loader.data_files={{{files}}}"]


@pytest.mark.parametrize("dataset", ["bbc_news", "bbc_headlines", "samsum"])
def test_eval_split_is_the_same_for_every_seed(tmp_path, tiny, dataset):
    """Planted: `subset(raw["test"], cfg.dataset.n_eval, cfg.seed)` in load_data -> fails; so does a seeded
    BBC loader. The training subset must still follow the seed (else the check below would be vacuous)."""
    _, tokenizer = tiny
    extra = _samsum_files(tmp_path) if dataset == "samsum" else []
    splits = {}
    for seed in (0, 1):
        cfg = cfg_of(f"dataset={dataset}", f"seed={seed}", "model=tiny", "dataset.n_train=6", "dataset.n_eval=12",
                     *extra)
        _, train, test = load_data(cfg, tokenizer)
        splits[seed] = (train, test)
    (train0, test0), (train1, test1) = splits[0], splits[1]
    assert len(test0) == 12
    for column in ("prompt", "target", "input_ids"):
        assert test0[column] == test1[column], column
    assert train0["input_ids"] != train1["input_ids"]
