"""Records and run tables: atomic writes, a table rebuilt from the records under a lock, one process per cell."""
import csv
import multiprocessing as mp
import subprocess
from pathlib import Path

import pytest

from loran.pipeline.records import (CellBusy, CorruptRecord, cell_lock, git_revision, read_record, rebuild_table,
                                    write_record)


def ok_record(cell, **metrics):
    return {"status": "ok", "experiment": "e", "cell": cell, "config_hash": cell[-4:],
            "choices": {"dataset": "d", "model": "m", "adapter": "loran", "activation": "sinter", "seed": 0},
            "metrics": metrics, "trainable_params": 10, "train_time_s": 1.0, "wall_time_s": 2.0,
            "peak_memory_mb": 3.0, "git": {"commit": "abc"}, "finished_at": f"2026-01-01T00:00:0{cell[-1]}"}


def _finish(runs, barrier, i):
    barrier.wait()  # all processes finish at the same moment
    write_record(runs / f"cell{i}" / "record.json", {**ok_record(f"cell{i}", accuracy=i / 10), "notes": "x" * 2000})
    rebuild_table(runs, runs.parent / "e_cells.csv")


def test_eight_cells_finishing_at_once_leave_eight_intact_rows(tmp_path):
    runs = tmp_path / "runs/e"
    ctx = mp.get_context("fork")  # children inherit the imports: the race, not start-up, is tested
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_finish, args=(runs, barrier, i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    rows = list(csv.DictReader(open(tmp_path / "runs/e_cells.csv", newline="")))
    assert [r["cell"] for r in rows] == [f"cell{i}" for i in range(8)]  # ordered by finished_at
    assert [float(r["accuracy"]) for r in rows] == [i / 10 for i in range(8)]


def test_the_table_holds_exactly_the_successful_records_whatever_was_there_before(tmp_path):
    """A process that died between its record and its row: the next rebuild restores the row; stale rows go."""
    runs = tmp_path / "runs/e"
    write_record(runs / "a1/record.json", ok_record("a1", accuracy=0.5))
    write_record(runs / "b2/record.json", ok_record("b2", rouge1=0.25))
    write_record(runs / "c3/record.json", {**ok_record("c3"), "status": "diverged", "metrics": None})
    table = tmp_path / "runs/e_cells.csv"
    table.write_text("cell,accuracy\nghost,0.99\nghost,0.99\n")
    assert rebuild_table(runs, table) == 2
    rows = list(csv.DictReader(open(table, newline="")))
    assert [(r["cell"], r["accuracy"], r["rouge1"], r["config_hash"]) for r in rows] == [
        ("a1", "0.5", "", "a1"), ("b2", "", "0.25", "b2")]


def test_a_corrupt_record_is_named_and_left_out_of_the_run_table(tmp_path):
    runs = tmp_path / "runs/e"
    write_record(runs / "a1/record.json", ok_record("a1", accuracy=0.5))
    (runs / "bad").mkdir()
    (runs / "bad/record.json").write_text('{"status": "ok", "metr')
    with pytest.raises(CorruptRecord, match=r"bad/record.json is not a valid record .* Move it away"):
        read_record(runs / "bad/record.json")
    (runs / "list").mkdir()
    (runs / "list/record.json").write_text("[1, 2]")
    with pytest.raises(CorruptRecord, match=r"list/record.json holds a list, not a record"):
        read_record(runs / "list/record.json")
    assert rebuild_table(runs, tmp_path / "runs/e_cells.csv") == 1


def test_a_failed_record_write_keeps_the_previous_record_whole(tmp_path):
    path = tmp_path / "record.json"
    write_record(path, {"status": "ok", "metrics": {"accuracy": 0.9}})

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_record(path, {"status": "ok", "bad": Unserialisable()})
    assert read_record(path) == {"status": "ok", "metrics": {"accuracy": 0.9}}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left behind


def test_non_finite_values_stay_non_finite_in_a_record(tmp_path):
    write_record(tmp_path / "r.json", {"loss_history": [{"step": 1, "loss": float("nan"), "grad_norm": float("inf")}]})
    (entry,) = read_record(tmp_path / "r.json")["loss_history"]
    assert entry["loss"] != entry["loss"] and entry["grad_norm"] == float("inf")


def _hold(path, held, release):
    with cell_lock(path):
        held.set()
        release.wait(30)


def test_a_cell_lock_admits_one_process_and_frees_itself_when_that_process_dies(tmp_path):
    path = tmp_path / "runs/e/cell.lock"
    ctx = mp.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, held, release))
    holder.start()
    assert held.wait(30)
    with pytest.raises(CellBusy, match=r"another process is running this cell \(it holds .*cell.lock\)"):
        with cell_lock(path):
            pass
    holder.kill()  # no clean release: the kernel drops the flock with the process
    holder.join(30)
    with cell_lock(path):
        pass


def test_git_revision_counts_code_changes_as_dirty_and_the_grids_own_tables_not(tmp_path):
    """A grid rewrites tracked tables under results/ after every cell; only changes elsewhere make a record dirty."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "loran").mkdir()
    (tmp_path / "results/runs").mkdir(parents=True)
    (tmp_path / "loran/x.py").write_text("a = 1\n")
    (tmp_path / "results/runs/e_cells.csv").write_text("cell\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_revision(tmp_path / "loran") == {"commit": head, "dirty": False}
    (tmp_path / "results/runs/e_cells.csv").write_text("cell\nc1\n")
    (tmp_path / "results/runs/new").mkdir()
    (tmp_path / "results/runs/new/record.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("untracked")
    assert git_revision(tmp_path / "loran") == {"commit": head, "dirty": False}   # from a subfolder too
    (tmp_path / "loran/x.py").write_text("a = 2\n")
    assert git_revision(tmp_path) == {"commit": head, "dirty": True}
    assert git_revision(tmp_path / "results") == {"commit": head, "dirty": True}


def test_git_revision_names_the_checkout_loran_is_imported_from(tmp_path, monkeypatch):
    """Not the working directory's: a cell started from elsewhere still records the code it ran."""
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    monkeypatch.chdir(tmp_path)
    assert git_revision()["commit"] == head.stdout.strip()


def _without(record, key):
    return {k: v for k, v in record.items() if k != key}


BAD = {  # hand-edited records that say "ok": what was done to them, and the field the warning must name
    "no metrics": (lambda r: _without(r, "metrics"), "metrics is missing"),
    "metrics null": (lambda r: {**r, "metrics": None}, "metrics is None"),
    "metrics empty": (lambda r: {**r, "metrics": {}}, "metrics is {}"),
    "metric a string": (lambda r: {**r, "metrics": {"accuracy": "0.9"}}, "metrics is {'accuracy': '0.9'}"),
    "metric a bool": (lambda r: {**r, "metrics": {"accuracy": True}}, "metrics is"),
    "metrics a list": (lambda r: {**r, "metrics": [0.9]}, "metrics is [0.9]"),
    "no choices": (lambda r: _without(r, "choices"), "choices is missing"),
    "no seed": (lambda r: {**r, "choices": _without(r["choices"], "seed")}, "choices is"),
    "seed a string": (lambda r: {**r, "choices": {**r["choices"], "seed": "0"}}, "choices is"),
    "identity a string": (lambda r: {**r, "identity": "x"}, "identity is 'x'"),
    "no cell": (lambda r: _without(r, "cell"), "cell is missing"),
    "no experiment": (lambda r: _without(r, "experiment"), "experiment is missing"),
    "no git": (lambda r: _without(r, "git"), "git is missing"),
    "time null": (lambda r: {**r, "train_time_s": None}, "train_time_s is None"),
    "finished_at a number": (lambda r: {**r, "finished_at": 5}, "finished_at is 5"),
    "zero_shot strings": (lambda r: {**r, "zero_shot": {"accuracy": "x"}}, "zero_shot is"),
}


@pytest.mark.parametrize("edit, field", BAD.values(), ids=BAD)
def test_a_bad_record_is_left_out_of_the_run_table_with_a_warning_naming_it(tmp_path, caplog, edit, field):
    """Issue 24: a hand-edited "ok" record made every later cell of its experiment fail with a KeyError (after
    writing its own record) and stopped the table; now it is left out, and the warning names its file and field."""
    runs = tmp_path / "runs/e"
    write_record(runs / "bad1/record.json", edit(ok_record("bad1", accuracy=0.7)))
    write_record(runs / "a2/record.json", ok_record("a2", accuracy=0.5))  # the cell that finishes next
    table = tmp_path / "runs/e_cells.csv"
    assert rebuild_table(runs, table) == 1
    assert [r["cell"] for r in csv.DictReader(open(table, newline=""))] == ["a2"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{runs / 'bad1/record.json'} left out: status is \"ok\" but {field}" in warning and "must be" in warning


def test_an_ok_record_without_optional_fields_keeps_its_row(tmp_path, caplog):
    """What is not bad: no identity (written before cells were hashed), no config_hash, zero_shot or row."""
    record = _without(_without(ok_record("a1", accuracy=0.5), "config_hash"), "identity")
    write_record(tmp_path / "runs/e/a1/record.json", {**record, "zero_shot": None, "git": None})
    assert rebuild_table(tmp_path / "runs/e", tmp_path / "runs/e_cells.csv") == 1
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_an_unreadable_record_is_named_and_left_out_of_the_run_table(tmp_path, caplog):
    """A record.json that cannot be read at all (here a folder) stops its own cell naming it (CorruptRecord),
    and never another cell's table rebuild."""
    runs = tmp_path / "runs/e"
    write_record(runs / "a1/record.json", ok_record("a1", accuracy=0.5))
    (runs / "odd/record.json").mkdir(parents=True)
    with pytest.raises(CorruptRecord, match=r"odd/record.json is not a valid record .* Move it away"):
        read_record(runs / "odd/record.json")
    assert rebuild_table(runs, tmp_path / "runs/e_cells.csv") == 1
    assert any("odd/record.json" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_cell_finishing_next_to_a_bad_and_a_corrupt_record_gets_its_row(tmp_path, monkeypatch, caplog):
    """The issue's path end to end: a tiny cell runs in an experiment that holds a hand-edited "ok" record without
    metrics and a non-JSON record of other cells; it finishes, and the table holds its row."""
    from conftest import SMALL, cfg_of  # the runner's tiny CPU cell
    from test_run import rows
    from loran.pipeline.run import cell_paths, run_cell

    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    cfg = cfg_of(*SMALL, results=results)
    runs = cell_paths(cfg)["runs"]
    write_record(runs / "bad/record.json", _without(ok_record("bad1", accuracy=0.7), "metrics"))
    (runs / "broken").mkdir()
    (runs / "broken/record.json").write_text('{"status": "ok", "metr')
    record = run_cell(cfg)
    assert record["status"] == "ok" and [r["cell"] for r in rows(results)] == [record["cell"]]
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "bad/record.json left out" in warnings and "broken/record.json is not a valid record" in warnings


def test_a_bad_ok_record_of_the_cell_itself_stops_it_naming_the_file(tmp_path):
    """A hand-edited record of the cell being run ("ok", no metrics) is not taken as done (train.py would fail on
    it with a KeyError): the cell stops as a configuration error naming the file and the field."""
    import json

    from loran.pipeline.checks import ConfigError
    from loran.pipeline.run import cell_paths, finished
    from conftest import cfg_of

    cfg = cfg_of("model=tiny", f"results_dir={tmp_path}")
    paths = cell_paths(cfg)
    paths["record"].parent.mkdir(parents=True)
    paths["record"].write_text(json.dumps({"status": "ok", "cell": cfg.cell}))
    with pytest.raises(ConfigError, match=rf"{paths['record']} is not a usable record \(status is \"ok\" but .* is missing"):
        finished(paths, cfg)
