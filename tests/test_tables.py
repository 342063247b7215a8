"""loran/pipeline/tables.py, Table 2 from records: means, the paired intervals and MDEs of the crossed bootstrap
checked against values worked out by hand, records without per-example scores refused, missing and failed cells as
dashes, the rendered markdown and CSV, rows, the one-config check."""
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loran.pipeline.records import CorruptRecord
from loran.pipeline.paired import MDE_FACTOR, NoPredictions, compare
from loran.pipeline.tables import (MixedConfigs, _fmt, build, load_records, load_rows, paired_difference, read_paper,
                                   row_key, to_markdown)
from conftest import run_script

REPO = Path(__file__).resolve().parents[1]
ROWS = load_rows(REPO / "configs" / "row")


def bootstrap_se(d) -> float:
    """The exact bootstrap SE of the mean of d's seeds when every example of a seed scores alike: the population sd
    of the per-seed differences over sqrt(number of seeds) (the bootstrap of n draws with replacement)."""
    d = np.asarray(d, dtype=float)
    return float(d.std(ddof=0) / np.sqrt(len(d)))


@pytest.fixture
def runs(tmp_path, write_fake_record):
    write_record = write_fake_record
    runs = tmp_path / "results/runs/grid"
    acc = {"qlora-none": [0.80, 0.82, 0.81], "loran-sinter": [0.85, 0.86, 0.87], "loran-tanh": [0.79, 0.84, 0.80]}
    for row, values in acc.items():
        adapter, activation = row.split("-")
        for seed, value in enumerate(values):
            write_record(runs, adapter, activation, "bbc_news", seed, {"accuracy": value, "no_class_rate": 0.0})
            write_record(runs, adapter, activation, "bbc_headlines", seed,
                         {"rouge1": 0.3 + value / 10, "rouge2": 0.1, "rougeL": 0.25, "rougeLsum": 0.25})
    write_record(runs, "loran", "relu", "bbc_news", 0, {}, status="failed")
    return runs


def cell(table, row, metric):
    return next(e for e in table if e["row"] == row and e["metric"] == metric)


def test_means_and_paired_interval_match_values_worked_out_by_hand(runs):
    """Each example of a seed scores alike in these records, so the crossed bootstrap is a bootstrap over the 3 seeds:
    its mean of 3 draws is the smallest difference with probability >= 1/27 (3.7 % > 2.5 %) and the largest likewise,
    so the 95 % interval is [min d, max d]; its SE is the population sd of d over sqrt(3)."""
    table = build(load_records(runs), ROWS)
    e = cell(table, "loran-sinter", "accuracy")
    assert e["mean"] == pytest.approx(0.86) and e["std"] == pytest.approx(0.01) and e["n"] == 3
    assert (e["low"], e["high"]) == pytest.approx((0.85, 0.87))  # the level's interval, same bootstrap
    d = np.array([0.85, 0.86, 0.87]) - np.array([0.80, 0.82, 0.81])
    assert (e["delta"], e["ci_low"], e["ci_high"]) == pytest.approx((d.mean(), d.min(), d.max()))
    assert e["mde"] == pytest.approx(MDE_FACTOR * bootstrap_se(d), rel=0.05)  # 2,000 draws: a 1.6 % SE on the SE
    assert (e["pairs"], e["examples"], e["significant"]) == (3, 4, True) and e["p_value"] < 0.001
    tanh = cell(table, "loran-tanh", "accuracy")  # d = -0.01, +0.02, -0.01: the interval straddles 0
    assert (tanh["ci_low"], tanh["ci_high"], tanh["significant"]) == (pytest.approx(-0.01), pytest.approx(0.02), False)


def test_the_table_pairs_by_example_as_every_comparison_does(runs, write_fake_record):
    """Examples scored differently: the table's entry is loran.pipeline.paired.compare's result, whose interval covers
    the examples' spread (wider than the seeds-only interval of the same seed means)."""
    runs2 = runs.parent / "by_example"
    a = {0: [1, 1, 0, 1], 1: [1, 0, 1, 1], 2: [1, 1, 1, 1]}
    b = {0: [1, 0, 0, 1], 1: [0, 0, 1, 1], 2: [1, 0, 1, 1]}
    for row, scores in (("qlora-none", b), ("loran-sinter", a)):
        for seed, correct in scores.items():
            write_fake_record(runs2, *row.split("-"), "bbc_news", seed, {"accuracy": sum(correct) / 4},
                              predictions=[{"id": f"e{i}", "prediction": str(c), "accuracy": float(c)}
                                           for i, c in enumerate(correct)])
    e = cell(build(load_records(runs2), ROWS), "loran-sinter", "accuracy")
    expected = compare({s: {f"e{i}": float(c) for i, c in enumerate(v)} for s, v in a.items()},
                       {s: {f"e{i}": float(c) for i, c in enumerate(v)} for s, v in b.items()})
    assert (e["delta"], e["ci_low"], e["ci_high"], e["mde"], e["p_value"]) == (
        expected.delta, expected.ci_low, expected.ci_high, expected.mde, expected.p_value)
    assert e["delta"] == pytest.approx(0.25) and e["ci_high"] - e["ci_low"] > 0.25  # seed means alone: d = .25, .25, .25


def test_a_record_without_per_example_scores_stops_the_table_naming_it(runs):
    """Records made before records kept predictions (the first Table 2 mini) cannot be paired by example."""
    path = next(runs.glob("bbc_news.tiny.loran-sinter.seed1/record.json"))
    record = json.loads(path.read_text())
    del record["predictions"]
    path.write_text(json.dumps(record))
    with pytest.raises(NoPredictions, match=r"record bbc_news.tiny.loran-sinter.seed1 kept no per-example "
                                            r"predictions .*: rerun its cell"):
        build(load_records(runs), ROWS)


def test_missing_and_failed_cells_are_dashes_not_zero(runs):
    table = build(load_records(runs), ROWS)
    assert cell(table, "loran-relu", "accuracy")["mean"] is None  # only a failed run
    assert cell(table, "loran-sigmoid", "rouge1")["mean"] is None  # no run at all
    md = to_markdown(table, "t")
    relu = next(line for line in md.splitlines() if line.startswith("| LoRAN (ReLU)"))
    assert relu.count("| -") >= 4 and "0.00" not in relu
    assert _fmt(0.5) == "50.00" and _fmt(0.5, signed=True) == "+50.00"


def test_a_single_seed_has_no_std_and_its_difference_covers_the_examples_only(runs, write_fake_record):
    write_fake_record(runs, "loran", "identity", "bbc_news", 0, {"accuracy": 0.9, "no_class_rate": 0.0})
    table = build(load_records(runs), ROWS)
    e = cell(table, "loran-identity", "accuracy")
    assert (e["mean"], e["std"], e["n"], e["pairs"]) == (pytest.approx(0.9), None, 1, 1)
    assert (e["delta"], e["ci_low"], e["ci_high"]) == pytest.approx((0.1, 0.1, 0.1))  # vs QLoRA's seed 0 (0.80)
    lines = to_markdown(table, "t").splitlines()
    line = next(x for x in lines if x.startswith("| LoRAN (identity"))
    assert "| 90.00 (1) |" in line and "+-" not in line
    assert lines[lines.index(line) + 1].endswith("+10.00 [+10.00, +10.00]*, MDE 0.00, 1 seed | |")


def test_paired_difference_needs_a_shared_seed():
    assert paired_difference({0: {"e": 1.0}}, {1: {"e": 0.5}}) is None
    assert paired_difference({0: {"e": 1.0}, 1: {"e": 2.0}}, {1: {"e": 0.5}, 2: {"e": 0.5}})["pairs"] == 1


def test_script_writes_csv_and_markdown_with_empty_paper_column(runs, tmp_path):
    (tmp_path / "results/paper").mkdir(parents=True)
    (tmp_path / "results/paper/table2.csv").write_text((REPO / "results/paper/table2.csv").read_text())
    proc = subprocess.run([sys.executable, str(REPO / "scripts/build_table.py"), "grid", "--results",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    csv_text = (tmp_path / "results/grid.csv").read_text()
    assert "loran-sinter,LoRAN (Sinter),accuracy,0.86" in csv_text
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert rows and all(row["paper"] == "" for row in rows)   # the committed paper file holds no number yet
    markdown = (tmp_path / "results/grid.md").read_text()
    assert markdown == proc.stdout.rstrip("\n") + "\n"
    rows_md = [line for line in markdown.splitlines() if line.startswith(("| QLoRA", "| LoRAN"))]
    assert rows_md and all(line.endswith("| - / - / - / - |") for line in rows_md)
    # the table names the command that rebuilds it, under its title
    assert markdown.splitlines()[2] == (f"Built from the run records by `python scripts/build_table.py grid --results "
                                        f"{tmp_path / 'results'}`.")


def test_committed_paper_file_has_every_row_and_no_invented_number():
    """Every (row, metric) is present; empty while the file says it is not transcribed, else percentages."""
    text = (REPO / "results/paper/table2.csv").read_text()
    paper = read_paper(REPO / "results/paper/table2.csv")
    assert len(paper) == 6 * 4
    if "NOT YET TRANSCRIBED" in text:
        assert set(paper.values()) == {""}
    assert all(v == "" or 0 < float(v) <= 100 for v in paper.values()), paper


def test_transcribed_paper_values_reach_the_table(tmp_path, runs):
    path = tmp_path / "paper.csv"
    path.write_text("# transcribed\nrow,label,rouge1,rouge2,rougeL,accuracy\n"
                    "loran-sinter,LoRAN (Sinter),51.2,,30.1,88.4\n")
    table = build(load_records(runs), ROWS, read_paper(path))
    assert cell(table, "loran-sinter", "accuracy")["paper"] == "88.4"
    assert cell(table, "loran-sinter", "rouge2")["paper"] == "" and cell(table, "qlora-none", "rouge1")["paper"] == ""
    line = next(x for x in to_markdown(table, "t").splitlines() if x.startswith("| LoRAN (Sinter)"))
    assert line.endswith("| 51.2 / - / 30.1 / 88.4 |")


def test_a_table_cell_never_pools_two_configurations(tmp_path, write_fake_record):
    """Two learning rates of one row in one experiment: the table stops and names the key that differs."""
    runs = tmp_path / "runs"
    write_fake_record(runs, "loran", "sinter", "bbc_news", 0, {"accuracy": 0.8})
    other = {"dataset": {"name": "bbc_news"}, "adapter": {"name": "loran"}, "activation": {"name": "sinter"},
             "seed": "<seed>", "trainer": {"args": {"learning_rate": 1e-2}}}
    record = write_fake_record(runs, "loran", "sinter", "bbc_news", 1, {"accuracy": 0.9}, identity=other)
    with pytest.raises(MixedConfigs, match=r"loran-sinter / accuracy would pool records whose configs differ in more "
                                           r"than the seed \(trainer.args.learning_rate: 0.001 vs 0.01\)"):
        build(load_records(runs), ROWS)
    record_path = runs / record["cell"] / "record.json"
    record_path.write_text(record_path.read_text().replace('"identity"', '"no_identity"'))
    with pytest.raises(MixedConfigs, match=r"carry no config identity .* run scripts/migrate_records.py"):
        build(load_records(runs), ROWS)


def test_two_datasets_reporting_one_metric_are_not_pooled(tmp_path, write_fake_record):
    runs = tmp_path / "runs"
    write_fake_record(runs, "qlora", "none", "bbc_news", 0, {"accuracy": 0.8})
    write_fake_record(runs, "qlora", "none", "newsgroups20", 0, {"accuracy": 0.6})
    with pytest.raises(MixedConfigs, match=r"dataset.name: \"bbc_news\" vs \"newsgroups20\""):
        build(load_records(runs), ROWS)


def test_a_corrupt_record_stops_the_table_naming_its_file(tmp_path, write_fake_record):
    runs = tmp_path / "runs"
    write_fake_record(runs, "qlora", "none", "bbc_news", 0, {"accuracy": 0.8})
    (runs / "broken").mkdir()
    (runs / "broken/record.json").write_text("{")
    with pytest.raises(CorruptRecord, match=r"broken/record.json is not a valid record"):
        load_records(runs)


def test_the_script_writes_no_table_from_mixed_records(tmp_path, write_fake_record):
    runs = tmp_path / "results/runs/mixed"
    write_fake_record(runs, "qlora", "none", "bbc_news", 0, {"accuracy": 0.8})
    write_fake_record(runs, "qlora", "none", "newsgroups20", 0, {"accuracy": 0.6})
    proc = run_script("scripts/build_table.py", "mixed", "--results", str(tmp_path / "results"))
    assert proc.returncode == 1 and "no table written: qlora-none / accuracy would pool" in proc.stderr
    assert not (tmp_path / "results/mixed.md").exists() and not (tmp_path / "results/mixed.csv").exists()


DROP = object()  # _edit: remove the field


def _edit(runs, record, **changes):
    path = runs / record["cell"] / "record.json"
    data = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not DROP}))
    return path


@pytest.mark.parametrize("changes, field", [
    ({"metrics": DROP}, "metrics is missing"),
    ({"metrics": {"accuracy": "high"}}, "metrics is {'accuracy': 'high'}"),
    ({"choices": DROP}, "choices is missing"),
    ({"choices": {"adapter": "loran", "activation": "sinter"}}, "choices is"),  # no seed
    ({"identity": ["x"]}, "identity is ['x']"),
], ids=["no metrics", "metric a string", "no choices", "no seed", "identity a list"])
def test_a_bad_record_is_left_out_of_the_table_with_a_warning_naming_it(runs, write_fake_record, caplog, changes,
                                                                        field):
    """Issue 24: a hand-edited "ok" record stopped Table 2 with a KeyError; it is left out, its file named."""
    expected = build(load_records(runs), ROWS)
    bad = write_fake_record(runs, "loran", "sinter", "bbc_news", 7, {"accuracy": 0.1})
    path = _edit(runs, bad, **changes)
    assert build(load_records(runs), ROWS) == expected
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f'{path} left out of the table: status is "ok" but {field}') and "must be" in warning


def test_a_record_whose_choices_name_no_row_is_left_out_of_table_2(runs, write_fake_record, caplog):
    expected = build(load_records(runs), ROWS)
    bad = write_fake_record(runs, "loran", "sinter", "bbc_news", 7, {"accuracy": 0.1})
    _edit(runs, bad, choices={"seed": 7})
    assert build(load_records(runs), ROWS) == expected
    assert f'record {bad["cell"]} left out of the table: its choices name no row (no "row", nor "adapter" and ' \
           '"activation")' in [r.getMessage() for r in caplog.records]


def test_load_records_with_a_metric_leaves_out_records_without_it_naming_them(runs, caplog):
    """Of the grid's 18 successful records, 9 report accuracy; the 9 headline records are left out, each named."""
    everything = load_records(runs)
    with_accuracy = load_records(runs, metric="accuracy")
    assert len(everything) == 18 and len(with_accuracy) == 9
    assert all("accuracy" in r["metrics"] for r in with_accuracy)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 9 and all(w.endswith("left out of the table: it reports no 'accuracy' (its metrics: "
                                               "['rouge1', 'rouge2', 'rougeL', 'rougeLsum'])") for w in warned)


def test_ended_records_are_what_load_records_leaves_out_for_its_status(runs, write_fake_record):
    """The grid's one failed record, then a diverged one: each once, successful ones never, a corrupt one stops it."""
    from loran.pipeline.records import CorruptRecord
    from loran.pipeline.tables import ended_records

    (failed,) = ended_records(runs)
    assert failed["status"] == "failed" and failed["choices"]["activation"] == "relu"
    write_fake_record(runs, "loran", "sigmoid", "bbc_news", 0, {}, status="diverged")
    assert sorted(r["status"] for r in ended_records(runs)) == ["diverged", "failed"]
    assert len(load_records(runs)) == 18
    (runs / "broken").mkdir()
    (runs / "broken" / "record.json").write_text("{")
    with pytest.raises(CorruptRecord, match="broken/record.json is not a valid record"):
        ended_records(runs)


def test_the_row_of_a_record_needs_a_row_name_or_both_adapter_and_activation():
    assert row_key({"choices": {"row": "loran_sinter", "adapter": "x", "activation": "y"}}) == "loran_sinter"
    assert row_key({"choices": {"adapter": "loran", "activation": "tanh"}}) == "loran-tanh"
    assert row_key({"choices": {"adapter": "loran"}}) is None and row_key({"choices": {"activation": "tanh"}}) is None


def test_the_scripts_build_their_tables_around_a_bad_record(runs, tmp_path, write_fake_record):
    """build_table.py and study_table.py write their tables and name the bad record on stderr."""
    bad = write_fake_record(runs, "loran", "sinter", "bbc_news", 7, {"accuracy": 0.1})
    path = _edit(runs, bad, metrics=DROP)
    proc = run_script("scripts/build_table.py", "grid", "--results", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stderr
    assert f"WARNING: {path} left out of the table" in proc.stderr and (tmp_path / "results/grid.md").exists()

    from test_study import record  # a study's records keep their per-example predictions
    study = tmp_path / "results/runs/screen"
    for seed in (0, 1):
        for activation in ("identity", "sinter"):
            rec = record(activation, {}, seed, [1, 0, 1, 1])
            (study / rec["cell"]).mkdir(parents=True)
            (study / rec["cell"] / "record.json").write_text(json.dumps(rec))
    (study / "bad").mkdir()
    (study / "bad/record.json").write_text(json.dumps({**rec, "cell": "bad", "metrics": None}))
    (study / "other").mkdir()
    (study / "other/record.json").write_text(json.dumps({**rec, "cell": "other", "metrics": {"rougeL": 0.2}}))
    proc = run_script("scripts/study_table.py", "screen", "--results", str(tmp_path / "results"), "--boot", "100")
    assert proc.returncode == 0, proc.stderr
    assert f"{study / 'bad/record.json'} left out of the table: status is \"ok\" but metrics is None" in proc.stderr
    assert f"{study / 'other/record.json'} left out of the table: it reports no 'accuracy'" in proc.stderr
    assert (tmp_path / "results/screen.md").exists()


def test_the_study_script_asks_for_migration_of_a_record_without_identity(tmp_path):
    """As Table 2 does: a record from before cells were hashed cannot be grouped by configuration."""
    from test_study import record
    study = tmp_path / "results/runs/screen"
    for seed in (0, 1):
        rec = record("identity", {}, seed, [1, 0])
        if seed:
            del rec["identity"]
        (study / rec["cell"]).mkdir(parents=True)
        (study / rec["cell"] / "record.json").write_text(json.dumps(rec))
    proc = run_script("scripts/study_table.py", "screen", "--results", str(tmp_path / "results"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no table written: screen: records ['identity{}.seed1'] carry no config identity" in proc.stderr
    assert "scripts/migrate_records.py" in proc.stderr


def test_identical_to_the_baseline_is_not_significant():
    """LoRAN-identity can equal QLoRA exactly (same scores): a zero-width interval at 0 excludes nothing."""
    same = {s: {"a": v, "b": 1 - v} for s, v in enumerate((0.5, 0.7, 0.6))}
    out = paired_difference(same, same)
    assert (out["delta"], out["ci_low"], out["ci_high"], out["mde"], out["significant"]) == (0, 0, 0, 0, False)
    below = paired_difference({0: {"a": 0.4}, 1: {"a": 0.4}}, {0: {"a": 0.5}, 1: {"a": 0.5}})
    assert below["significant"] is True and below["ci_high"] == pytest.approx(-0.1)  # below, zero spread


# Table 2 end to end in-process (mutation testing: the script runs in a subprocess that mutmut cannot see).
@pytest.fixture
def grid(tmp_path, write_fake_record):
    """QLoRA and three LoRAN rows on accuracy: better (significant), worse (significant), a tie; one-seed
    identity; two-seed sigmoid; tanh has rouge1 but QLoRA has none."""
    runs = tmp_path / "runs"
    acc = {"qlora-none": [0.80, 0.82, 0.81], "loran-sinter": [0.85, 0.86, 0.87], "loran-relu": [0.70, 0.71, 0.73],
           "loran-tanh": [0.79, 0.84, 0.80], "loran-identity": [0.9], "loran-sigmoid": [0.83, 0.84]}
    for row, values in acc.items():
        adapter, activation = row.split("-")
        for seed, value in enumerate(values):
            extra = {"rouge1": 0.25} if row == "loran-tanh" else {}
            write_fake_record(runs, adapter, activation, "bbc_news", seed, {"accuracy": value, **extra})
    return runs


def _entry(table, row, metric):
    return next(e for e in table if e["row"] == row and e["metric"] == metric)


def test_table_entries_in_full(grid):
    from loran.pipeline.tables import build, load_records, load_rows

    table = build(load_records(grid), load_rows(REPO / "configs" / "row"))
    assert [(e["row"], e["metric"]) for e in table][:5] == [("qlora-none", m) for m in
                                                            ("rouge1", "rouge2", "rougeL", "accuracy")] + [
        ("loran-sigmoid", "rouge1")]
    assert len(table) == 8 * 4  # every row of configs/row, with or without records
    missing = _entry(table, "loran-sinter", "rouge2")
    assert missing == {"row": "loran-sinter", "label": "LoRAN (Sinter)", "metric": "rouge2", "paper": "",
                       "mean": None, "std": None, "n": 0, "low": None, "high": None, "delta": None, "ci_low": None,
                       "ci_high": None, "mde": None, "p_value": None, "pairs": 0, "examples": 0, "significant": None,
                       "seeds": []}
    base = _entry(table, "qlora-none", "accuracy")
    assert base["delta"] is None and base["pairs"] == 0 and base["seeds"] == [0, 1, 2]  # no difference to itself
    two = _entry(table, "loran-sigmoid", "accuracy")  # two seeds: a std, and d = 0.03, 0.02 paired
    assert two["std"] == pytest.approx(0.00707107, rel=1e-5) and two["pairs"] == 2
    # the mean of 2 draws is 0.02 or 0.03 with probability 1/4 each: the percentiles are d's extremes
    assert (two["delta"], two["ci_low"], two["ci_high"]) == pytest.approx((0.025, 0.02, 0.03))
    assert two["mde"] == pytest.approx(MDE_FACTOR * bootstrap_se([0.03, 0.02]), rel=0.05)
    assert _entry(table, "loran-tanh", "rouge1")["delta"] is None  # no QLoRA values to pair with
    assert _entry(table, "loran-tanh", "rouge1")["mean"] == pytest.approx(0.25)
    worse = _entry(table, "loran-relu", "accuracy")
    assert worse["significant"] is True and worse["ci_high"] < 0
    assert _entry(table, "loran-tanh", "accuracy")["significant"] is False


# Differences by hand (each example of a seed scores alike, so the bootstrap is over seeds; see the first test):
# Sigmoid d = 3, 2 -> [2, 3], MDE 2.80 x 0.35 = 0.99; ReLU d = -10, -11, -8 -> [-11, -8], MDE 2.80 x 0.72 = 2.02;
# Tanh d = -1, 2, -1 -> [-1, 2], MDE 2.29; Sinter d = 5, 4, 6 -> [4, 6], MDE 1.32; the bootstrap's MDEs (2,000 draws)
# are within 3 % of these. Identity: one seed, every example +10: a zero-width interval.
EXPECTED_MD = """\
# Grid

Values in percent: mean +- std over seeds (n seeds). Second line: difference to QLoRA paired by seed and example, \
[95 % interval of the crossed bootstrap over seeds and examples]; * = the interval excludes 0; MDE = minimal \
detectable effect at 80 % power, 2.80 x the bootstrap SE (loran/pipeline/paired.py; 0 when a row scores as QLoRA on \
every example of every seed); `1 seed` = the interval covers the examples only. `-` = no successful run for that cell.

| row | rouge1 | rouge2 | rougeL | accuracy | paper |
|---|---|---|---|---|---|
| QLoRA | - | - | - | 81.00 +- 1.00 (3) | - / - / - / 80.1 |
| LoRAN (Sigmoid) | - | - | - | 83.50 +- 0.71 (2) | - / - / - / - |
| vs QLoRA |  |  |  | +2.50 [+2.00, +3.00]*, MDE 0.97 | |
| LoRAN (ReLU) | - | - | - | 71.33 +- 1.53 (3) | - / - / - / - |
| vs QLoRA |  |  |  | -9.67 [-11.00, -8.00]*, MDE 1.96 | |
| LoRAN (Tanh) | 25.00 +- 0.00 (3) | - | - | 81.00 +- 2.65 (3) | - / - / - / - |
| vs QLoRA |  |  |  | +0.00 [-1.00, +2.00], MDE 2.29 | |
| LoRAN (Sinter) | - | - | - | 86.00 +- 1.00 (3) | - / - / - / - |
| vs QLoRA |  |  |  | +5.00 [+4.00, +6.00]*, MDE 1.29 | |
| LoRAN (identity = LoRA control) | - | - | - | 90.00 (1) | - / - / - / - |
| vs QLoRA |  |  |  | +10.00 [+10.00, +10.00]*, MDE 0.00, 1 seed | |
| LoRAN (Sigmoid, official start) | - | - | - | - | - / - / - / - |
| LoRAN (ReLU, official start) | - | - | - | - | - / - / - / - |
"""


def test_markdown_and_csv_in_full(grid, tmp_path):
    """The whole rendered table, checked by hand: percent, signs, intervals, stars, dashes, the paper column."""
    from loran.pipeline.tables import build, load_records, load_rows, read_paper, to_markdown, write_csv

    paper = tmp_path / "paper.csv"
    paper.write_text("# test\nrow,label,rouge1,rouge2,rougeL,accuracy\nqlora-none,QLoRA,,,, 80.1 \n")
    table = build(load_records(grid), load_rows(REPO / "configs" / "row"), read_paper(paper))
    assert to_markdown(table, "Grid") == EXPECTED_MD
    write_csv(table, tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == ("row,label,metric,mean,std,n,low,high,delta,ci_low,ci_high,mde,p_value,pairs,examples,"
                        "significant,paper")
    assert lines[1] == "qlora-none,QLoRA,rouge1,,,0,,,,,,,,0,0,,"
    assert lines[4].startswith("qlora-none,QLoRA,accuracy,0.81") and lines[4].endswith(",,,,,,0,0,,80.1")
    relu = next(x for x in lines if x.startswith("loran-relu,LoRAN (ReLU),accuracy,"))
    fields = relu.split(",")
    assert (fields[5], fields[13], fields[14], fields[15], fields[16]) == ("3", "3", "4", "True", "")
    assert [float(v) for v in fields[6:11]] == pytest.approx([0.70, 0.73, -0.0966667, -0.11, -0.08], abs=1e-6)
    assert float(fields[11]) == pytest.approx(MDE_FACTOR * bootstrap_se([-0.10, -0.11, -0.08]), rel=0.05)
    assert float(fields[12]) < 0.01  # p: no bootstrap mean reaches 0
    assert len(lines) == 1 + 8 * 4


def test_load_rows_reads_every_yaml_file_in_the_order_it_gives(tmp_path):
    """Eight rows whose `order` is a permutation unrelated to their file names (and to the folder's listing order),
    and a file that is not YAML. Mutants: no files found (glob pattern changed), not sorted by `order`, errors."""
    from loran.pipeline.tables import load_rows

    orders = [5, 2, 7, 0, 3, 6, 1, 4]
    for i, order in enumerate(orders):
        (tmp_path / f"r{i}.yaml").write_text(f"row:\n  name: row{i}\n  label: 'Row {i}'\n  order: {order}\n")
    (tmp_path / "notes.txt").write_text("row:\n  name: not-a-row\n  label: x\n  order: -1\n")
    expected = [(f"row{i}", f"Row {i}") for i in sorted(range(len(orders)), key=lambda i: orders[i])]
    assert load_rows(tmp_path) == expected


def test_row_key_prefers_the_rows_own_name():
    """A record's row is its `row` choice when it has one (rows whose name is not "<adapter>-<activation>", e.g.
    "loran-relu-official"); only older records fall back to the pair. Mutant: the `row` key misspelt."""
    from loran.pipeline.tables import row_key

    assert row_key({"choices": {"row": "loran-relu-official", "adapter": "loran", "activation": "relu"}}) \
        == "loran-relu-official"
    assert row_key({"choices": {"adapter": "loran", "activation": "relu"}}) == "loran-relu"


def _identity_record(cell, identity):
    return {"cell": cell, "identity": identity}


def test_one_config_check_messages_in_full():
    """The two MixedConfigs messages, word for word: the records without identity, and every differing key
    ("; "-separated, absent keys shown as "<absent>") with every record (", "-separated). Mutants: text replaced
    or re-cased, the separators changed, the record list dropped, the <absent> marker changed."""
    from loran.pipeline.tables import MixedConfigs, check_one_config

    with pytest.raises(MixedConfigs) as err:
        check_one_config([{"cell": "c1"}, _identity_record("c2", {"a": 1})], "r / m")
    assert str(err.value) == ("r / m: records ['c1'] carry no config identity (written before cells were hashed), so "
                              "they cannot be shown to share a config; run scripts/migrate_records.py")
    records = [_identity_record("c2", {"lr": 0.1, "opt": {"name": "adam"}, "x": 1}),
               _identity_record("c1", {"lr": 0.2, "opt": {"name": "sgd"}})]
    with pytest.raises(MixedConfigs) as err:
        check_one_config(records, "r / m")
    assert str(err.value) == (
        'r / m would pool records whose configs differ in more than the seed (lr: 0.1 vs 0.2; opt.name: "adam" vs '
        '"sgd"; x: "<absent>" vs 1); records: c1, c2. Give each configuration its own experiment_name, or move the '
        "extra records out of the folder.")


def test_one_config_check_tells_absent_from_null_and_ignores_key_order():
    """A key set to null in one config and absent from the other is a difference (the two can mean different
    defaults); the same dicts inside a list, with their keys in another order, are not. Mutants: the absent marker
    replaced by None (null == absent), json.dumps without sort_keys (key order counts)."""
    from loran.pipeline.tables import MixedConfigs, check_one_config

    with pytest.raises(MixedConfigs, match=r'x: "<absent>" vs null'):
        check_one_config([_identity_record("c1", {"a": 1, "x": None}), _identity_record("c2", {"a": 1})], "r / m")
    check_one_config([_identity_record("c1", {"sched": [{"step": 1, "gamma": 0.5}]}),
                      _identity_record("c2", {"sched": [{"gamma": 0.5, "step": 1}]})], "r / m")


def test_paper_values_are_read_as_written_in_a_csv_with_windows_line_ends(tmp_path):
    """read_paper returns each paper value as written, also from a CSV saved with \\r\\n line ends whose quoted cell
    holds a line break (a value with a note under it): the csv module needs the file opened with newline="" for that.
    Mutants: the file opened with universal newlines (the cell's \\r\\n read as \\n)."""
    from loran.pipeline.tables import read_paper

    path = tmp_path / "paper.csv"
    path.write_bytes(b'# transcribed from Table 2\r\nrow,rouge1,rouge2,rougeL,accuracy\r\n'
                     b'loran-sinter,51.2,,30.1,"88.4\r\n(dev)"\r\n')
    paper = read_paper(path)
    assert paper[("loran-sinter", "rouge1")] == "51.2" and paper[("loran-sinter", "rouge2")] == ""
    assert paper[("loran-sinter", "accuracy")] == "88.4\r\n(dev)"


def test_write_csv_leaves_a_missing_value_empty(tmp_path):
    """write_csv writes a value that is None or absent from an entry as an empty field (never 0, never an error), and
    a present 0 as 0. Mutant: absent values looked up with e[k] (KeyError)."""
    import csv

    from loran.pipeline.tables import write_csv

    write_csv([{"row": "r", "label": "R", "metric": "accuracy", "mean": 0.0, "std": None}], tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        (line,) = list(csv.DictReader(f))
    assert line["mean"] == "0.0" and line["std"] == "" and line["delta"] == "" and line["paper"] == ""


def test_the_script_writes_no_table_from_records_without_per_example_scores(runs, tmp_path):
    """build_table.py stops with one line naming the record (no traceback, no half-written table)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_table", REPO / "scripts/build_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = runs / "bbc_headlines.tiny.qlora-none.seed2/record.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "predictions"}))
    with pytest.raises(SystemExit, match=r"^no table written: record bbc_headlines.tiny.qlora-none.seed2 kept no "
                                         r"per-example predictions"):
        script.main(["grid", "--results", str(tmp_path / "results")])
    assert not (tmp_path / "results/grid.md").exists() and not (tmp_path / "results/grid.csv").exists()


def test_a_row_s_interval_is_paired_level_s_at_the_draws_asked_for():
    from loran.pipeline.paired import level
    from loran.pipeline.tables import summarize

    rng = np.random.default_rng(5)
    scores = {s: {f"a{i}": float(v) for i, v in enumerate(rng.integers(0, 2, 40))} for s in (0, 1, 2)}
    for kwargs, n_boot in (({"n_boot": 300}, 300), ({}, 2000)):
        row, own = summarize(scores, **kwargs), level(scores, n_boot=n_boot)
        assert (row["low"], row["high"]) == (own.ci_low, own.ci_high) and row["n"] == 3
