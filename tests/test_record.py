"""loran/pipeline/record.py: the typed, versioned run record."""
import dataclasses
import json
from pathlib import Path

import pytest

from loran.pipeline.record import SCHEMA, RunRecord
from loran.pipeline.records import CorruptRecord, read_record, table_row

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(REPO.glob("results/runs/*/*/record.json"))


def test_every_committed_record_reads_and_writes_back_unchanged():
    assert len(COMMITTED) > 50
    for path in COMMITTED:
        data = json.loads(path.read_text())
        record = RunRecord.from_dict(data)
        assert record.schema == SCHEMA
        written = record.to_dict()
        # every key the file had comes back with its value (a version-1 file gains only the schema and null fields)
        assert {k: written[k] for k in data} == data, path
        assert set(written) - set(data) <= {f.name for f in dataclasses.fields(RunRecord)}
        assert all(written[k] is None for k in set(written) - set(data) - {"schema"}), path


def test_a_version_1_record_keeps_unknown_keys_and_a_future_version_is_refused(tmp_path):
    old = {"status": "ok", "cell": "c", "metrics": {"accuracy": 0.5}, "migrated": [{"by": "x"}]}
    record = RunRecord.from_dict(old)
    assert record.metrics == {"accuracy": 0.5} and record.extra == {"migrated": [{"by": "x"}]}
    assert record.to_dict()["migrated"] == [{"by": "x"}] and record.to_dict()["schema"] == SCHEMA
    with pytest.raises(ValueError, match=r"record schema 99 .* \(1 to 2\)"):
        RunRecord.from_dict({**old, "schema": 99})
    (tmp_path / "record.json").write_text(json.dumps({**old, "schema": 99}))
    with pytest.raises(CorruptRecord, match="record.json: record schema 99"):
        read_record(tmp_path / "record.json")


def test_the_fields_are_declared_once_in_the_order_the_json_shows_them():
    names = [f.name for f in dataclasses.fields(RunRecord)]
    assert names[:3] == ["status", "experiment", "cell"] and names[-2:] == ["schema", "extra"]
    assert list(RunRecord().to_dict()) == names[:-1]  # extra's keys follow the fields


def test_table_row_reads_the_typed_record():
    record = RunRecord(status="ok", experiment="e", cell="c", config_hash="h", metrics={"accuracy": 0.123456789},
                       choices={"dataset": "d", "seed": 0}, trainable_params=10, train_time_s=1.26,
                       wall_time_s=2.0, peak_memory_mb=3.0, git={"commit": "abc"}, finished_at="t",
                       zero_shot={"accuracy": 0.1})
    row = table_row(record)
    assert row["accuracy"] == 0.123457 and row["zero_shot_accuracy"] == 0.1 and row["train_time_s"] == 1.3
    assert row["git_commit"] == "abc" and row["dataset"] == "d" and row["config_hash"] == "h"
