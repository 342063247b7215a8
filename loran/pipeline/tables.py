"""Table 2 from run records only: each row's mean +- std over seeds, and its difference to QLoRA paired by seed and
example.

A cell is (row, metric), where a row is an adapter-activation pair and each metric comes from the task
that reports it (ROUGE from the summarization dataset, accuracy from the classification dataset). A cell
with no successful record shows as "-" (never as 0). The difference to QLoRA is computed as every comparison in the
repository is (loran/pipeline/paired.py): over the seeds both rows have and the examples both scored, d[s, i] =
row - QLoRA, its mean, the 95 % interval of the crossed bootstrap over seeds and examples, and the minimal
detectable effect at 80 % power (2.80 x the bootstrap SE); marked "*" when the interval excludes zero. With one
shared seed the interval covers the examples only. The records must keep each example's score (every record made
since the study began does); an older record stops the table with NoPredictions, naming it.

A table cell never pools configurations: the records that feed one cell must have the same result-relevant
config (the record's "identity", see loran/pipeline/cells.py) and differ only in the seed; otherwise ``build`` stops
with MixedConfigs naming the keys that differ.
"""
from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from loran.pipeline.cells import flatten
from loran.pipeline.paired import compare, level, scores_by_seed
from loran.pipeline.records import RESULT_FIELDS, read_record, record_problem

log = logging.getLogger(__name__)


def load_rows(folder: str | Path) -> list[tuple[str, str]]:
    """(row name, label) of every row config in `folder` (the repository's configs/row/*.yaml), in their `order`.
    Called by the scripts that build a table, never at import: an installed package has no configs/ folder."""
    rows = [OmegaConf.load(path).row for path in Path(folder).glob("*.yaml")]
    return [(r.name, r.label) for r in sorted(rows, key=lambda r: r.order)]


BASELINE = "qlora-none"
METRICS = ["rouge1", "rouge2", "rougeL", "accuracy"]

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


def ended_records(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every record under runs_dir whose run ended without success ("failed" or "diverged"): what load_records leaves
    out, for the tables that must name it (a corrupt record stops them: CorruptRecord, naming its file)."""
    records = map(read_record, sorted(Path(runs_dir).glob("*/record.json")))
    return [record for record in records if record.get("status") != "ok"]


def recent_timed(records: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The `count` records that finished last among those timing a whole run (a resumed run's record times its last
    part only: left out), oldest first: what a grid's hours left are estimated from."""
    timed = [r for r in records if r.get("wall_time_s") and r.get("finished_at") and not r.get("resumed_from")]
    return sorted(timed, key=lambda r: r["finished_at"])[-count:]


def row_key(record: dict[str, Any]) -> str | None:
    """A record's Table 2 row: its row's name, or "<adapter>-<activation>" for records made before rows had names
    (None when its choices name neither)."""
    choices = record["choices"]
    if choices.get("row"):
        return choices["row"]
    return f'{choices["adapter"]}-{choices["activation"]}' if "adapter" in choices and "activation" in choices else None


def scores_by_cell(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """(row key, metric) -> {seed: {example id: score}}, after checking that each cell's records differ only in the
    seed (MixedConfigs) and kept their examples' scores (loran.pipeline.paired.NoPredictions)."""
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
    return {key: scores_by_seed(group, key[1]) for key, group in groups.items()}


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


def summarize(scores: dict[int, dict[str, float]], n_boot: int = 2000) -> dict[str, Any]:
    """mean over seeds of each seed's mean score, std over seeds (sample; None for one seed: a single seed says nothing
    about spread), n, and the 95 % interval of the mean by the crossed bootstrap (loran.pipeline.paired.level)."""
    means = [statistics.fmean(by_example.values()) for by_example in scores.values()]
    own = level(scores, n_boot=n_boot)
    return {"mean": statistics.fmean(means), "std": statistics.stdev(means) if len(means) > 1 else None,
            "n": len(means), "low": own.ci_low, "high": own.ci_high}


def paired_difference(scores: dict[int, dict[str, float]], baseline: dict[int, dict[str, float]],
                      n_boot: int = 2000) -> dict[str, Any] | None:
    """The difference to the baseline paired by seed and example (loran.pipeline.paired.compare): mean, 95 % interval,
    MDE, p-value, the number of seeds paired and of examples; None when the two share no seed."""
    if not set(scores) & set(baseline):
        return None
    result = compare(scores, baseline, n_boot=n_boot)
    return {"delta": result.delta, "ci_low": result.ci_low, "ci_high": result.ci_high, "mde": result.mde,
            "p_value": result.p_value, "pairs": len(result.seeds), "examples": result.n_examples,
            "significant": result.significant}


def read_paper(path: str | Path) -> dict[tuple[str, str], str]:
    """(row key, metric) -> the paper's value as written (empty when not transcribed)."""
    path = Path(path)
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
    return {(r["row"], m): (r.get(m) or "").strip() for r in rows for m in METRICS}


def build(records: list[dict[str, Any]], rows: list[tuple[str, str]],
          paper: dict[tuple[str, str], str] | None = None, n_boot: int = 2000) -> list[dict[str, Any]]:
    """One entry per (row, metric) in the order of `rows` ((name, label), from load_rows); missing cells have mean
    None."""
    cells = scores_by_cell(records)
    paper = paper or {}
    table = []
    for row, label in rows:
        for metric in METRICS:
            scores = cells.get((row, metric), {})
            entry = {"row": row, "label": label, "metric": metric, "paper": paper.get((row, metric), ""),
                     "mean": None, "std": None, "n": 0, "low": None, "high": None, "delta": None, "ci_low": None,
                     "ci_high": None, "mde": None, "p_value": None, "pairs": 0, "examples": 0, "significant": None,
                     "seeds": sorted(scores)}
            if scores:
                entry.update(summarize(scores, n_boot))
                if row != BASELINE and (diff := paired_difference(scores, cells.get((BASELINE, metric), {}), n_boot)):
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
             "Values in percent: mean +- std over seeds (n seeds). Second line: difference to QLoRA paired by seed and "
             "example, [95 % interval of the crossed bootstrap over seeds and examples]; * = the interval excludes 0; "
             "MDE = minimal detectable effect at 80 % power, 2.80 x the bootstrap SE (loran/pipeline/paired.py; 0 when "
             "a row scores as QLoRA on every example of every seed); `1 seed` = the interval covers the examples only. "
             "`-` = no successful run for that cell.", "",
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
                one = ", 1 seed" if e["pairs"] == 1 else ""
                deltas.append(f'{_fmt(e["delta"], signed=True)} [{_fmt(e["ci_low"], signed=True)}, '
                              f'{_fmt(e["ci_high"], signed=True)}]{mark}, MDE {_fmt(e["mde"])}{one}')
        paper = " / ".join(by_row[row][m]["paper"] or "-" for m in METRICS)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper} |")
        if any(deltas):
            lines.append("| vs QLoRA | " + " | ".join(deltas) + " | |")
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict[str, Any]], path: str | Path) -> None:
    """The long-format table: one line per (row, metric); missing values are empty, never 0."""
    columns = ["row", "label", "metric", "mean", "std", "n", "low", "high", "delta", "ci_low", "ci_high", "mde",
               "p_value", "pairs", "examples", "significant", "paper"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for e in table:
            writer.writerow({k: ("" if e.get(k) is None else e[k]) for k in columns})
