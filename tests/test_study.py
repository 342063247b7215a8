"""A study's table: configurations found and labelled from their identities, each compared with the control."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loran.pipeline.paired import holm
from loran.pipeline.study import (
    configurations, nulls_markdown, seed_nulls, study_rows, to_markdown, with_holm, write_csv,
)
from conftest import run_script

REPO = Path(__file__).resolve().parents[1]


def record(activation, params, seed, correct, texts=None, energy=0.0):
    identity = {"activation": {"name": activation, "params": params}, "seed": "<seed>", "trainer": {"lr": 1e-3}}
    preds = [{"id": f"n{i}", "prediction": (texts or {}).get(i, "sports"), "accuracy": float(c)}
             for i, c in enumerate(correct)]
    return {"status": "ok", "cell": f"{activation}{params}.seed{seed}", "identity": identity, "n_eval": len(correct),
            "eval_split": "validation", "choices": {"seed": seed}, "metrics": {"accuracy": float(np.mean(correct))},
            "predictions": preds, "update_spectrum": {"energy_beyond_r": energy}}


@pytest.fixture
def records():
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 2, 200) for _ in range(2)]
    out = []
    for seed in (0, 1):
        out.append(record("identity", {}, seed, base[seed]))
        out.append(record("sinter", {"amp": 5e-5, "omega": 1e4}, seed, base[seed]))  # = LoRA, example for example
        better = base[seed].copy()
        better[:40] = 1  # +some points on the first 40 examples
        out.append(record("sinter", {"amp": 0.5, "omega": 100.0}, seed, better, texts={0: "tech"}, energy=0.3))
    return out


def test_configurations_are_labelled_by_what_varies(records):
    labels = [g["label"] for g in configurations(records)]
    assert labels == ["activation=identity", "activation=sinter, amp=5e-05, omega=10000.0",
                      "activation=sinter, amp=0.5, omega=100.0"]


def test_each_configuration_against_the_control(records):
    rows = study_rows(records, "accuracy", {"activation.name": "identity"}, n_boot=500, plan=(5, 800))
    control, released, strong = rows[0], rows[1], rows[2]
    assert control["control"] and control["configuration"] == "activation=identity"
    ident = [r for r in records if r["identity"]["activation"]["name"] == "identity"]
    expected = np.mean([sum(1 - p["accuracy"] for p in r["predictions"][:40]) / 200 for r in ident])
    assert strong["delta"] == pytest.approx(expected) and strong["significant"] and strong["ci_low"] > 0
    assert strong["texts_differ"] == pytest.approx(1 / 200 / 1)  # one changed text per seed out of 200
    assert strong["energy_beyond_r"] == 0.3 and strong["planned_mde"] > 0
    assert released["delta"] == 0 and released["scores_differ"] == 0 and released["texts_differ"] == 0
    assert released["mde"] == 0 and not released["significant"]
    table = to_markdown(rows, "accuracy", "t", 3)
    assert "3 configurations in this experiment" in table and "| activation=identity | 2 |" in table


def test_holm_adjusts_every_comparison_of_the_table_and_the_table_shows_both_p_values(records):
    """The first round's 14 comparisons had no correction (issue 21): every study table now shows p and Holm's p over
    its comparisons; the control has neither."""
    rows = with_holm(study_rows(records, "accuracy", {"activation.name": "identity"}, n_boot=500))
    compared = [r for r in rows if not r["control"]]
    assert "p_holm" not in rows[0] and [r["p_holm"] for r in compared] == holm([r["p_value"] for r in compared])
    assert compared[1]["p_holm"] == pytest.approx(min(1, 2 * compared[1]["p_value"]))  # the smaller p, times 2
    table = to_markdown(rows, "accuracy", "t", 3)
    assert "| MDE | p | p (Holm) | scores differ |" in table and "adjusted over the 2 comparisons of this table" in table
    line = next(x for x in table.splitlines() if x.startswith("| activation=sinter, amp=0.5"))
    assert f"| {compared[1]['p_value']:.3f} | {compared[1]['p_holm']:.3f} |" in line
    assert "p (Holm)" not in to_markdown(study_rows(records, "accuracy", {"activation.name": "identity"}, n_boot=50),
                                         "accuracy", "t", 3)


def test_the_control_must_be_one_configuration(records):
    with pytest.raises(ValueError, match=r"control \{'activation.name': 'sinter'\} matches 2 configurations"):
        study_rows(records, "accuracy", {"activation.name": "sinter"})


def test_the_script_refuses_an_empty_experiment(tmp_path):
    proc = run_script("scripts/study_table.py", "screen", "--results", str(tmp_path))
    assert proc.returncode == 1 and "no successful run record under" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_the_script_writes_the_table(records, tmp_path):
    runs = tmp_path / "results/runs/screen"
    for r in records:
        (runs / r["cell"]).mkdir(parents=True)
        (runs / r["cell"] / "record.json").write_text(json.dumps(r))
    proc = subprocess.run([sys.executable, str(REPO / "scripts/study_table.py"), "screen", "--results",
                           str(tmp_path / "results"), "--boot", "200"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    markdown = (tmp_path / "results/screen.md").read_text()
    assert markdown == proc.stdout.rstrip("\n") + "\n"
    assert markdown.splitlines()[2] == ("Built from the run records by `python scripts/study_table.py screen "
                                        f"--results {tmp_path / 'results'} --boot 200`.")
    assert len((tmp_path / "results/screen.csv").read_text().splitlines()) == 4


def test_pair_by_compares_each_rank_with_lora_at_that_rank():
    """A rank study: each configuration against the control of its own rank, ranks in numeric order (2 < 16), and
    a configuration whose control has not run yet listed without a comparison."""
    rng = np.random.default_rng(1)

    def at_rank(activation, r, seed, correct):
        rec = record(activation, {}, seed, correct)
        rec["identity"]["adapter"] = {"peft": {"r": r}}
        rec["trainable_params"] = 100 * r
        rec["cell"] += f".r{r}"
        return rec

    lora = {r: rng.integers(0, 2, 100) for r in (2, 16)}
    sine = {2: lora[2].copy(), 16: 1 - lora[16]}     # equal to LoRA at r = 2; every example flipped at r = 16
    records = [at_rank("identity", r, 0, lora[r]) for r in (2, 16)] + \
              [at_rank("sine", r, 0, sine[r]) for r in (2, 16)] + [at_rank("sine", 4, 0, lora[2])]
    rows = study_rows(records, "accuracy", {"activation.name": "identity"}, n_boot=200, pair_by=("adapter.peft.r",))
    assert [(r["configuration"], r["control"]) for r in rows] == [
        ("activation=identity, r=2", True), ("activation=sine, r=2", False), ("activation=sine, r=4", False),
        ("activation=identity, r=16", True), ("activation=sine, r=16", False)]
    controls = ["activation=identity, r=2", "activation=identity, r=16"]
    assert [r.get("versus") for r in rows] == [None, controls[0], None, None, controls[1]]
    assert rows[1]["delta"] == 0 and rows[1]["scores_differ"] == 0
    assert rows[4]["delta"] == pytest.approx(1 - 2 * lora[16].mean()) and rows[4]["scores_differ"] == 1
    assert "delta" not in rows[2] and [r["trainable_params"] for r in rows] == [200, 200, 400, 1600, 1600]
    table = to_markdown(rows, "accuracy", "t", 5)
    assert "| activation=sine, r=4 | 1 | 400 | " in table and "no control yet" in table


def test_each_configuration_has_its_own_interval(records):
    """The per-configuration 95% interval (two-way bootstrap of its own mean: seeds and examples resampled) against
    1.96 times the crossed bootstrap's exact standard error, written out here: for M = m + a_i + b_j + e_ij (row,
    column and residual effects of the 2 x 200 score matrix), var = var(a) / S + var(b) / N + mean(e^2) / (S N).
    On these records an examples-only bootstrap is 16 % narrower and a seeds-only one 95 %: outside the 10 % allowed."""
    control = study_rows(records, "accuracy", {"activation.name": "identity"}, n_boot=2000)[0]
    m = np.array([[p["accuracy"] for p in r["predictions"]] for r in records if r["cell"].startswith("identity")])
    (s, n), row, col = m.shape, m.mean(axis=1), m.mean(axis=0)
    e = m - row[:, None] - col[None, :] + m.mean()
    se = np.sqrt(row.var() / s + col.var() / n + (e**2).mean() / (s * n))
    assert control["accuracy_low"] < control["accuracy"] < control["accuracy_high"]
    assert (control["accuracy_high"] - control["accuracy_low"]) / 2 == pytest.approx(1.96 * se, rel=0.1)


def test_labels_name_the_group_option_and_leave_out_what_only_follows_it():
    """LoRAN with three activations next to DoRA: the adapter option is shown (adapter=dora), the keys that come with
    an option (use_dora, _target_, Sine-LoRA's g) are not, unless a command line set them (omega=300)."""
    def rec(adapter, activation, params, overrides):
        identity = {"adapter": {"name": adapter, "peft": {"r": 8, "use_dora": adapter == "dora"},
                                "_target_": f"{adapter}.Config"},
                    "activation": {"name": activation, "params": params}, "seed": "<seed>"}
        return {**record(activation, params, 0, [1, 0]), "identity": identity, "overrides": overrides}

    records = [rec("loran", "identity", {}, ["activation=identity"]),
               rec("loran", "sine", {"omega": 300, "g": 24.0}, ["activation=sine", "activation.params.omega=300"]),
               rec("loran", "sinter", {"amp": 0.05, "omega": 1e4}, ["activation.params.amp=0.05"]),
               rec("dora", "none", {}, ["adapter=dora"])]
    labels = sorted(g["label"] for g in configurations(records))
    assert labels == ["activation=identity, adapter=loran", "activation=none, adapter=dora",
                      "activation=sine, adapter=loran, omega=300",
                      "activation=sinter, adapter=loran, amp=0.05, omega=10000.0"]
    # without the command lines, omega and amp each follow the activation here and are left out: the options alone
    # tell these configurations apart
    bare = sorted(g["label"] for g in configurations([{**r, "overrides": []} for r in records]))
    assert bare == ["activation=identity, adapter=loran", "activation=none, adapter=dora",
                    "activation=sine, adapter=loran", "activation=sinter, adapter=loran"]
    # Hydra's append and delete prefixes (+key=, ~key=) name the same key
    appended = [{**r, "overrides": [o if "=" not in o or "params" not in o else "+" + o for o in r["overrides"]]}
                for r in records]
    assert sorted(g["label"] for g in configurations(appended)) == labels


def test_the_seed_null_compares_two_seeds_of_one_configuration_by_example():
    """Seeds 0 and 1 of LoRA differ on examples 0-9 (seed 1 right, seed 0 wrong) and in the text of example 0: the
    null is +10 points over 100 examples, 10 % of scores and 1 % of texts differ; a one-seed configuration has none."""
    correct0 = np.array([0] * 10 + [1] * 90)
    correct1 = np.ones(100, dtype=int)
    runs = [record("identity", {}, 0, correct0), record("identity", {}, 1, correct1, texts={0: "tech"}),
            record("sinter", {"amp": 0.5, "omega": 100.0}, 0, correct1)]
    rows = seed_nulls(runs, "accuracy", n_boot=200)
    assert len(rows) == 1 and rows[0]["configuration"] == "activation=identity" and rows[0]["seeds"] == [0, 1]
    assert rows[0]["delta"] == pytest.approx(0.10) and rows[0]["scores_differ"] == pytest.approx(0.10)
    assert rows[0]["texts_differ"] == pytest.approx(0.01) and rows[0]["ci_low"] > 0
    assert "| activation=identity | 1 - 0 | +10.00 [" in nulls_markdown(rows) and nulls_markdown([]) == ""


def test_the_seed_null_interval_is_compare_s_with_the_draws_asked_for():
    """The null's interval is paired.compare's on the two seeds' scores, at the n_boot given (2,000 by default)."""
    from loran.pipeline.paired import compare

    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, 80), rng.integers(0, 2, 80)
    runs = [record("identity", {}, 0, a), record("identity", {}, 1, b)]
    as_runs = {name: {0: {f"n{i}": float(v) for i, v in enumerate(x)}} for name, x in (("a", a), ("b", b))}
    for n_boot, row in ((300, seed_nulls(runs, "accuracy", n_boot=300)[0]), (2000, seed_nulls(runs, "accuracy")[0])):
        expected = compare(as_runs["b"], as_runs["a"], n_boot=n_boot)
        assert (row["ci_low"], row["ci_high"], row["mde"]) == (expected.ci_low, expected.ci_high, expected.mde)


ROWS = [  # a control, a compared row with everything, one without a control yet (values as fractions)
    {"configuration": "activation=identity", "seeds": [0, 1], "trainable_params": 1234567, "accuracy": 0.9282,
     "control": True, "energy_beyond_r": None, "scores_differ": None, "texts_differ": None},
    {"configuration": "amp=0.5", "seeds": [0, 1], "trainable_params": 1234567, "accuracy": 0.9402, "control": False,
     "delta": 0.012, "ci_low": 0.0012, "ci_high": 0.0231, "significant": True, "mde": 0.0115, "p_value": 0.04,
     "p_holm": 0.56, "scores_differ": 0.044, "texts_differ": 0.05, "energy_beyond_r": 0.123456, "planned_mde": 0.009,
     "components": {"seed": 1e-4, "example": 0.0}},
    {"configuration": "amp=5e-3", "seeds": [0], "trainable_params": None, "accuracy": 0.93, "control": False,
     "energy_beyond_r": 1.2e-9},
]


def test_the_study_table_renders_every_column_as_written_here():
    """The whole markdown of three rows, written out by hand: header, note, signs, star, dashes, thousands."""
    assert to_markdown(ROWS, "accuracy", "T", 7) == (
        "# T\n\n"
        "7 configurations in this experiment (every one is listed). Differences are paired by seed and example: "
        "two-way bootstrap over seeds and examples, 95% percentile interval (* = excludes 0); MDE = minimal "
        "detectable effect at 80% power (2.80 x bootstrap SE). Values in percent; energy beyond r is the share of "
        "the middle adapted layer's update energy beyond rank r; trainable = trainable parameters. Each "
        "configuration is compared with the control listed above it. p: two-sided, from the bootstrap; p (Holm): "
        "adjusted over the 1 comparisons of this table.\n\n"
        "| configuration | seeds | trainable | accuracy | vs control [95% CI] | MDE | p | p (Holm) | scores differ | "
        "texts differ | energy beyond r | planned MDE |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| activation=identity | 2 | 1,234,567 | 92.82 | control | - | - | - | - | - | - | - |\n"
        "| amp=0.5 | 2 | 1,234,567 | 94.02 | +1.20 [+0.12, +2.31]* | 1.15 | 0.040 | 0.560 | 4.40 | 5.00 | 1.23e-01 "
        "| 0.90 |\n"
        "| amp=5e-3 | 1 | - | 93.00 | no control yet | - | - | - | - | - | 1.20e-09 | - |\n")
    plain = [{k: v for k, v in r.items() if k not in ("p_value", "p_holm", "planned_mde")} for r in ROWS[:2]]
    plain[1].update(significant=False, delta=-0.012, ci_low=-0.0231, ci_high=0.0012)
    lines = to_markdown(plain, "accuracy", "T", 2).splitlines()
    assert lines[2].endswith("with the control listed above it.")
    assert lines[4:] == ["| configuration | seeds | trainable | accuracy | vs control [95% CI] | MDE | scores differ | "
                         "texts differ | energy beyond r |", "|---|---|---|---|---|---|---|---|---|",
                         "| activation=identity | 2 | 1,234,567 | 92.82 | control | - | - | - | - |",
                         "| amp=0.5 | 2 | 1,234,567 | 94.02 | -1.20 [-2.31, +0.12] | 1.15 | 4.40 | 5.00 | 1.23e-01 |"]


def test_the_seed_null_section_renders_as_written_here():
    rows = [{"configuration": "lora", "seeds": [0, 1], "delta": 0.0, "ci_low": -0.0287, "ci_high": 0.0287,
             "significant": False, "mde": 0.0402, "scores_differ": 0.0383, "texts_differ": 0.0431},
            {"configuration": "sine r=2", "seeds": [1, 2], "delta": -0.0227, "ci_low": -0.0383, "ci_high": -0.0083,
             "significant": True, "mde": 0.0085, "scores_differ": 0.06, "texts_differ": 0.07},
            {"configuration": "sine r=8", "seeds": [0, 2], "delta": 0.015, "ci_low": 0.001, "ci_high": 0.03,
             "significant": True, "mde": 0.01, "scores_differ": 0.02, "texts_differ": 0.03}]
    assert nulls_markdown(rows) == (
        "\n## Seed-to-seed null\n\nThe same configuration trained with two seeds, compared example by example as a "
        "single-seed comparison is: what a single-seed difference looks like when nothing but the seed changed.\n\n"
        "| configuration | seeds | difference [95% CI] | MDE | scores differ | texts differ |\n"
        "|---|---|---|---|---|---|\n"
        "| lora | 1 - 0 | +0.00 [-2.87, +2.87] | 4.02 | 3.83 | 4.31 |\n"
        "| sine r=2 | 2 - 1 | -2.27 [-3.83, -0.83]* | 0.85 | 6.00 | 7.00 |\n"
        "| sine r=8 | 2 - 0 | +1.50 [+0.10, +3.00]* | 1.00 | 2.00 | 3.00 |\n")


def test_the_csv_holds_every_field_of_every_row_lists_as_json(tmp_path):
    import csv

    write_csv(ROWS, tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == list(dict.fromkeys(k for r in ROWS for k in r))  # first seen, first column
    assert json.loads(back[1]["seeds"]) == [0, 1] and float(back[1]["delta"]) == 0.012
    assert json.loads(back[1]["components"]) == {"seed": 1e-4, "example": 0.0} and back[0]["components"] == ""
    assert back[0]["delta"] == "" and back[2]["trainable_params"] == "" and back[2]["energy_beyond_r"] == "1.2e-09"
