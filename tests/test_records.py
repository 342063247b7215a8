"""Records and CSV tables: atomic writes, and concurrent appends that each add exactly one whole row."""
import csv
import json
import multiprocessing as mp

import pytest

from loran.records import append_row, read_record, write_record


def _append(path, barrier, i):
    barrier.wait()  # all processes append at the same moment
    append_row(path, {"cell": f"cell{i}", "accuracy": i / 10, "notes": "x" * 2000, "tags": ["a", i]})


def test_eight_processes_appending_at_once_leave_eight_intact_rows(tmp_path):
    path = tmp_path / "table.csv"
    ctx = mp.get_context("fork")  # children inherit the imports: the race, not start-up, is tested
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_append, args=(path, barrier, i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    rows = list(csv.DictReader(open(path, newline="")))
    assert sorted(r["cell"] for r in rows) == [f"cell{i}" for i in range(8)]
    assert all(len(r["notes"]) == 2000 and json.loads(r["tags"])[0] == "a" for r in rows)


def test_new_columns_extend_the_header_and_old_rows_get_blanks(tmp_path):
    path = tmp_path / "t.csv"
    append_row(path, {"cell": "a", "accuracy": 0.5})
    append_row(path, {"cell": "b", "rouge1": 0.25})
    rows = list(csv.DictReader(open(path, newline="")))
    assert rows == [{"cell": "a", "accuracy": "0.5", "rouge1": ""}, {"cell": "b", "accuracy": "", "rouge1": "0.25"}]


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
