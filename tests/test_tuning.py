"""Choosing on validation (loran/pipeline/tuning.py, scripts/study_choose.py): the training length from the control's
curve and each method's learning rate, on records whose identities are composed from the study's own configs."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from loran.pipeline.cells import flatten, identity
from loran.pipeline.metrics import primary_metric
from loran.pipeline.tuning import choose_length, choose_settings, confirmation_seeds, length_curve
from conftest import REPO, cfg_of, run_script

CONTROL = {"adapter.name": "loran", "adapter.peft.activation": "identity", "trainer.args.learning_rate": "0.001"}


def record(*overrides, seed=0, value=0.5):
    cfg = cfg_of("experiment=study_tuned_val", f"seed={seed}", *overrides)
    metric = primary_metric({"identity": identity(cfg)})
    return {"status": "ok", "cell": cfg.cell, "identity": identity(cfg), "choices": {"seed": seed},
            "metrics": {metric: value}}


@pytest.mark.parametrize("curve, delta, chosen", [
    ({100: 0.90, 200: 0.95, 400: 0.955}, 0.01, 200),     # 400 is within delta of the best: 200 suffices
    ({100: 0.90, 200: 0.93, 400: 0.95}, 0.01, 400),      # still improving: the longest
    ({100: 0.95, 200: 0.94, 400: 0.945}, 0.01, 100),     # no better later
    ({100: 0.90, 200: 0.939, 400: 0.95}, 0.01, 400),     # 1.1 points short of the best is not within 1.0
    ({100: 0.90, 200: 0.94, 400: 0.95}, 0.01, 200),      # exactly delta short counts as within
])
def test_choose_length_takes_the_shortest_within_delta_of_the_best(curve, delta, chosen):
    assert choose_length(curve, delta) == chosen


def test_the_length_curve_reads_only_the_control_at_its_seed_and_task():
    records = [record("dataset=bbc_news", "activation=identity", f"trainer.args.max_steps={n}", value=v)
               for n, v in ((100, 0.90), (200, 0.95), (400, 0.96))]
    records += [record("dataset=bbc_news", "activation=identity", "trainer.args.max_steps=400", seed=1, value=0.1),
                record("dataset=bbc_news", "activation=sinter", "trainer.args.max_steps=100", value=0.99),
                record("dataset=bbc_news", "activation=identity", "trainer.args.max_steps=100",
                       "trainer.args.learning_rate=3e-3", value=0.99),
                record("dataset=bbc_headlines", "activation=identity", "trainer.args.max_steps=100", value=0.99)]
    curve = length_curve(records, "bbc_news", CONTROL, seed=0, lengths=(100, 200, 400))
    assert curve == {100: 0.90, 200: 0.95, 400: 0.96}
    assert choose_length(curve, 0.01) == 200
    assert primary_metric(records[-1]) == "rougeL" and primary_metric(records[0]) == "accuracy"
    with pytest.raises(ValueError, match=r"no finished run at trainer.args.max_steps=\[200, 400\]"):
        length_curve(records, "bbc_headlines", CONTROL, seed=0, lengths=(100, 200, 400))


def test_choose_settings_takes_the_best_mean_per_method_and_counts_what_was_tried():
    scores = {  # (method overrides, lr): (seed 0, seed 1)
        (("activation=identity",), "3e-4"): (0.80, 0.82), (("activation=identity",), "1e-3"): (0.90, 0.86),
        (("activation=identity",), "3e-3"): (0.91, 0.84),   # best seed 0, not the best mean
        (("adapter=dora",), "3e-4"): (0.70, 0.70), (("adapter=dora",), "1e-3"): (0.70, 0.70),  # tie: the smaller
        (("adapter=dora",), "3e-3"): (0.99, None),           # seed 1 diverged: not eligible
    }
    records = [record("dataset=bbc_news", *method, f"trainer.args.learning_rate={lr}", seed=s, value=v)
               for (method, lr), values in scores.items() for s, v in enumerate(values) if v is not None]
    by_method = {e["method"]["adapter.name"]: e for e in choose_settings(records)}
    lora, dora = by_method["loran"], by_method["dora"]
    assert lora["chosen"] == 1e-3 and lora["tried"] == 3 and lora["metric"] == "accuracy"
    assert lora["means"] == pytest.approx({3e-4: 0.81, 1e-3: 0.88, 3e-3: 0.875})
    assert dora["chosen"] == 3e-4 and dora["tried"] == 3 and 3e-3 not in dora["means"]
    assert dora["runs"] == {3e-4: [0, 1], 1e-3: [0, 1], 3e-3: [0]}


def test_a_tie_in_articles_goes_to_the_smaller_learning_rate_whatever_the_last_bit_of_the_means():
    """200 + 203 and 201 + 202 of 209 articles right are one count, 403, but their float means differ in the last bit
    (the larger learning rate's is the larger one): a tie, so the smaller learning rate."""
    scores = {"3e-4": (200 / 209, 203 / 209), "1e-3": (201 / 209, 202 / 209), "3e-3": (199 / 209, 204 / 209)}
    records = [record("dataset=bbc_news", "activation=identity", f"trainer.args.learning_rate={lr}", seed=s, value=v)
               for lr, values in scores.items() for s, v in enumerate(values)]
    (entry,) = choose_settings(records)
    assert entry["means"][1e-3] > entry["means"][3e-4]   # one ulp apart: what a plain max would have taken
    assert entry["chosen"] == 3e-4
    one_more = [r for r in records if not (r["identity"]["trainer"]["args"]["learning_rate"] == 1e-3
                                          and r["choices"]["seed"] == 1)]
    one_more.append(record("dataset=bbc_news", "activation=identity", "trainer.args.learning_rate=1e-3", seed=1,
                           value=203 / 209))
    assert choose_settings(one_more)[0]["chosen"] == 1e-3   # one article more is not a tie


def test_the_length_rules_refuse_what_they_cannot_decide():
    with pytest.raises(ValueError, match="^no length measured: run the control's length curve first$"):
        choose_length({}, 0.01)
    twice = [record("dataset=bbc_news", "activation=identity", "trainer.args.max_steps=100", value=v) for v in (.9, .8)]
    with pytest.raises(ValueError, match="two control records at trainer.args.max_steps=100 on bbc_news, seed 0: "
                                         "the control must match one configuration"):
        length_curve(twice, "bbc_news", CONTROL)
    seeds = [record("dataset=bbc_news", "activation=identity", "trainer.args.max_steps=100", seed=s, value=v)
             for s, v in ((0, 0.9), (1, 0.1))]
    assert length_curve(seeds, "bbc_news", CONTROL) == {100: 0.9}   # seed 0 by default, any lengths


def test_a_method_is_its_identity_without_the_tuned_key_in_any_key_order():
    from loran.pipeline.tuning import LENGTH_KEY, LR_KEY, method_of

    a = record("dataset=bbc_news", "activation=identity", "trainer.args.learning_rate=3e-4")
    b = {**a, "identity": dict(reversed(list(a["identity"].items())))}
    assert list(b["identity"]) != list(a["identity"]) and method_of(a) == method_of(b)
    assert LR_KEY not in json.loads(method_of(a)) and LENGTH_KEY in json.loads(method_of(a))
    assert json.loads(method_of(a, "no.such.key")) == flatten(a["identity"])   # nothing to leave out: all of it
    from loran.pipeline.tuning import value_of

    assert value_of(a, LR_KEY) == 3e-4
    with pytest.raises(ValueError, match=rf"record {a['cell']} has no no.such.key in its identity"):
        value_of(a, "no.such.key")


def test_choose_settings_over_another_key_and_with_diverged_runs():
    """Tuning the length instead of the learning rate (the tuned key is a parameter), and diverged runs: a value with a
    diverged seed is tried but not eligible, and the runs it has are listed."""
    from loran.pipeline.tuning import LENGTH_KEY

    def at(steps, seed, value):
        return record("dataset=bbc_news", "activation=identity", f"trainer.args.max_steps={steps}", seed=seed,
                      value=value)

    finished = [at(100, 0, 0.7), at(100, 1, 0.7), at(200, 0, 0.9), at(400, 0, 0.8), at(400, 1, 0.8)]
    diverged = [at(200, 1, None), at(800, 0, None), at(800, 1, None)]
    (entry,) = choose_settings(finished, tuned=LENGTH_KEY, diverged=diverged)
    assert entry["chosen"] == 400 and entry["tried"] == 4 and entry["means"] == pytest.approx({100: 0.7, 400: 0.8})
    assert entry["diverged"] == {200: [1], 800: [0, 1]}
    assert entry["runs"] == {100: [0, 1], 200: [0], 400: [0, 1], 800: []}
    assert LENGTH_KEY not in entry["method"] and entry["method"]["trainer.args.learning_rate"] == 0.001
    (alone,) = choose_settings([at(100, 0, 0.7)], tuned=LENGTH_KEY)    # one seed: nothing eligible, no choice
    assert alone["chosen"] is None and alone["means"] == {} and alone["tried"] == 1


def test_the_script_prints_the_chosen_length_and_writes_the_choices(tmp_path):
    runs = tmp_path / "runs" / "study_tuned_val"
    for n, v in ((100, 0.20), (200, 0.26), (400, 0.262)):
        rec = record("dataset=bbc_headlines", "activation=identity", f"trainer.args.max_steps={n}", value=v)
        (runs / rec["cell"]).mkdir(parents=True)
        (runs / rec["cell"] / "record.json").write_text(json.dumps(rec))
    script = [sys.executable, "scripts/study_choose.py"]
    done = subprocess.run([*script, "length", "study_tuned_val", "--dataset", "bbc_headlines",
                           "--results", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "200\n" and "rougeL" in done.stderr
    missing = run_script("scripts/study_choose.py", "length", "study_tuned_val", "--dataset", "bbc_news",
                         "--results", str(tmp_path))
    assert missing.returncode == 1 and missing.stdout == "" and "no choice made" in missing.stderr
    nothing = run_script("scripts/study_choose.py", "extension", "study_tuned_val", "--results", str(tmp_path))
    assert (nothing.returncode, nothing.stdout) == (0, ""), nothing.stderr   # owed only once the protocol's rates ran
    for what in ("lr", "seeds", "overrides"):  # one seed of one learning rate: the grid is not complete
        refused = run_script("scripts/study_choose.py", what, "study_tuned_val", "--results", str(tmp_path))
        assert refused.returncode == 1 and refused.stdout == "", refused.stderr
        assert "the validation grid is incomplete" in refused.stderr and "finish it" in refused.stderr
    # the protocol's rates are the grid's, whatever the records hold
    assert ("incomplete, 5 runs missing (bbc_headlines loran-identity lr 0.0003 seed 0; bbc_headlines loran-identity "
            "lr 0.0003 seed 1; bbc_headlines loran-identity lr 0.001 seed 1; bbc_headlines loran-identity lr 0.003 "
            "seed 0; ...)") in refused.stderr
    assert not list(tmp_path.glob("study_tuned_val_*")), "a refused choice writes nothing"


def write(runs, rec):
    (runs / rec["cell"]).mkdir(parents=True)
    (runs / rec["cell"] / "record.json").write_text(json.dumps(rec))


def test_grid_gaps_lists_every_combination_of_the_axes_that_no_record_holds():
    from loran.pipeline.tuning import LR_KEY, grid_gaps, value_of

    runs = [record("dataset=bbc_news", "activation=identity", f"trainer.args.learning_rate={lr}", seed=s)
            for lr in ("3e-4", "1e-3") for s in (0, 1)]
    dora = [record("dataset=bbc_news", "adapter=dora", "trainer.args.learning_rate=1e-3", seed=0)]
    axes = {"adapter": lambda r: r["identity"]["adapter"]["name"], "lr": lambda r: value_of(r, LR_KEY),
            "seed": lambda r: r["choices"]["seed"]}
    assert grid_gaps(runs, axes) == []
    assert grid_gaps(runs + dora, axes) == [{"adapter": "dora", "lr": 3e-4, "seed": 0},
                                            {"adapter": "dora", "lr": 3e-4, "seed": 1},
                                            {"adapter": "dora", "lr": 1e-3, "seed": 1}]
    assert grid_gaps(runs, axes, {"seed": (0, 1, 2)}) == [{"adapter": "loran", "lr": 3e-4, "seed": 2},
                                                          {"adapter": "loran", "lr": 1e-3, "seed": 2}]


def test_a_diverged_run_completes_the_grid_counts_as_tried_and_makes_its_learning_rate_ineligible(tmp_path):
    """LoRA and Sinter amp 0.5 at 3 learning rates x 2 seeds on bbc_news; Sinter's seed 1 at 3e-3 diverged (its record
    says so, no metrics). `lr` chooses from the rest, marks the rate diverged and counts it as tried; Sine-LoRA's
    count adds the first study's 3 omegas."""
    runs = tmp_path / "runs" / "study_tuned_val"
    methods = {"lora": ("activation=identity",), "sinter": ("activation=sinter", "activation.params.amp=0.5"),
               "sine": ("activation=sine", "activation.params.omega=300"), "dora": ("adapter=dora",)}
    values = {"lora": (0.80, 0.90, 0.85), "sinter": (0.70, 0.75, 0.95), "sine": (0.5, 0.7, 0.6),
              "dora": (0.9, 0.6, 0.9)}
    for name, overrides in methods.items():
        for lr, value in zip(("3e-4", "1e-3", "3e-3"), values[name]):
            for seed in (0, 1):
                rec = record("dataset=bbc_news", *overrides, "trainer.args.max_steps=400",
                             f"trainer.args.learning_rate={lr}", seed=seed, value=value)
                if name == "sinter" and lr == "3e-3" and seed == 1:
                    rec = {**rec, "status": "diverged", "metrics": None}
                write(runs, rec)
    for n in (100, 200):  # the control's length curve: 400 steps the best
        write(runs, record("dataset=bbc_news", "activation=identity", f"trainer.args.max_steps={n}", value=0.1))
    done = run_script("scripts/study_choose.py", "lr", "study_tuned_val", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr
    entries = json.loads((tmp_path / "study_tuned_val_choices.json").read_text())
    by_label = {e["label"].split(" ")[0]: e for e in entries}
    assert by_label["loran-sinter"]["chosen"] == 1e-3 and by_label["loran-sinter"]["tried"] == 3
    assert by_label["loran-sinter"]["diverged"] == {"0.003": [1]}
    assert sorted(e["label"] for e in entries) == ["dora", "loran-identity", "loran-sine (g=24.0, omega=300)",
                                                   "loran-sinter (amp=0.5, omega=10000.0)"]
    assert by_label["dora"]["chosen"] == 3e-4 and by_label["dora"]["tried"] == 3   # a tie: the smaller rate
    assert "| bbc_news | dora | 3 | 90.00 | 60.00 | 90.00 | 0.0003 (lowest) |" in done.stdout
    assert by_label["loran-identity"]["chosen"] == 1e-3 and by_label["loran-identity"]["tried"] == 3
    assert by_label["loran-sine"]["chosen"] == 1e-3 and by_label["loran-sine"]["tried"] == 6
    assert [by_label[m]["edge"] for m in ("dora", "loran-identity", "loran-sine", "loran-sinter")] == [
        "lowest", None, None, None]   # Sinter's 1e-3 is the middle of its rates, the diverged 3e-3 included
    # DoRA's best at the grid's lowest ties with its highest: bracketed, so no extension was owed (the choice ran)
    (sinter_line,) = [line for line in done.stdout.splitlines() if "| loran-sinter" in line]
    assert sinter_line.split(" | ")[2:7] == ["3", "70.00", "75.00", "diverged", "0.001 |"]
    # a method that ran on one task only leaves the other task's grid incomplete
    write(runs, record("dataset=bbc_headlines", "activation=identity", "trainer.args.max_steps=100", value=0.2))
    for n in (200, 400):
        write(runs, record("dataset=bbc_headlines", "activation=identity", f"trainer.args.max_steps={n}", value=0.3))
    for lr in ("3e-4", "3e-3"):
        write(runs, record("dataset=bbc_headlines", "activation=identity", "trainer.args.max_steps=200",
                           f"trainer.args.learning_rate={lr}", value=0.3))
    for lr in ("3e-4", "1e-3", "3e-3"):
        write(runs, record("dataset=bbc_headlines", "activation=identity", "trainer.args.max_steps=200",
                           f"trainer.args.learning_rate={lr}", seed=1, value=0.3))
    refused = run_script("scripts/study_choose.py", "lr", "study_tuned_val", "--results", str(tmp_path))
    assert refused.returncode == 1 and "incomplete, 18 runs missing" in refused.stderr, refused.stderr
    assert "(bbc_headlines dora lr 0.0003 seed 0; bbc_headlines dora lr 0.0003 seed 1; " in refused.stderr


def progress_of(results) -> list[str]:
    """`study_choose.py progress` on `results`: its lines (it exits 0 however far the grid is)."""
    done = run_script("scripts/study_choose.py", "progress", "study_tuned_val", "--results", str(results))
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_progress_counts_the_grid_names_what_is_missing_and_times_the_rest(tmp_path):
    """A running grid: LoRA complete, Sinter two runs (one diverged). `progress` counts 8 of 12, names Sinter's 4
    missing, times them at the median of the last 5 runs (720 s; a resumed run, the latest, is left out), and says the
    extension is not yet decided; once the protocol's rates ran with LoRA's best strictly at 3e-3, it names the
    extension owed; a complete grid says so. It exits 0 throughout."""
    runs = tmp_path / "runs" / "study_tuned_val"
    methods = {"lora": ("activation=identity",), "sinter": ("activation=sinter", "activation.params.amp=0.5")}
    clock = iter(range(10, 60))

    def run(name, lr, seed, wall=600.0, **extra):
        rec = record("dataset=bbc_news", *methods[name], "trainer.args.max_steps=400",
                     f"trainer.args.learning_rate={lr}", seed=seed, value={"3e-3": 0.9, "1e-2": 0.8}.get(lr, 0.5))
        write(runs, {**rec, "wall_time_s": wall, "finished_at": f"2026-12-07T12:{next(clock)}:00+00:00",
                     "machine": {"torch_threads": 2}, "resumed_from": None, **extra})
        return runs / rec["cell"]

    def progress():
        return progress_of(tmp_path)

    for n in (100, 200):
        write(runs, record("dataset=bbc_news", "activation=identity", f"trainer.args.max_steps={n}", value=0.1))
    for lr in ("3e-4", "1e-3"):
        run("lora", lr, 0, wall=6000.0), run("lora", lr, 1, wall=6000.0)
    run("lora", "3e-3", 0), run("lora", "3e-3", 1, wall=660.0), run("sinter", "1e-3", 0, wall=720.0)
    run("sinter", "3e-4", 0, wall=9000.0, status="diverged", metrics=None)   # a diverged run is done, not timed
    run("lora", "3e-4", 2, wall=1.0, resumed_from="checkpoint-200")   # another seed: not the grid's, not timed
    assert progress() == [
        "bbc_news, 400 steps: 8 of 12 runs (rates 0.0003, 0.001, 0.003; the extension is decided once they have all "
        "run)",
        "  missing loran-sinter (amp=0.5, omega=10000.0): 0.0003 seed 1, 0.001 seed 1, 0.003 seed 0, 0.003 seed 1",
        "  an extension, if owed, adds 4 runs a rate (every method, seeds 0 and 1)",
        "  about 0.8 h left at 12.0 min a run (the median of its last 5 runs; torch threads 2)",
        "in all: 4 runs missing, about 0.8 h"]
    for lr, seed in (("3e-4", 1), ("1e-3", 1), ("3e-3", 0), ("3e-3", 1)):
        run("sinter", lr, seed)
    lines = progress()
    assert lines[0] == "bbc_news, 400 steps: 12 of 16 runs (rates 0.0003, 0.001, 0.003, 0.01; extended to 0.01)"
    assert lines[1:3] == ["  missing loran-identity: 0.01 seed 0, 0.01 seed 1",
                          "  missing loran-sinter (amp=0.5, omega=10000.0): 0.01 seed 0, 0.01 seed 1"]
    stray = run("lora", "1e-4", 0)   # a rate the grid does not hold: named
    assert progress()[3] == "  runs at rates its grid does not hold (0.0001): remove them here and in the grid's " \
        "worktree before choosing"
    shutil.rmtree(stray)
    for name in methods:
        run(name, "1e-2", 0), run(name, "1e-2", 1)
    lines = progress()   # these records kept no per-example scores: no forecast, and the reason why
    assert lines[0] == "bbc_news, 400 steps: 16 of 16 runs (rates 0.0003, 0.001, 0.003, 0.01; extended to 0.01)"
    assert lines[1].startswith("  no forecast of the confirmation: record bbc_news.") and "per-example" in lines[1]
    assert lines[2:] == ["in all: the grid is complete (`lr` chooses)"]


@pytest.mark.parametrize("scores, owed", [
    ({"3e-4": (0.2, 0.2), "1e-3": (0.25, 0.25), "3e-3": (0.3, 0.3)}, [1e-2]),       # strictly highest: upward only
    ({"3e-4": (0.3, 0.3), "1e-3": (0.25, 0.25), "3e-3": (0.2, 0.2)}, [1e-4]),       # strictly lowest: downward only
    ({"3e-4": (201 / 209, 202 / 209), "1e-3": (200 / 209, 203 / 209), "3e-3": (0.5, 0.5)}, []),  # tie at 12 digits
    ({"3e-4": (0.9, 0.9), "1e-3": (0.6, 0.6), "3e-3": (0.9, 0.9)}, []),              # both edges tie: among equals
    ({"3e-4": (0.3, 0.3), "1e-3": (0.9, None), "3e-3": (None, None)}, [1e-4]),      # the only rate finishing
    ({"3e-4": (0.2, 0.2), "1e-3": (0.3, 0.3), "3e-3": (0.4, 0.4), "1e-2": (None, None)}, []),  # extension diverged
])
def test_owed_extensions_follow_a_strict_best_at_an_edge(scores, owed):
    """``owed_extensions`` on one method's choice: None is a diverged run (it counts as tried, never as best)."""
    from loran.pipeline.tuning import owed_extensions

    runs = [(lr, seed, value) for lr, values in scores.items() for seed, value in enumerate(values)]
    records = [record("dataset=bbc_news", f"trainer.args.learning_rate={lr}", seed=seed, value=value)
               for lr, seed, value in runs if value is not None]
    diverged = [{**record("dataset=bbc_news", f"trainer.args.learning_rate={lr}", seed=seed), "status": "diverged"}
                for lr, seed, value in runs if value is None]
    entries = choose_settings(records, diverged=diverged)
    assert owed_extensions(entries, {"highest": 1e-2, "lowest": 1e-4}) == owed
    assert (201 / 209 + 202 / 209) / 2 != (200 / 209 + 203 / 209) / 2   # the tie case is a tie only at 12 digits


def test_each_task_owes_its_own_extension_and_a_rate_its_grid_does_not_hold_is_refused(tmp_path):
    """Two complete tasks, LoRA alone: headlines' best is strictly at 3e-3 (owes 1e-2), bbc_news' is inside. The
    refusal names headlines' extension only; a 1e-2 run on bbc_news is refused by name; once headlines' 1e-2 ran
    (seed 1 diverged: not eligible, yet it brackets 3e-3), the choice is 3e-3, unmarked."""
    runs = tmp_path / "runs" / "study_tuned_val"
    steps = {"bbc_news": 400, "bbc_headlines": 200}
    values = {"bbc_news": {"3e-4": 0.80, "1e-3": 0.90, "3e-3": 0.85, "1e-2": 0.95},
              "bbc_headlines": {"3e-4": 0.20, "1e-3": 0.25, "3e-3": 0.30, "1e-2": 0.35}}

    def run(task, lr, seed, **extra):
        rec = record(f"dataset={task}", "activation=identity", f"trainer.args.max_steps={steps[task]}",
                     f"trainer.args.learning_rate={lr}", seed=seed, value=values[task][lr])
        write(runs, {**rec, **extra})
        return runs / rec["cell"]

    def choose():
        return run_script("scripts/study_choose.py", "lr", "study_tuned_val", "--results", str(tmp_path))

    for task in steps:
        for lr in ("3e-4", "1e-3", "3e-3"):
            run(task, lr, 0), run(task, lr, 1)
    for n in (100, 200):   # bbc_news' curve: 400 steps the best
        write(runs, record("dataset=bbc_news", "activation=identity", f"trainer.args.max_steps={n}", value=0.1))
    for n in (100, 400):   # headlines' curve: 200 steps the best
        write(runs, record("dataset=bbc_headlines", "activation=identity", f"trainer.args.max_steps={n}", value=0.1))
    refused = choose()
    assert refused.returncode == 1 and "incomplete, 2 runs missing (bbc_headlines loran-identity lr 0.01 seed 0; " \
        "bbc_headlines loran-identity lr 0.01 seed 1)" in refused.stderr, refused.stderr
    assert refused.stderr.count("TUNED_TASKS=") == 1 and "TUNED_TASKS=bbc_headlines TUNED_LRS=0.01)" in refused.stderr
    owed = run_script("scripts/study_choose.py", "extension", "study_tuned_val", "--results", str(tmp_path))
    assert (owed.returncode, owed.stdout) == (0, "bbc_headlines 0.01\n"), owed.stderr   # what make runs next
    stray = run("bbc_news", "1e-2", 0)
    refused = choose()
    assert refused.returncode == 1 and "runs at learning rates their task's grid does not hold: bbc_news at 0.01 " \
        "(its grid: 0.0003, 0.001, 0.003)" in refused.stderr, refused.stderr
    shutil.rmtree(stray)
    run("bbc_headlines", "1e-2", 0), run("bbc_headlines", "1e-2", 1, status="diverged", metrics=None)
    done = choose()
    assert done.returncode == 0, done.stderr
    entries = {e["task"]: e for e in json.loads((tmp_path / "study_tuned_val_choices.json").read_text())}
    assert (entries["bbc_headlines"]["chosen"], entries["bbc_headlines"]["edge"]) == (3e-3, None)
    assert entries["bbc_headlines"]["tried"] == 4 and entries["bbc_headlines"]["diverged"] == {"0.01": [1]}
    assert (entries["bbc_news"]["chosen"], entries["bbc_news"]["tried"]) == (1e-3, 3)


def test_a_best_strictly_at_the_grids_edge_extends_every_methods_grid_by_one_rate_once(tmp_path):
    """LoRA's best is strictly at 3e-3 and Sinter's strictly at 3e-4: both methods owe 1e-2 and 1e-4 (the study's
    amendment of 2026-12-07), and `lr` refuses until they ran, naming the command. Then each is chosen over 5 rates:
    LoRA's best at 1e-2 is the edge again, marked, and owes nothing more (one extension). A run at a rate the grid
    does not hold is refused by name."""
    runs = tmp_path / "runs" / "study_tuned_val"
    methods = {"lora": ("activation=identity",), "sinter": ("activation=sinter", "activation.params.amp=0.5")}
    values = {"lora": {"1e-4": 0.70, "3e-4": 0.80, "1e-3": 0.85, "3e-3": 0.90, "1e-2": 0.95},
              "sinter": {"1e-4": 0.70, "3e-4": 0.90, "1e-3": 0.80, "3e-3": 0.80, "1e-2": 0.60}}

    def run(name, lr, seed=0):
        write(runs, record("dataset=bbc_news", *methods[name], "trainer.args.max_steps=400",
                           f"trainer.args.learning_rate={lr}", seed=seed, value=values[name][lr]))

    def choose():
        return run_script("scripts/study_choose.py", "lr", "study_tuned_val", "--results", str(tmp_path))

    for name in methods:
        for lr in ("3e-4", "1e-3", "3e-3"):
            run(name, lr), run(name, lr, seed=1)
    for n in (100, 200):
        write(runs, record("dataset=bbc_news", "activation=identity", f"trainer.args.max_steps={n}", value=0.1))
    refused = choose()
    assert refused.returncode == 1 and "incomplete, 8 runs missing (bbc_news loran-identity lr 0.0001 seed 0; " in \
        refused.stderr, refused.stderr
    assert "in the grid's worktree, make study-tuned-val TUNED_TASKS=bbc_news TUNED_LRS=0.0001,0.01)" in refused.stderr
    for name in methods:
        for lr in ("1e-4", "1e-2"):
            run(name, lr), run(name, lr, seed=1)
    done = choose()
    assert done.returncode == 0, done.stderr
    entries = {e["label"].split(" ")[0]: e for e in json.loads((tmp_path / "study_tuned_val_choices.json").read_text())}
    assert (entries["loran-identity"]["chosen"], entries["loran-identity"]["edge"]) == (1e-2, "highest")
    assert (entries["loran-sinter"]["chosen"], entries["loran-sinter"]["edge"]) == (3e-4, None)
    assert entries["loran-identity"]["tried"] == entries["loran-sinter"]["tried"] == 5
    assert "| bbc_news | loran-identity | 5 | 70.00 | 80.00 | 85.00 | 90.00 | 95.00 | 0.01 (highest) |" in done.stdout
    values["lora"]["3e-2"] = 0.99
    run("lora", "3e-2")
    stray = choose()
    assert stray.returncode == 1 and "does not hold: bbc_news at 0.03 (its grid: 0.0001, 0.0003, 0.001, 0.003, " \
        "0.01). Remove them from the runs folder here and in the grid's worktree" in stray.stderr, stray.stderr


def test_the_confirmatory_table_pairs_each_method_with_lora_per_task_and_holm_corrects_the_family(tmp_path):
    """Two tasks x (LoRA, Sinter amp 0.5, the released Sinter row) x 2 seeds on test: per task the control is LoRA;
    the family is the 2 tuned comparisons (the released row is secondary: no Holm value); Holm's values are the
    comparisons' bootstrap p-values, sorted, times 2 and 1 (monotone); 'tried' comes from the validation choices."""
    from loran.pipeline.confirm import rows_of, to_markdown

    rng = np.random.default_rng(0)
    base = {task: rng.integers(0, 2, (2, 60)).astype(float) for task in ("bbc_news", "bbc_headlines")}
    records, choices = [], []
    for task, metric in (("bbc_news", "accuracy"), ("bbc_headlines", "rougeL")):
        methods = {("activation=identity", "trainer.args.learning_rate=1e-3"): 0.0,
                   ("activation=sinter", "activation.params.amp=0.5", "trainer.args.learning_rate=3e-3"): 0.3,
                   ("activation=sinter", "activation.params.amp=5e-5", "trainer.args.learning_rate=1e-3"): 0.0}
        for overrides, gain in methods.items():
            for seed in (0, 1):
                scores = np.clip(base[task][seed] + (rng.uniform(size=60) < gain), 0, 1)
                cfg = cfg_of("experiment=study_tuned_test", f"dataset={task}", f"seed={seed}", *overrides)
                preds = [{"id": f"a{i}", "prediction": str(v), metric: float(v), "rouge1": float(v), "rouge2": 0.0}
                         for i, v in enumerate(scores)]
                records.append({"status": "ok", "cell": cfg.cell, "identity": identity(cfg), "choices": {"seed": seed},
                                "metrics": {metric: float(scores.mean()), "rouge1": float(scores.mean()), "rouge2": 0.0},
                                "predictions": preds, "n_eval": 60,
                                "eval_split": "test", "trainable_params": 1})
        for overrides, tried in ((("activation=identity",), 3), (("activation=sinter", "activation.params.amp=0.5"), 4)):
            flat = flatten(identity(cfg_of("experiment=study_tuned_val", f"dataset={task}", *overrides)))
            choices.append({"task": task, "tried": tried, "method": {k: v for k, v in flat.items()
                                                                     if k != "trainer.args.learning_rate"}})
    rows = rows_of(records, choices)
    assert [(r["task"], r["control"], r["confirmatory"], r["tried"]) for r in rows] == [
        ("bbc_headlines", True, False, 3), ("bbc_headlines", False, False, None), ("bbc_headlines", False, True, 4),
        ("bbc_news", True, False, 3), ("bbc_news", False, False, None), ("bbc_news", False, True, 4)]
    family = [r for r in rows if r["confirmatory"]]
    low, high = sorted(family, key=lambda r: r["p_value"])
    assert low["p_holm"] == pytest.approx(min(1, 2 * low["p_value"]))
    assert high["p_holm"] == pytest.approx(max(low["p_holm"], high["p_value"]))
    assert all("p_holm" not in r for r in rows if not r["confirmatory"])
    assert {r["metric"] for r in rows} == {"accuracy", "rougeL"} and all(r["delta"] > 0 for r in family)
    for r in rows:  # each task's rows from its own records, on its own metric
        assert r["metric"] == {"bbc_news": "accuracy", "bbc_headlines": "rougeL"}[r["task"]] and r["seeds"] == [0, 1]
    means = {(r["task"], r["configuration"]): r[r["metric"]] for r in rows}
    for task, metric in (("bbc_news", "accuracy"), ("bbc_headlines", "rougeL")):
        lora = [x["metrics"][metric] for x in records if x["identity"]["dataset"]["name"] == task
                and x["identity"]["activation"]["name"] == "identity"]
        assert means[(task, next(c for t, c in means if t == task and "identity" in c))] == pytest.approx(np.mean(lora))
    for r in rows:  # ROUGE-1 scored as ROUGE-L here, ROUGE-2 zero everywhere: their deltas follow
        if r["task"] == "bbc_headlines" and not r["control"]:
            assert r["delta_rouge1"] == pytest.approx(r["delta"]) and r["delta_rouge2"] == 0.0
        if r["task"] == "bbc_news":
            assert "delta_rouge1" not in r
    assert rows[1]["learning_rate"] == 1e-3 and rows[2]["learning_rate"] == 3e-3
    markdown = to_markdown(rows, "t")
    assert markdown.count("| control |") == 2 and "p (Holm)" in markdown
    (alone,) = rows_of(records[:1], choices)   # a task whose only record is LoRA's first seed: its control row
    assert alone["control"] and alone["seeds"] == [0] and alone["tried"] == 3 and "p_holm" not in alone


def seed_only(fewest: int) -> dict[str, float]:
    """Variance components (seed only) whose planned MDE meets 1.0 point at `fewest` seeds and not at one seed fewer:
    the bootstrap's seed term is (S - 1) / S^2 v_seed, so v_seed sits between (t / 2.80)^2 over its value at each."""
    term = lambda n: (n - 1) / n**2  # noqa: E731
    return {"seed": (0.01 / 2.801585) ** 2 * 2 / (term(fewest - 1) + term(fewest)), "example": 0.0, "residual": 0.0}


@pytest.mark.parametrize("parts, seeds", [
    ({"seed": 0.0, "example": 1e-6, "residual": 0.0}, 5),          # examples alone meet it: the minimum, 5
    (seed_only(7), 7),                                               # 6 seeds miss it, 7 meet it
    (seed_only(9), 9),                                               # 9, the last before the cap
    (seed_only(10), 10),                                             # 10 meets it
    (seed_only(11), 5),                                              # 11 would: 10 miss it, so the 5
    ({"seed": 1.0, "example": 0.0, "residual": 0.0}, 5),           # never: 5
])
def test_planned_seeds_is_the_fewest_from_5_to_10_that_meet_the_target_else_5(parts, seeds):
    from loran.pipeline.tuning import planned_seeds

    assert planned_seeds([{"seed": 0.0, "example": 0.0, "residual": 0.0}, parts], 836, 0.01) == seeds


def test_planned_seeds_counts_an_mde_equal_to_the_target_as_met():
    from loran.pipeline.tuning import planned_seeds

    assert planned_seeds([{"seed": 0.0, "example": 0.0, "residual": 0.0}], 836, 0.0) == 5


def confirmation(seeds: dict[str, int], split: str = "test") -> tuple[list, list]:
    """The protocol's confirmation on two tasks (LoRA at 1e-3, Sinter amp 0.5 at 3e-3, the released row at LoRA's
    rate) on each task's seeds (the confirmation's; validation: from 0), 20 examples a run, and the validation choices
    that asked for it."""
    rng = np.random.default_rng(3)
    experiment = {"test": "study_tuned_test", "validation": "study_tuned_val"}[split]
    records, choices = [], []
    for task, metric in (("bbc_news", "accuracy"), ("bbc_headlines", "rougeL")):
        methods = {("activation=identity",): "1e-3", ("activation=sinter", "activation.params.amp=0.5"): "3e-3"}
        rows = [(m, lr) for m, lr in methods.items()] + [(RELEASED, "1e-3")]
        for overrides, lr in rows:
            for seed in confirmation_seeds(seeds[task]) if split == "test" else range(seeds[task]):
                scores = rng.integers(0, 2, 20).astype(float)
                cfg = cfg_of(f"experiment={experiment}", f"dataset={task}", f"seed={seed}", *overrides,
                             f"trainer.args.learning_rate={lr}")
                records.append({"status": "ok", "cell": cfg.cell, "identity": identity(cfg), "choices": {"seed": seed},
                                "metrics": {metric: float(scores.mean()), "rouge1": 0.0, "rouge2": 0.0}, "n_eval": 20,
                                "eval_split": split,
                                "trainable_params": 1, "loss_history": [{"step": 5, "loss": 1.0 + seed}],
                                "predictions": [{"id": f"a{i}", "prediction": "x", metric: float(v), "rouge1": 0.0,
                                                 "rouge2": 0.0} for i, v in enumerate(scores)]})
        for overrides, lr in methods.items():
            flat = flatten(identity(cfg_of("experiment=study_tuned_val", f"dataset={task}", *overrides)))
            choices.append({"task": task, "label": " ".join(overrides), "tried": 3, "chosen": float(lr),
                            "method": {k: v for k, v in flat.items() if k != "trainer.args.learning_rate"}})
    return records, choices


RELEASED = ("activation=sinter", "activation.params.amp=5e-5", "activation.params.omega=1e4")


def test_the_confirmation_is_the_protocol_s_whole_or_its_gaps_are_named():
    from loran.pipeline.confirm import gaps

    seeds = {"bbc_news": 2, "bbc_headlines": 3}
    records, choices = confirmation(seeds)
    assert len(records) == 3 * 2 + 3 * 3 and gaps(records, [], choices, seeds) == []
    dropped = [r for r in records if not (r["identity"]["dataset"]["name"] == "bbc_headlines"
                                          and r["identity"]["activation"].get("params", {}).get("amp") == 0.5
                                          and r["choices"]["seed"] == 2)]
    assert gaps(dropped, [], choices, seeds) == ["bbc_headlines activation=sinter activation.params.amp=0.5 lr 0.003 "
                                                 "seed 2"]
    ended = {**next(r for r in records if r not in dropped), "status": "diverged"}
    assert gaps(dropped, [ended], choices, seeds) == ["bbc_headlines activation=sinter activation.params.amp=0.5 "
                                                      "lr 0.003 seed 2 (diverged)"]
    released = [r for r in records if r["identity"]["activation"].get("params", {}).get("amp") == 5e-5]
    assert len(released) == 5
    assert gaps([r for r in records if r is not released[0]], [], choices, seeds) == [
        "bbc_news released Sinter (amp 5e-5) lr 0.001 seed 2"]
    assert gaps(records, [], choices, {**seeds, "bbc_news": 3}) == [   # a third seed planned for bbc_news
        "bbc_news activation=identity lr 0.001 seed 4", "bbc_news released Sinter (amp 5e-5) lr 0.001 seed 4",
        "bbc_news activation=sinter activation.params.amp=0.5 lr 0.003 seed 4"]
    # the confirmation's seeds follow the validation grid's: a test run at seed 0 or 1 would repeat a training that
    # chose its learning rate, and is not asked for
    validation_seed, _ = confirmation({"bbc_news": 1, "bbc_headlines": 0}, split="validation")
    at_seed_0 = {**validation_seed[0], "eval_split": "test"}
    assert confirmation_seeds(3) == [2, 3, 4] and at_seed_0["choices"]["seed"] == 0
    assert gaps(records + [at_seed_0], [], choices, seeds) == [f"{at_seed_0['cell']} is not in the protocol",
                                                               f"{at_seed_0['cell']} is not on the test split"]
    other_rate = [{**c, "chosen": 1e-3} if c["label"] != "activation=identity" else c for c in choices]
    extra = [r["cell"] + " is not in the protocol" for r in records
             if r["identity"]["activation"].get("params", {}).get("amp") == 0.5]
    assert gaps(records, [], other_rate, seeds)[-len(extra):] == extra   # a run at a rate not chosen is not asked for
    with pytest.raises(ValueError, match="bbc_news, activation=identity: no learning rate was chosen on validation"):
        gaps(records, [], [{**choices[0], "chosen": None}], seeds)


def test_the_confirmation_s_progress_counts_the_runs_asked_for_and_times_what_is_left(tmp_path):
    """`study_confirm.py --progress` (make study-progress): per task, the runs done of those the choices and seed plans
    ask for (a diverged run is done, a failed one is not, a run not asked for does not count), and the hours left at
    the median of the task's last 5 timed runs (a resumed run's time is its last part: left out)."""
    from loran.pipeline.confirm import progress

    seeds = {"bbc_news": 3, "bbc_headlines": 2}
    records, choices = confirmation(seeds)
    news = [r for r in records if r["identity"]["dataset"]["name"] == "bbc_news"]
    timed = [{**r, "finished_at": f"2026-12-07T0{i}:00", "wall_time_s": 60.0 * (10 + i)} for i, r in enumerate(news)]
    kept = timed[:6] + [{**timed[6], "resumed_from": "checkpoint-50", "wall_time_s": 1.0}]   # resumed: not timed
    failed = {**timed[7], "status": "failed"}
    diverged = {**timed[8], "status": "diverged"}
    lines = progress(kept, [failed, diverged], choices, seeds)
    minutes = sorted(10.0 + i for i in range(1, 6))[2]              # the last 5 timed runs: 11-15 min, median 13
    assert lines == [f"bbc_news: 8 of 9 test runs (3 seeds); about {minutes / 60:.1f} h left at {minutes:.1f} min a "
                     "run (the median of its last 5)",
                     "bbc_headlines: 0 of 6 test runs (2 seeds); no test run timed yet",
                     f"in all: 7 test runs missing, about {minutes / 60:.1f} h"]
    stray = {**timed[0], "identity": {**timed[0]["identity"], "seed": 9}, "choices": {"seed": 9}}
    assert progress(kept + [stray], [failed, diverged], choices, seeds)[0].startswith("bbc_news: 8 of 9")
    # the script reads the choices and the seed plans, from another checkout's results too, and writes nothing
    for name, value in (("choices", choices), ("seeds", [{"task": t, "seeds": n} for t, n in seeds.items()])):
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
    done = run_script("scripts/study_confirm.py", "study_tuned_test", "--progress", "--results", str(tmp_path / "grid"),
                      "--choices", str(tmp_path / "choices.json"), "--seeds", str(tmp_path / "seeds.json"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["bbc_news: 0 of 9 test runs (3 seeds); no test run timed yet",
                                        "bbc_headlines: 0 of 6 test runs (2 seeds); no test run timed yet",
                                        "in all: 15 test runs missing"]
    assert not (tmp_path / "grid").exists()


def test_a_diverged_test_run_is_a_result_scored_0_on_every_example_and_a_failed_one_stays_missing():
    """Amendment of 2026-12-07: a diverged confirmation run delivered no usable model; it keeps its place (its
    comparison, the Holm family) with every example scored 0, not rerun until it converges. A failed run (an error) is
    no result: still missing, named with its status."""
    from loran.pipeline.confirm import gaps, rows_of, scored

    seeds = {"bbc_news": 2, "bbc_headlines": 2}
    records, choices = confirmation(seeds)
    amp = [r for r in records if r["identity"]["dataset"]["name"] == "bbc_news"
           and r["identity"]["activation"].get("params", {}).get("amp") == 0.5]
    lost = amp[1]   # Sinter amp 0.5, bbc_news, seed 3
    ended = {**lost, "status": "diverged", "metrics": None, "predictions": None, "examples": None}
    kept = [r for r in records if r is not lost]
    confirmed, diverged = scored(kept, [ended])
    assert diverged == [lost["cell"]] and gaps(confirmed, [ended], choices, seeds) == []
    (row,) = [r for r in rows_of(confirmed, choices) if r["task"] == "bbc_news" and r["confirmatory"]]
    assert row["accuracy"] == pytest.approx(amp[0]["metrics"]["accuracy"] / 2)   # seed 3 scores 0 on all 20 articles
    assert row["seeds"] == [2, 3] and row["p_holm"] >= row["p_value"]            # still in the family
    failed = {**ended, "status": "failed"}
    confirmed, diverged = scored(kept, [failed])
    assert diverged == [] and gaps(confirmed, [failed], choices, seeds) == [
        "bbc_news activation=sinter activation.params.amp=0.5 lr 0.003 seed 3 (failed)"]


def test_the_confirmation_script_refuses_an_incomplete_grid_and_writes_the_whole_one(tmp_path):
    seeds = {"bbc_news": 2, "bbc_headlines": 2}
    test, choices = confirmation(seeds)
    (tmp_path / "study_tuned_val_choices.json").write_text(json.dumps(choices))
    plans = [{"task": t, "seeds": n} for t, n in seeds.items()]
    (tmp_path / "study_tuned_val_seeds.json").write_text(json.dumps(plans))
    for rec in test[1:]:
        write(tmp_path / "runs" / "study_tuned_test", rec)
    script = [sys.executable, "scripts/study_confirm.py", "study_tuned_test", "--results", str(tmp_path)]
    refused = subprocess.run(script, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and not (tmp_path / "study_tuned_test.md").exists()
    assert refused.stderr.splitlines()[-1] == (
        "no table written: the confirmation is not the protocol's, 1 run to mend (bbc_news activation=identity lr 0.001 "
        "seed 2): run make study-tuned-test, or move what is not asked for away")
    write(tmp_path / "runs" / "study_tuned_test", test[0])
    done = run_script(*script[1:])
    assert done.returncode == 0, done.stderr
    markdown = (tmp_path / "study_tuned_test.md").read_text()
    assert markdown.count("| control |") == 2 and markdown == done.stdout.rstrip("\n") + "\n"
    assert "diverged" not in markdown
    lost = next(r for r in test if r["identity"]["activation"].get("params", {}).get("amp") == 0.5)
    (tmp_path / "runs" / "study_tuned_test" / lost["cell"] / "record.json").write_text(json.dumps(
        {**lost, "status": "diverged", "metrics": None, "predictions": None}))
    done = run_script(*script[1:])
    assert done.returncode == 0, done.stderr
    markdown = (tmp_path / "study_tuned_test.md").read_text()
    assert "# study_tuned_test: 11 successful runs, 1 diverged\n" in markdown
    assert markdown.endswith(f"\nDiverged, each test example scored 0 (a result, not rerun): {lost['cell']}.\n\n"
                             "Library versions: the same in every successful test and validation run (not "
                             "recorded).\n")


def test_the_confirmation_says_whether_test_and_validation_ran_on_the_same_library_versions():
    from loran.pipeline.confirm import versions_note

    test, _ = confirmation({"bbc_news": 1, "bbc_headlines": 1})
    validation, _ = confirmation({"bbc_news": 1, "bbc_headlines": 1}, split="validation")
    same = {"torch": "2.13.0+cpu", "peft": "0.21.2"}
    test = [{**r, "versions": same} for r in test]
    assert versions_note(test, [{**r, "versions": dict(reversed(same.items()))} for r in validation]) == (
        "Library versions: the same in every successful test and validation run (peft 0.21.2, torch 2.13.0+cpu).")
    drifted = [{**r, "versions": {**same, "peft": "0.22.0"}} if i == 0 else {**r, "versions": same}
               for i, r in enumerate(validation)]
    assert versions_note(test, drifted) == (
        "Library versions differ between runs: peft 0.21.2, torch 2.13.0+cpu (6 test, 5 validation); "
        "peft 0.22.0, torch 2.13.0+cpu (1 validation).")


@pytest.mark.parametrize("flips, chosen", [
    ({"3e-4": 0.3, "1e-3": 0.1, "3e-3": 0.2}, "1e-3"),
    ({"3e-4": 0.45, "1e-3": 0.35, "3e-3": 0.2, "1e-2": 0.05}, "1e-2"),   # best strictly at 3e-3: extended, then 1e-2
])
def test_the_script_plans_the_confirmation_seeds_from_the_validation_differences(tmp_path, flips, chosen):
    """Two methods x 3 learning rates (and the extension where owed) x 2 seeds on bbc_news validation (60 articles):
    `seeds` writes each comparison's variance components and planned MDE at 836 test articles (checked against a
    two-way ANOVA written out here), and `overrides` gives every cell of the task, at its chosen rate, that many
    seeds."""
    rng = np.random.default_rng(1)
    runs = tmp_path / "runs" / "study_tuned_val"
    scores = {}
    for method in (("activation=identity",), ("activation=sinter", "activation.params.amp=0.5")):
        for lr, share in flips.items():   # the fewest flips the best, for both methods
            for seed in (0, 1):
                s = (rng.uniform(size=60) >= share).astype(float)   # each article right unless flipped
                overrides = ["experiment=study_tuned_val", "dataset=bbc_news", f"seed={seed}", *method,
                             "trainer.args.max_steps=400", f"trainer.args.learning_rate={lr}"]
                cfg = cfg_of(*overrides)
                rec = {"status": "ok", "cell": cfg.cell, "identity": identity(cfg), "choices": {"seed": seed},
                       "overrides": overrides[1:], "metrics": {"accuracy": float(s.mean())},
                       "predictions": [{"id": f"a{i}", "prediction": "x", "accuracy": float(v)} for i, v in enumerate(s)]}
                (runs / rec["cell"]).mkdir(parents=True)
                (runs / rec["cell"] / "record.json").write_text(json.dumps(rec))
                scores[(method[0], lr, seed)] = s
    for n in (100, 200):  # the control's length curve: 400 steps the best
        rec = record("dataset=bbc_news", "activation=identity", f"trainer.args.max_steps={n}", value=0.1)
        (runs / rec["cell"]).mkdir(parents=True)
        (runs / rec["cell"] / "record.json").write_text(json.dumps(rec))
    done = run_script("scripts/study_choose.py", "seeds", "study_tuned_val", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (plan,) = json.loads((tmp_path / "study_tuned_val_seeds.json").read_text())
    (comparison,) = plan["comparisons"]

    def anova(lr):   # a two-way ANOVA of the difference at `lr`: seed, example and residual components
        d = np.array([scores[("activation=sinter", lr, s)] - scores[("activation=identity", lr, s)]
                      for s in (0, 1)])
        row, col, m = d.mean(axis=1), d.mean(axis=0), d.mean()
        ms_res = ((d - row[:, None] - col[None, :] + m) ** 2).sum() / (1 * 59)
        return max(0.0, (60 * row.var(ddof=1) - ms_res) / 60), max(0.0, (2 * col.var(ddof=1) - ms_res) / 2), ms_res

    def mde_at(lr, n_s):   # the crossed bootstrap's variance from those components
        v_seed, v_example, ms_res = anova(lr)
        return 2.801585 * np.sqrt((n_s - 1) / n_s**2 * (v_seed + ms_res / 836)
                                  + 835 / 836**2 * (v_example + ms_res / n_s)
                                  + (n_s - 1) * 835 / (n_s * 836) ** 2 * ms_res)

    mde = lambda n_s: mde_at(chosen, n_s)  # noqa: E731
    assert comparison["mde_5"] == pytest.approx(mde(5), rel=1e-4)
    assert plan["seeds"] == next((n for n in range(5, 11) if mde(n) <= 0.01), 5)   # 5 where even 10 miss
    assert comparison["mde_10"] == pytest.approx(mde(10), rel=1e-4)
    assert plan["confirmation_seeds"] == list(range(2, 2 + plan["seeds"]))   # after the validation grid's 0 and 1
    assert comparison["mde_at_seeds"] == pytest.approx(mde(plan["seeds"]), rel=1e-4)
    markdown = (tmp_path / "study_tuned_val_seeds.md").read_text()
    assert markdown == done.stdout and f"bbc_news: {plan['seeds']} seeds (2, 3, 4, 5, 6" in markdown
    done = run_script("scripts/study_choose.py", "overrides", "study_tuned_val", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()   # LoRA, Sinter and the released Sinter at each seed after the grid's 0 and 1
    assert len(lines) == 3 * plan["seeds"] and len(set(lines)) == len(lines)
    assert [line.rsplit(" ", 1)[1] for line in lines] == [f"seed={2 + k // 3}" for k in range(len(lines))]  # seed-major
    assert all(f"trainer.args.learning_rate={chosen}" in line for line in lines)
    # `progress` forecasts the same plan from the whole grid; with the extension not yet run, from the protocol's rates
    lines = progress_of(tmp_path)
    forecast = [line for line in lines if "forecast" in line]
    # then each comparison: its planned MDEs and components
    components = ", ".join(f"{name} {1e4 * v:.2f}" for name, v in zip(("seed", "example", "residual"), anova(chosen)))
    assert lines[lines.index(forecast[0]) + 1] == (f"    {comparison['label']} at {float(chosen):g}: MDE "
                                                   f"{100 * mde(5):.2f} at 5 seeds, {100 * mde(10):.2f} at 10; "
                                                   f"components x 1e-4: {components}")
    mdes = ", ".join(f"{100 * mde(n):.2f}-{100 * mde(n):.2f} at {n} seeds" for n in dict.fromkeys((5, plan["seeds"], 10)))
    assert forecast == [f"  forecast of the confirmation from the rates run so far (not a choice: `seeds` plans on the "
                        f"whole grid): {plan['seeds']} seeds, {3 * plan['seeds']} test runs; planned MDE {mdes} "
                        f"(target 1.0: {'met' if mde(plan['seeds']) <= 0.01 else 'missed'})"]
    for extension in runs.glob("*/record.json"):
        if "trainer.args.learning_rate=1e-2" in json.loads(extension.read_text()).get("overrides", ()):
            shutil.rmtree(extension.parent)
    forecast = [line for line in progress_of(tmp_path) if "forecast" in line]
    at_base = mde_at("3e-3" if chosen == "1e-2" else chosen, 5)   # the protocol's best rate
    assert len(forecast) == 1 and f"planned MDE {100 * at_base:.2f}-" in forecast[0]


def test_the_confirmation_table_renders_as_written_here():
    from loran.pipeline.confirm import to_markdown

    rows = [{"task": "bbc_headlines", "configuration": "activation=identity", "learning_rate": 1e-3, "tried": 3,
             "seeds": [0, 1, 2, 3, 4], "metric": "rougeL", "rougeL": 0.2922, "control": True, "confirmatory": False,
             "texts_differ": None, "delta_rouge1": None, "delta_rouge2": None},
            {"task": "bbc_headlines", "configuration": "amp=0.5", "learning_rate": 3e-3, "tried": 6,
             "seeds": [0, 1, 2, 3, 4], "metric": "rougeL", "rougeL": 0.2850, "control": False, "confirmatory": True,
             "delta": -0.0072, "ci_low": -0.0150, "ci_high": 0.0004, "mde": 0.0041, "p_value": 0.061,
             "p_holm": 0.3, "texts_differ": 0.25, "delta_rouge1": -0.005, "delta_rouge2": 0.001},
            {"task": "bbc_news", "configuration": "amp=5e-5", "learning_rate": 1e-3, "tried": None, "seeds": [0],
             "metric": "accuracy", "accuracy": 0.93, "control": False, "confirmatory": False, "delta": 0.0,
             "ci_low": 0.0, "ci_high": 0.0, "mde": 0.0, "p_value": 1.0, "texts_differ": 0.0}]
    assert to_markdown(rows, "T") == (
        "# T\n\nEach configuration against LoRA on the same task, paired by seed and example (crossed bootstrap); "
        "MDE at 80 % power; p two-sided from the bootstrap, Holm over the confirmatory family (the 1 rows with a "
        "Holm value). tried = configurations tried on validation for that method (its learning rates, and "
        "Sine-LoRA's omegas in the first study). Values in percent.\n\n"
        "| task | configuration | lr | tried | seeds | metric | mean | vs LoRA [95% CI] | MDE | p | p (Holm) | "
        "texts differ | ROUGE-1 / -2 vs LoRA |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| bbc_headlines | activation=identity | 0.001 | 3 | 5 | rougeL | 29.22 | control | - |  |  | - | - / - |\n"
        "| bbc_headlines | amp=0.5 | 0.003 | 6 | 5 | rougeL | 28.50 | -0.72 [-1.50, +0.04] | 0.41 | 0.061 | 0.300 | "
        "25.00 | -0.50 / +0.10 |\n"
        "| bbc_news | amp=5e-5 | 0.001 | - | 1 | accuracy | 93.00 | +0.00 [+0.00, +0.00] | 0.00 | 1.000 |  | 0.00 |"
        "  |\n")
