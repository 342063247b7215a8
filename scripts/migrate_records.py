"""Move records to the cell that today's configs give their command (nothing is retrained).

    python scripts/migrate_records.py table2_mini            # results/runs/table2_mini/*/record.json
    python scripts/migrate_records.py table2_mini --assume adapter.peft.some_new_key=its_default
    python scripts/migrate_records.py table2_mini --changed adapter.peft._target_=peft.LoraConfig

Needed when records predate the hashed cell names, or when a result-relevant key was added to the configs
(which changes every cell's hash). For each record, the config is composed again from the record's own
overrides with today's configs and compared with the config the record stored, key by key (keys that cannot
change a result are skipped, see loran/pipeline/cells.py). A key that today's configs have and the record's do not is
accepted only when named with --assume KEY=VALUE and composed to exactly that value: the caller asserts the
old code behaved as that value does (say why in the commit). Likewise --changed KEY=OLD accepts a key whose
stored value was OLD and is today's value now (a class swapped for one that computes the same; say how that
was verified). Only when everything agrees is the record moved
to its cell folder and given config_hash, identity and a "migrated" note (kept for every migration); a record
that today's configs cannot reproduce is left as it is and listed (exit code 1). The per-cell CSV
(results/runs/<experiment>_cells.csv) is then rebuilt.
"""
import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from loran.pipeline.cells import NOT_RESULT, config_hash, flatten, identity, register_resolver
from loran.pipeline.records import cells_csv, git_revision, read_record, rebuild_table, write_record

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def result_keys(config: dict) -> dict:
    """The flattened config without the keys that cannot change a result."""
    return {k: v for k, v in flatten(config).items() if not any(k == n or k.startswith(n + ".") for n in NOT_RESULT)}


def migrate(path: Path, assume: dict[str, str], changed: dict[str, str] | None = None) -> str:
    """Migrate one record; returns what happened."""
    record = read_record(path)
    register_resolver()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=list(record["overrides"]))
    if record.get("config_hash") == config_hash(cfg) and record.get("cell") == cfg.cell:
        return "up to date"
    old, new = result_keys(record["config"]), result_keys(OmegaConf.to_container(cfg, resolve=True))
    assumed = {k: new[k] for k in assume if k in new and k not in old and str(new[k]) == assume[k]}
    swapped = {k: [old[k], new[k]] for k, v in (changed or {}).items() if k in old and k in new and str(old[k]) == v}
    old.update(assumed)
    old.update({k: new[k] for k in swapped})
    differ = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    if differ:
        detail = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in differ)
        raise ValueError(f"today's configs do not reproduce it ({detail})")
    folder = path.parent
    target = folder.with_name(cfg.cell)
    if target.exists():
        raise ValueError(f"{target} exists already")
    note = {"from_cell": folder.name, "by": "scripts/migrate_records.py", "assumed": assumed, "changed": swapped,
            "at": datetime.now(timezone.utc).isoformat(), "commit": git_revision()["commit"]}
    history = record.get("migrated")
    history = history if isinstance(history, list) else [history] if history else []
    record.update(cell=cfg.cell, config_hash=config_hash(cfg), identity=identity(cfg),
                  record_path=str(target / "record.json"), migrated=[*history, note])
    folder.rename(target)
    write_record(target / "record.json", record)
    return f"-> {cfg.cell}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment_name (records in <results>/runs/<experiment>/)")
    parser.add_argument("--results", default="results", help="results folder (default: results)")
    parser.add_argument("--assume", action="append", default=[], metavar="KEY=VALUE",
                        help="a result-relevant key the records predate, and the value the old code behaved as")
    parser.add_argument("--changed", action="append", default=[], metavar="KEY=OLD",
                        help="a key whose stored value OLD became today's value without changing the computation")
    args = parser.parse_args()
    assume = dict(item.split("=", 1) for item in args.assume)
    changed = dict(item.split("=", 1) for item in args.changed)
    runs = Path(args.results) / "runs" / args.experiment
    failures = 0
    for path in sorted(runs.glob("*/record.json")):
        try:
            print(f"{path.parent.name}: {migrate(path, assume, changed)}")
        except ValueError as err:
            failures += 1
            print(f"{path.parent.name}: NOT migrated: {err}", file=sys.stderr)
    rows = rebuild_table(runs, cells_csv(args.results, args.experiment))
    print(json.dumps({"records": len(list(runs.glob('*/record.json'))), "not_migrated": failures, "table_rows": rows}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
