"""The tuned study's confirmatory table (protocol: results/study_report.md, "The tuned study").

    python scripts/study_confirm.py study_tuned_test       # -> results/study_tuned_test.md and .csv

Per task, every method against LoRA (the identity) on the task's primary metric (accuracy; ROUGE-L), paired by seed
and example with the crossed bootstrap (loran/pipeline/paired.py): the difference, its 95 % interval, the MDE at 80 %
power and the p-value, Holm-corrected over the confirmatory family (loran/pipeline/confirm.py). Next to each method:
its learning rate and how many configurations were tried for it on validation (results/<validation>_choices.json).

The table is written only when the test grid is the protocol's, whole: every method at its chosen learning rate and
the released Sinter row at LoRA's, on each task's planned seeds (results/<validation>_seeds.json: that many seeds
after the validation grid's, 2, 3, ...), and nothing else; otherwise the missing (or failed) and extra runs are named
and nothing is written (exit 1). A diverged run is a result: every test example scores 0, and it is named under the
table (loran/pipeline/confirm.py, ``scored``). Last line: whether every test and validation run used the same library
versions (their records' "versions"), else which runs used which. `--progress` prints, per task, the runs done of
those asked for and the hours left, and writes nothing (make study-progress).
"""
import argparse
import json
import sys
from pathlib import Path

from loran.pipeline.confirm import gaps, progress, rows_of, scored, to_markdown, versions_note
from loran.pipeline.records import CorruptRecord
from loran.pipeline.study import write_csv
from loran.pipeline.tables import ended_records, load_records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--validation", default="study_tuned_val", help="the validation grid's experiment")
    parser.add_argument("--choices", default=None, help="default: <results>/<validation>_choices.json")
    parser.add_argument("--seeds", default=None, help="default: <results>/<validation>_seeds.json")
    parser.add_argument("--results", default="results")
    parser.add_argument("--progress", action="store_true", help="print the runs done and the hours left; write nothing")
    args = parser.parse_args(argv)
    results = Path(args.results)
    runs = results / "runs" / args.experiment
    try:
        records = load_records(runs) if runs.is_dir() or not args.progress else []
        choices = json.loads(Path(args.choices or results / f"{args.validation}_choices.json").read_text())
        plans = json.loads(Path(args.seeds or results / f"{args.validation}_seeds.json").read_text())
        if args.progress:
            print("\n".join(progress(records, ended_records(runs), choices,
                                     {plan["task"]: plan["seeds"] for plan in plans})))
            return
        if not records:
            sys.exit(f"no table written: no successful run record under {runs}")
        ended = ended_records(runs)
        confirmed, diverged = scored(records, ended)
        missing = gaps(confirmed, ended, choices, {plan["task"]: plan["seeds"] for plan in plans})
        if missing:
            shown = "; ".join(missing[:6]) + ("; ..." if len(missing) > 6 else "")
            runs_ = f"{len(missing)} run" + ("s" if len(missing) > 1 else "")
            sys.exit(f"no table written: the confirmation is not the protocol's, {runs_} to mend "
                     f"({shown}): run make study-tuned-test, or move what is not asked for away")
        rows = rows_of(confirmed, choices)
        versions = versions_note(records, load_records(results / "runs" / args.validation))
    except (CorruptRecord, ValueError, OSError, KeyError) as err:
        sys.exit(f"no table written: {err}")
    markdown = to_markdown(rows, f"{args.experiment}: {len(records)} successful runs"
                           + (f", {len(diverged)} diverged" if diverged else ""))
    if diverged:
        markdown += f"\nDiverged, each test example scored 0 (a result, not rerun): {', '.join(diverged)}.\n"
    markdown += f"\n{versions}\n"
    (results / f"{args.experiment}.md").write_text(markdown)
    write_csv(rows, results / f"{args.experiment}.csv")
    print(markdown)


if __name__ == "__main__":
    main()
