"""Table 2 from run records only: mean +- std per cell, and the difference to QLoRA paired by seed.

A cell is (row, metric), where a row is an adapter-activation pair and each metric comes from the task
that reports it (ROUGE from the summarization dataset, accuracy from the classification dataset). A cell
with no successful record shows as "-" (never as 0). The difference to QLoRA uses only seeds that both
rows have: d_s = row_s - qlora_s, mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n), marked "*" when the 95%
interval excludes zero.

A table cell never pools configurations: the records that feed one cell must have the same result-relevant
config (the record's "identity", see loran/pipeline/cells.py) and differ only in the seed; otherwise ``build`` stops
with MixedConfigs naming the keys that differ.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from loran.pipeline.cells import flatten
from loran.pipeline.records import RESULT_FIELDS, read_record, record_problem

log = logging.getLogger(__name__)


def load_rows(folder: str | Path) -> list[tuple[str, str]]:
    """(row name, label) of every row config in `folder` (the repository's configs/row/*.yaml), in their `order`.
    Called by the scripts that build a table, never at import: an installed package has no configs/ folder."""
    rows = [OmegaConf.load(path).row for path in Path(folder).glob("*.yaml")]
    return [(r.name, r.label) for r in sorted(rows, key=lambda r: r.order)]


BASELINE = "qlora-none"
METRICS = ["rouge1", "rouge2", "rougeL", "accuracy"]

# Two-sided 95% quantiles of Student's t, by degrees of freedom (standard table values).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


# One-sided 80% quantiles of Student's t (the power term of a minimal detectable effect), same degrees of freedom.
T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879,
       11: 0.876, 12: 0.873, 13: 0.870, 14: 0.868, 15: 0.866, 16: 0.865, 17: 0.863, 18: 0.862, 19: 0.861,
       20: 0.860, 25: 0.856, 30: 0.854}


def _tabulated(table: dict[int, float], df: int, beyond: float) -> float:
    """The table's value at the nearest tabulated df at or below df; `beyond` (the normal quantile) past the table."""
    if df > max(table):
        return beyond
    return table[max(k for k in table if k <= df)]


def t975(df: int) -> float:
    """t quantile for a 95% two-sided interval (1.96 beyond 30 degrees of freedom)."""
    return _tabulated(T975, df, 1.96)


def t80(df: int) -> float:
    """t quantile for 80% power (0.842 beyond 30 degrees of freedom)."""
    return _tabulated(T80, df, 0.842)


class MixedConfigs(ValueError):
    """Records that would be pooled into one table cell differ in more than the seed."""


def load_records(runs_dir: str | Path, metric: str | None = None) -> list[dict[str, Any]]:
    """Every successful record under runs_dir (failed, diverged or unfinished runs are left out), and with `metric`
    only those that report it. A bad record (loran.pipeline.records.RESULT_FIELDS), or one without `metric`, is left
    out with a warning naming its file; a corrupt one stops the table (CorruptRecord, naming its file)."""
    records = []
    for path in sorted(Path(runs_dir).glob("*/record.json")):
        record = read_record(path)
        if record.get("status") != "ok":
            continue
        problem = record_problem(record, RESULT_FIELDS)
        if not problem and metric is not None and metric not in record["metrics"]:
            problem = f"it reports no {metric!r} (its metrics: {sorted(record['metrics'])})"
        if problem:
            log.warning("%s left out of the table: %s", path, problem)
            continue
        records.append(record)
    return records


def row_key(record: dict[str, Any]) -> str | None:
    """A record's Table 2 row: its row's name, or "<adapter>-<activation>" for records made before rows had names
    (None when its choices name neither)."""
    choices = record["choices"]
    if choices.get("row"):
        return choices["row"]
    return f'{choices["adapter"]}-{choices["activation"]}' if "adapter" in choices and "activation" in choices else None


def values_by_cell(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, float]]:
    """(row key, metric) -> {seed: value}, after checking that each cell's records differ only in the seed."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        if row_key(record) is None:
            log.warning("record %s left out of the table: its choices name no row (no \"row\", nor \"adapter\" "
                        "and \"activation\")", record.get("cell"))
            continue
        for metric in record["metrics"]:
            if metric in METRICS:
                groups.setdefault((row_key(record), metric), []).append(record)
    for (row, metric), group in groups.items():
        check_one_config(group, f"{row} / {metric}")
    return {key: {int(r["choices"]["seed"]): float(r["metrics"][key[1]]) for r in group}
            for key, group in groups.items()}


def require_identity(records: list[dict[str, Any]], where: str) -> None:
    """MixedConfigs naming the records that carry no config identity (written before cells were hashed)."""
    missing = [r.get("cell") for r in records if "identity" not in r]
    if missing:
        raise MixedConfigs(f"{where}: records {missing} carry no config identity (written before cells were "
                           "hashed), so they cannot be shown to share a config; run scripts/migrate_records.py")


def check_one_config(records: list[dict[str, Any]], where: str) -> None:
    """MixedConfigs unless every record has the same identity (the same config up to the seed)."""
    require_identity(records, where)
    flats = [flatten(r["identity"]) for r in records]
    keys = sorted(set().union(*flats))
    differ = {k: sorted({json.dumps(f.get(k, "<absent>"), sort_keys=True) for f in flats}) for k in keys}
    differ = {k: v for k, v in differ.items() if len(v) > 1}
    if differ:
        detail = "; ".join(f"{k}: {' vs '.join(v)}" for k, v in differ.items())
        cells = ", ".join(sorted(r["cell"] for r in records))
        raise MixedConfigs(f"{where} would pool records whose configs differ in more than the seed ({detail}); "
                           f"records: {cells}. Give each configuration its own experiment_name, or move the "
                           "extra records out of the folder.")


def summarize(values: dict[int, float]) -> dict[str, Any]:
    """mean, std (sample; None for one value: a single seed says nothing about spread) and n."""
    xs = list(values.values())
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any] | None:
    """Difference to the baseline over shared seeds, with a 95% t interval and the minimal detectable effect at 80%
    power of that paired t test, (t_.975 + t_.80) x SE (None with fewer than 2 pairs)."""
    seeds = sorted(set(values) & set(baseline))
    if len(seeds) < 2:
        return None
    diffs = [values[s] - baseline[s] for s in seeds]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    se, df = sd / math.sqrt(len(diffs)), len(diffs) - 1
    half = t975(df) * se
    return {"delta": mean, "ci_low": mean - half, "ci_high": mean + half, "mde": (t975(df) + t80(df)) * se,
            "pairs": len(diffs),
            "significant": (mean - half > 0) or (mean + half < 0)}


def read_paper(path: str | Path) -> dict[tuple[str, str], str]:
    """(row key, metric) -> the paper's value as written (empty when not transcribed)."""
    path = Path(path)
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
    return {(r["row"], m): (r.get(m) or "").strip() for r in rows for m in METRICS}


def build(records: list[dict[str, Any]], rows: list[tuple[str, str]],
          paper: dict[tuple[str, str], str] | None = None) -> list[dict[str, Any]]:
    """One entry per (row, metric) in the order of `rows` ((name, label), from load_rows); missing cells have mean
    None."""
    cells = values_by_cell(records)
    paper = paper or {}
    table = []
    for row, label in rows:
        for metric in METRICS:
            values = cells.get((row, metric), {})
            entry = {"row": row, "label": label, "metric": metric, "paper": paper.get((row, metric), ""),
                     "mean": None, "std": None, "n": 0, "delta": None, "ci_low": None, "ci_high": None,
                     "mde": None, "pairs": 0, "significant": None, "seeds": sorted(values)}
            if values:
                entry.update(summarize(values))
                if row != BASELINE and (diff := paired_difference(values, cells.get((BASELINE, metric), {}))):
                    entry.update(diff)
            table.append(entry)
    return table


def _fmt(x: float, scale: float = 100, signed: bool = False) -> str:
    return f"{x * scale:+.2f}" if signed else f"{x * scale:.2f}"


def to_markdown(table: list[dict[str, Any]], title: str) -> str:
    """Rows x metrics, values in percent: mean +- std (n), and the paired difference to QLoRA."""
    by_row: dict[str, dict[str, dict]] = {}
    for e in table:
        by_row.setdefault(e["row"], {})[e["metric"]] = e
    head = "| row | " + " | ".join(METRICS) + " | paper |"
    lines = [f"# {title}", "",
             "Values in percent: mean +- std (n seeds). Second line: difference to QLoRA paired by seed, "
             "[95% t interval]; * = the interval excludes 0; MDE = minimal detectable effect at 80% power of that "
             "paired t test, (t.975 + t.80) x SE (0 when a row equals QLoRA on every seed: no seed-to-seed noise "
             "is seen then). `-` = no successful run for that cell.", "",
             head, "|" + "---|" * (len(METRICS) + 2)]
    for row, label in dict.fromkeys((e["row"], e["label"]) for e in table):
        cells, deltas = [], []
        for metric in METRICS:
            e = by_row[row][metric]
            spread = "" if e["std"] is None else f' +- {_fmt(e["std"])}'
            cells.append("-" if e["mean"] is None else f'{_fmt(e["mean"])}{spread} ({e["n"]})')
            if e["delta"] is None:
                deltas.append("")
            else:
                mark = "*" if e["significant"] else ""
                deltas.append(f'{_fmt(e["delta"], signed=True)} [{_fmt(e["ci_low"], signed=True)}, '
                              f'{_fmt(e["ci_high"], signed=True)}]{mark}, MDE {_fmt(e["mde"])}')
        paper = " / ".join(by_row[row][m]["paper"] or "-" for m in METRICS)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper} |")
        if any(deltas):
            lines.append("| vs QLoRA | " + " | ".join(deltas) + " | |")
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict[str, Any]], path: str | Path) -> None:
    """The long-format table: one line per (row, metric); missing values are empty, never 0."""
    columns = ["row", "label", "metric", "mean", "std", "n", "delta", "ci_low", "ci_high", "mde", "pairs",
               "significant", "paper"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for e in table:
            writer.writerow({k: ("" if e.get(k) is None else e[k]) for k in columns})
