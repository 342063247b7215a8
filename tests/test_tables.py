"""Table 2 from records: means, paired intervals checked against numpy, missing and failed cells as dashes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loran.pipeline.records import CorruptRecord
from loran.pipeline.tables import MixedConfigs, build, load_records, load_rows, paired_difference, read_paper, to_markdown

REPO = Path(__file__).resolve().parents[1]
ROWS = load_rows(REPO / "configs" / "row")
T975_2 = 4.302652729911275  # Student t, df=2, 0.975 (scipy.stats.t.ppf(0.975, 2))


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


def test_means_and_paired_interval_match_numpy(runs):
    table = build(load_records(runs), ROWS)
    e = cell(table, "loran-sinter", "accuracy")
    assert e["mean"] == pytest.approx(0.86) and e["std"] == pytest.approx(0.01) and e["n"] == 3
    d = np.array([0.85, 0.86, 0.87]) - np.array([0.80, 0.82, 0.81])
    half = T975_2 * d.std(ddof=1) / np.sqrt(3)
    assert (e["delta"], e["ci_low"], e["ci_high"]) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half),
                                                                     abs=1e-3)
    assert e["significant"] is True
    assert cell(table, "loran-tanh", "accuracy")["significant"] is False  # interval straddles 0


def test_missing_and_failed_cells_are_dashes_not_zero(runs):
    table = build(load_records(runs), ROWS)
    assert cell(table, "loran-relu", "accuracy")["mean"] is None  # only a failed run
    assert cell(table, "loran-sigmoid", "rouge1")["mean"] is None  # no run at all
    md = to_markdown(table, "t")
    relu = next(line for line in md.splitlines() if line.startswith("| LoRAN (ReLU)"))
    assert relu.count("| -") >= 4 and "0.00" not in relu


def test_a_single_seed_has_no_std(runs, write_fake_record):
    write_fake_record(runs, "loran", "identity", "bbc_news", 0, {"accuracy": 0.9, "no_class_rate": 0.0})
    table = build(load_records(runs), ROWS)
    e = cell(table, "loran-identity", "accuracy")
    assert (e["mean"], e["std"], e["n"], e["delta"]) == (pytest.approx(0.9), None, 1, None)
    line = next(x for x in to_markdown(table, "t").splitlines() if x.startswith("| LoRAN (identity"))
    assert "| 90.00 (1) |" in line and "+-" not in line


def test_paired_difference_needs_two_shared_seeds():
    assert paired_difference({0: 1.0}, {0: 0.5}) is None
    assert paired_difference({0: 1.0, 1: 2.0}, {1: 0.5, 2: 0.5}) is None


def test_script_writes_csv_and_markdown_with_empty_paper_column(runs, tmp_path):
    (tmp_path / "results/paper").mkdir(parents=True)
    (tmp_path / "results/paper/table2.csv").write_text((REPO / "results/paper/table2.csv").read_text())
    proc = subprocess.run([sys.executable, str(REPO / "scripts/build_table.py"), "grid", "--results",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    csv_text = (tmp_path / "results/grid.csv").read_text()
    assert "loran-sinter,LoRAN (Sinter),accuracy,0.86" in csv_text
    assert (tmp_path / "results/grid.md").read_text() == proc.stdout.rstrip("\n") + "\n"


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
    proc = subprocess.run([sys.executable, str(REPO / "scripts/build_table.py"), "mixed", "--results",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=120)
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
    assert any(f"record {bad['cell']} left out of the table: its choices name no row" in r.getMessage()
               for r in caplog.records)


def test_the_scripts_build_their_tables_around_a_bad_record(runs, tmp_path, write_fake_record):
    """build_table.py and study_table.py write their tables and name the bad record on stderr."""
    bad = write_fake_record(runs, "loran", "sinter", "bbc_news", 7, {"accuracy": 0.1})
    path = _edit(runs, bad, metrics=DROP)
    proc = subprocess.run([sys.executable, str(REPO / "scripts/build_table.py"), "grid", "--results",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=300)
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
    proc = subprocess.run([sys.executable, str(REPO / "scripts/study_table.py"), "screen", "--results",
                           str(tmp_path / "results"), "--boot", "100"], capture_output=True, text=True, timeout=300)
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
    proc = subprocess.run([sys.executable, str(REPO / "scripts/study_table.py"), "screen", "--results",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no table written: screen: records ['identity{}.seed1'] carry no config identity" in proc.stderr
    assert "scripts/migrate_records.py" in proc.stderr
