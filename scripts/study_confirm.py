"""The tuned study's confirmatory table (protocol: results/study_report.md, "The tuned study").

    python scripts/study_confirm.py study_tuned_test       # -> results/study_tuned_test.md and .csv

Per task, every method against LoRA (the identity) on the task's primary metric (accuracy; ROUGE-L), paired by seed
and example with the crossed bootstrap (loran/pipeline/paired.py): the difference, its 95 % interval, the MDE at 80 %
power and the p-value, Holm-corrected over the confirmatory family (every method x task; the released Sinter row,
amp 5e-5, is secondary and left out of it). Next to each method: its learning rate and how many configurations were
tried for it on validation (results/<validation>_choices.json). ROUGE-1/2 differences are reported, not tested.
"""
import argparse
import json
import sys
from pathlib import Path

from loran.pipeline.metrics import primary_metric
from loran.pipeline.paired import holm
from loran.pipeline.records import CorruptRecord
from loran.pipeline.study import _pct, configurations, study_rows, write_csv
from loran.pipeline.tables import load_records
from loran.pipeline.tuning import LR_KEY

CONTROL = {"activation.name": "identity"}
SECONDARY = {"rougeL": ("rouge1", "rouge2")}
UNTUNED = {"activation.name": "sinter", "activation.params.amp": 5e-5}  # the released setting: a row, not a method


def method_key(flat: dict) -> str:
    """A method across splits: its identity without the learning rate and the evaluated split."""
    return json.dumps({k: v for k, v in flat.items() if k not in (LR_KEY, "dataset.eval_split")}, sort_keys=True)


def rows_of(records: list[dict], choices: list[dict]) -> list[dict]:
    """One row per task and configuration, with the paired comparison and what validation tried."""
    tried = {method_key({**c["method"], "dataset.name": c["task"]}): c["tried"] for c in choices}
    out = []
    for task in sorted({r["identity"]["dataset"]["name"] for r in records}):
        mine = [r for r in records if r["identity"]["dataset"]["name"] == task]
        metric = primary_metric(mine[0])
        secondary = {m: {row["configuration"]: row for row in study_rows(mine, m, CONTROL)}
                     for m in SECONDARY.get(metric, ())}
        flats = {g["label"]: g["flat"] for g in configurations(mine)}
        for row in study_rows(mine, metric, CONTROL):
            flat = flats[row["configuration"]]
            untuned = all(flat.get(k) == v for k, v in UNTUNED.items())
            out.append({"task": task, "metric": metric, **row, "learning_rate": flat.get(LR_KEY),
                        "tried": None if untuned else tried.get(method_key(flat)), "confirmatory":
                        not row["control"] and not untuned,
                        **{f"delta_{m}": by[row["configuration"]].get("delta") for m, by in secondary.items()}})
    family = [r for r in out if r["confirmatory"]]
    for row, adjusted in zip(family, holm([r["p_value"] for r in family])):
        row["p_holm"] = adjusted
    return out


def to_markdown(rows: list[dict], title: str) -> str:
    head = ("| task | configuration | lr | tried | seeds | metric | mean | vs LoRA [95% CI] | MDE | p | p (Holm) | "
            "texts differ | ROUGE-1 / -2 vs LoRA |")
    lines = [f"# {title}", "", "Each configuration against LoRA on the same task, paired by seed and example (crossed "
             "bootstrap); MDE at 80 % power; p two-sided from the bootstrap, Holm over the confirmatory family (the "
             f"{sum(r['confirmatory'] for r in rows)} rows with a Holm value). tried = configurations tried on "
             "validation for that method (learning rates; Sine-LoRA's omega was chosen in the first study). Values "
             "in percent.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        vs = "control" if r["control"] else f"{_pct(r['delta'], True)} [{_pct(r['ci_low'], True)}, " \
             f"{_pct(r['ci_high'], True)}]"
        rouge = " / ".join(_pct(r.get(f"delta_{m}"), True) for m in ("rouge1", "rouge2")) if "delta_rouge1" in r else ""
        cells = [r["task"], r["configuration"], f"{r['learning_rate']:g}", "-" if r["tried"] is None else
                 str(r["tried"]), str(len(r["seeds"])), r["metric"], _pct(r[r["metric"]]), vs, _pct(r.get("mde")),
                 f"{r['p_value']:.3f}" if "p_value" in r else "", f"{r['p_holm']:.3f}" if "p_holm" in r else "",
                 _pct(r.get("texts_differ")), rouge]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--choices", default=None, help="default: <results>/study_tuned_val_choices.json")
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    results = Path(args.results)
    try:
        records = load_records(results / "runs" / args.experiment)
        if not records:
            sys.exit(f"no table written: no successful run record under {results / 'runs' / args.experiment}")
        choices = json.loads(Path(args.choices or results / "study_tuned_val_choices.json").read_text())
        rows = rows_of(records, choices)
    except (CorruptRecord, ValueError, OSError) as err:
        sys.exit(f"no table written: {err}")
    markdown = to_markdown(rows, f"{args.experiment}: {len(records)} successful runs")
    (results / f"{args.experiment}.md").write_text(markdown)
    write_csv(rows, results / f"{args.experiment}.csv")
    print(markdown)


if __name__ == "__main__":
    main()
