"""The tuned study's confirmatory table (protocol: results/study_report.md, "The tuned study").

    python scripts/study_confirm.py study_tuned_test       # -> results/study_tuned_test.md and .csv

Per task, every method against LoRA (the identity) on the task's primary metric (accuracy; ROUGE-L), paired by seed
and example with the crossed bootstrap (loran/pipeline/paired.py): the difference, its 95 % interval, the MDE at 80 %
power and the p-value, Holm-corrected over the confirmatory family (loran/pipeline/confirm.py). Next to each method:
its learning rate and how many configurations were tried for it on validation (results/<validation>_choices.json).
"""
import argparse
import json
import sys
from pathlib import Path

from loran.pipeline.confirm import rows_of, to_markdown
from loran.pipeline.records import CorruptRecord
from loran.pipeline.study import write_csv
from loran.pipeline.tables import load_records


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
