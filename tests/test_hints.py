"""loran/pipeline/hints.py: a key Hydra cannot override is named with the key the config has (Hydra's own message
suggests adding the typo with `+key=value`), on the config train.py composes, for a single run and for a sweep."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from loran.pipeline.hints import split_overrides, unknown_key

from conftest import PY, REPO, SMALL, nothing_under


@pytest.fixture
def cfg():
    cfg = OmegaConf.create({"seed": 0, "adapter": {"name": "loran", "peft": {"r": 8, "lora_alpha": 16}},
                            "trainer": {"args": {"learning_rate": 1e-3, "max_steps": 100}},
                            "activation": {"name": "relu", "params": {}}, "hydra": {"run": {"dir": "x"}}})
    OmegaConf.set_struct(cfg, True)
    return cfg


@pytest.mark.parametrize("key, line", [
    ("trainer.args.learnng_rate", "trainer.args.learnng_rate: trainer.args has no key 'learnng_rate'; did you mean "
                                  "'trainer.args.learning_rate'? (trainer.args has learning_rate, max_steps)"),
    ("trainer.args.lr", "trainer.args.lr: trainer.args has no key 'lr'; did you mean 'trainer.args.learning_rate'? "
                        "(trainer.args has learning_rate, max_steps)"),              # a synonym, not a spelling
    ("adapter.rank", "adapter.rank: adapter has no key 'rank'; did you mean 'adapter.peft.r'? "
                     "(adapter has name, peft)"),                                     # one level deeper
    ("sed", "sed: the top level has no key 'sed'; did you mean 'seed'? "
            "(the top level has activation, adapter, seed, trainer)"),               # Hydra's node is left out
    ("lora.rank", "lora.rank: the top level has no key 'lora'; did you mean 'adapter'? "
                  "(the top level has activation, adapter, seed, trainer)"),          # a missing middle part
    ("activation.params.amp", "activation.params.amp: activation.params has no key 'amp' (activation.params has "
                              "no keys)"),
    ("trainer.args.zzzz", "trainer.args.zzzz: trainer.args has no key 'zzzz' (trainer.args has learning_rate, "
                          "max_steps)"),                                              # nothing close: no guess
])
def test_an_unknown_key_is_named_with_the_key_it_most_likely_meant(cfg, key, line):
    assert unknown_key(cfg, key) == line


@pytest.mark.parametrize("key", ["trainer.args.learning_rate", "adapter.peft.r", "seed.x", "seed"])
def test_a_key_that_is_there_or_below_a_value_gets_no_hint(cfg, key):
    assert unknown_key(cfg, key) is None


def test_overrides_split_into_group_choices_and_keys():
    choices, keys = split_overrides(
        ["-m", "dataset=bbc_news,bbc_headlines", "adapter=dora", "hydra/launcher=basic", "seed=0,1",
         "trainer.args.lr=1e-3", "+trainer.args.adam_beta2=0.9", "~zero_shot", "hydra.verbose=true"],
        groups={"dataset", "adapter", "activation"})
    assert choices == ["dataset=bbc_news", "adapter=dora"]        # a sweep's first option; Hydra's own groups left out
    assert keys == ["seed", "trainer.args.lr"]                     # `+`, `~` and hydra.* left out


@pytest.mark.parametrize("overrides, hint", [
    (["trainer.args.learnng_rate=1e-3"], "did you mean 'trainer.args.learning_rate'?"),
    (["adapter=dora", "adapter.rank=4"], "did you mean 'adapter.peft.r'?"),            # dora's config is composed
])
def test_train_py_names_the_key_hydra_could_not_override_without_importing_torch(workdir, overrides, hint):
    proc = subprocess.run([PY, "-X", "importtime", str(REPO / "train.py"), *SMALL, *overrides,
                           f"results_dir={workdir / 'results'}"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"Could not override '{overrides[-1].split('=')[0]}'" in proc.stderr   # Hydra's message, kept
    assert hint in proc.stderr, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported
    assert nothing_under(workdir / "outputs") and nothing_under(workdir / "results")


def test_a_sweep_names_the_key_once_for_all_its_cells(workdir):
    proc = subprocess.run([PY, str(REPO / "train.py"), "-m", *SMALL, "seed=0,1", "trainer.args.lr=1e-3,3e-3",
                           f"results_dir={workdir / 'results'}"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error in 4 of the sweep's cells; none was run:" in proc.stderr
    assert proc.stderr.count("trainer.args.lr: trainer.args has no key 'lr'; did you mean "
                             "'trainer.args.learning_rate'?") == 1, proc.stderr[-2000:]
    assert nothing_under(workdir / "outputs") and nothing_under(workdir / "results")


def test_a_malformed_or_unknown_choice_leaves_hydra_s_message_alone(workdir):
    for bad in (["activation=nosuch"], ["seed=[1"]):
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *SMALL, *bad], cwd=workdir,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "has no key" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
