"""Give records written before cells were hashed their config hash, identity and hashed cell name.

    python scripts/migrate_records.py table2_mini            # results/runs/table2_mini/*/record.json

For each record without a config_hash, the config is composed again from the record's own overrides with
today's configs and compared with the config the record stored, key by key (keys that cannot change a result
are skipped, see loran/cells.py). Only when they agree is the record moved to its hashed cell folder and given
config_hash, identity and a "migrated" note; a record that today's configs cannot reproduce is left as it is
and listed (exit code 1). The run table is then rebuilt from the records. Nothing is retrained.
"""
import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from loran.cells import NOT_RESULT, config_hash, identity
from loran.records import git_revision, read_record, rebuild_table, write_record

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def result_keys(config: dict) -> dict:
    """The flattened config without the keys that cannot change a result."""
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        else:
            flat[prefix] = node

    walk(config, "")
    return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in NOT_RESULT)}


def migrate(path: Path) -> str:
    """Migrate one record; returns what happened."""
    record = read_record(path)
    if "config_hash" in record:
        return "already hashed"
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=list(record["overrides"]))
    old, new = result_keys(record["config"]), result_keys(OmegaConf.to_container(cfg, resolve=True))
    differ = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    if differ:
        detail = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in differ)
        raise ValueError(f"today's configs do not reproduce it ({detail})")
    folder = path.parent
    target = folder.with_name(cfg.cell)
    if target.exists():
        raise ValueError(f"{target} exists already")
    record.update(cell=cfg.cell, config_hash=config_hash(cfg), identity=identity(cfg),
                  record_path=str(target / "record.json"),
                  migrated={"from_cell": folder.name, "by": "scripts/migrate_records.py",
                            "at": datetime.now(timezone.utc).isoformat(), "commit": git_revision()["commit"]})
    folder.rename(target)
    write_record(target / "record.json", record)
    return f"-> {cfg.cell}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment_name (records in <results>/runs/<experiment>/)")
    parser.add_argument("--results", default="results", help="results folder (default: results)")
    args = parser.parse_args()
    runs = Path(args.results) / "runs" / args.experiment
    failures = 0
    for path in sorted(runs.glob("*/record.json")):
        try:
            print(f"{path.parent.name}: {migrate(path)}")
        except ValueError as err:
            failures += 1
            print(f"{path.parent.name}: NOT migrated: {err}", file=sys.stderr)
    rows = rebuild_table(runs, runs.parent / f"{args.experiment}.csv")
    print(json.dumps({"records": len(list(runs.glob('*/record.json'))), "not_migrated": failures, "table_rows": rows}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
