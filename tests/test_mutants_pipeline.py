"""Pipeline tests that fail when a silent wrong number could reach a table (issue 16, items 4, 5, 7, 9).

They go through public behaviour only (composed configs, ``load_data``, ``generate``/``evaluate``, ``train.py`` as
a subprocess), so that they survive a refactor of loran/pipeline/run.py. Each names the planted bug it was checked against.
"""
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import loran.autograd as la
from loran import LoranConfig, get_loran_model, loran_layers
from loran.activations import ACTIVATIONS
from loran.pipeline.evaluation import evaluate
from loran.pipeline.generation import generate
from loran.pipeline.metrics import classification
from loran.pipeline.run import load_data

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def cfg_of(overrides=()):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny():
    from loran.pipeline.base_models import tiny_causal_lm

    return tiny_causal_lm(seed=0)


# ----------------------------------------------------------------------------------------------------------------
# 5. The evaluation split does not depend on the training seed (so seeds are paired on the same examples).


@pytest.mark.parametrize("dataset", options("dataset"))
def test_dataset_loader_config_does_not_depend_on_the_seed(dataset):
    """Planted: `seed: ${seed}` in configs/dataset/bbc_news.yaml's loader -> fails (and in load_data below)."""
    loaders = [OmegaConf.to_container(cfg_of([f"dataset={dataset}", f"seed={s}"]).dataset.loader, resolve=True)
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
        cfg = cfg_of([f"dataset={dataset}", f"seed={seed}", "model=tiny", "dataset.n_train=6", "dataset.n_eval=12",
                      *extra])
        _, train, test = load_data(cfg, tokenizer)
        splits[seed] = (train, test)
    (train0, test0), (train1, test1) = splits[0], splits[1]
    assert len(test0) == 12
    for column in ("prompt", "target", "input_ids"):
        assert test0[column] == test1[column], column
    assert train0["input_ids"] != train1["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# 7. Each Table 2 row runs its activation with its parameters and start="base".


ROWS = [r for r in options("row") if r.startswith("loran_")]


@pytest.mark.parametrize("experiment", [None, "table2_mini", "table2"])
@pytest.mark.parametrize("row", ROWS)
def test_every_loran_row_builds_its_activation_with_its_start(row, experiment):
    """Planted: `start: official` in configs/adapter/loran.yaml -> fails (it reached every row). Rows named
    *_official start as the official code does; every other row starts at the base model."""
    overrides = [f"row={row}"] + ([f"experiment={experiment}"] if experiment else [])
    cfg = cfg_of(overrides)
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
    cfg = cfg_of(["row=loran_sigmoid", "activation.start=official"])
    peft = instantiate(cfg.adapter.peft, target_modules=list(cfg.model.target_modules), _convert_="all")
    assert peft.start == "official" and float(peft.build_activation().f(torch.zeros(()))) == 0.5
    cfg = cfg_of(["row=loran_sinter", "activation.params.amp=0.25"])
    peft = instantiate(cfg.adapter.peft, target_modules=list(cfg.model.target_modules), _convert_="all")
    assert peft.activation_kwargs == {"amp": 0.25, "omega": 1e4}


def test_qlora_row_is_lora():
    """QLoRA is LoRAN with the identity, computed as LoRA (loran/config.py explains why it is not peft.LoraConfig)."""
    cfg = cfg_of(["row=qlora"])
    peft = instantiate(cfg.adapter.peft, target_modules=list(cfg.model.target_modules), _convert_="all")
    assert type(peft).__name__ == "LoranConfig" and peft.activation == "identity" and cfg.activation.name == "none"
    assert peft.build_activation().linear


# ----------------------------------------------------------------------------------------------------------------
# 9. Generation (and so evaluation) runs the model in eval mode: no adapter dropout in the outputs.


@pytest.fixture
def noisy_model(tiny, monkeypatch):
    """The tiny Llama with a strong LoRAN update behind dropout 0.9, left in train mode."""
    monkeypatch.setattr(la, "COMPILE", "never")
    base, tokenizer = tiny
    import copy

    model = get_loran_model(copy.deepcopy(base), LoranConfig(r=4, lora_alpha=32, lora_dropout=0.9,
                                                             target_modules=["q_proj", "v_proj"], activation="tanh"))
    gen = torch.Generator().manual_seed(3)
    for _, layer in loran_layers(model):
        for lin in (layer.lora_A["default"], layer.lora_B["default"]):
            lin.weight.data = torch.randn(lin.weight.shape, generator=gen)
    return model.train(), tokenizer


PROMPTS = ["Article: the markets fell today\nTopic:", "Article: a new film opened\nTopic:",
           "Article: the election was close\nTopic:", "Article: the match ended in a draw\nTopic:"]


def test_generation_in_train_mode_equals_eval_mode_and_restores_train_mode(noisy_model):
    """Planted: `model.eval()` removed from generation.generate -> fails."""
    model, tokenizer = noisy_model
    torch.manual_seed(0)
    from_train = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    assert model.training
    model.eval()
    from_eval = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    assert not model.training
    assert from_train == from_eval
    # The check can tell: the same prompts with the dropout active give other outputs.
    model.train()
    with torch.no_grad():
        ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        torch.manual_seed(1)
        noisy = model(ids).logits
        model.eval()
        clean = model(ids).logits
    assert not torch.allclose(noisy, clean, atol=1e-3)


def test_evaluate_scores_eval_mode_outputs(noisy_model):
    model, tokenizer = noisy_model
    labels = ["business", "entertainment", "politics", "sport"]
    data = Dataset.from_dict({"example_id": [f"p{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS,
                              "target": labels, "input_ids": [tokenizer(p)["input_ids"] for p in PROMPTS]})
    metric = lambda p, t: classification(p, t, labels)  # noqa: E731
    torch.manual_seed(0)
    in_train = evaluate(model, tokenizer, data, metric, max_new_tokens=6, batch_size=4)
    in_eval = evaluate(model.eval(), tokenizer, data, metric, max_new_tokens=6, batch_size=4)
    assert in_train["examples"] == in_eval["examples"] and in_train["metrics"] == in_eval["metrics"]
    assert in_train["predictions"] == in_eval["predictions"]
    assert [e["target"] for e in in_train["examples"]] == labels


# ----------------------------------------------------------------------------------------------------------------
# 4. SIGTERM saves a checkpoint at the step where training stopped (no periodic checkpoint to fall back on).


TINY = ["model=tiny", "dataset=bbc_headlines", "dataset.n_train=400", "dataset.n_eval=4", "trainer.eval_batch_size=4",
        "zero_shot=false", "logger=none", "trainer.args.per_device_train_batch_size=2", "trainer.args.logging_steps=1",
        "trainer.args.max_steps=200", "trainer.args.save_steps=100000", "dataset.prompt.max_source_tokens=32"]


def test_sigterm_saves_a_checkpoint_at_the_step_it_stops(tmp_path):
    """Planted: `control.should_save = True` removed from PreemptionCallback.on_step_end -> fails (no checkpoint)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, f"results_dir={tmp_path / 'results'}",
                             "experiment_name=term"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    loss_line = re.compile(r"'loss': ")
    deadline = time.time() + 300
    try:
        while sum(bool(loss_line.search(line)) for line in list(lines)) < 3:
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.time() < deadline, "no training steps logged in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 143, out[-3000:]
    steps = sum(bool(loss_line.search(line)) for line in lines)  # logging_steps=1: one loss line per step
    assert 3 <= steps < 200
    ckpts = list((tmp_path / "outputs/term").glob("*/checkpoints/checkpoint-*"))
    assert [p.name for p in ckpts] == [f"checkpoint-{steps}"], (ckpts, out[-2000:])
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    assert any(ckpts[0].glob("adapter_model.*")) and (ckpts[0] / "optimizer.pt").exists()
    assert not list((tmp_path / "results").rglob("record.json"))  # no record for a preempted cell
