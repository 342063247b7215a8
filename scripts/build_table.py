"""Build Table 2 (CSV + Markdown) from the run records of one experiment; prints the Markdown.

    python scripts/build_table.py table2_mini        # -> results/table2_mini.csv, results/table2_mini.md
"""
import argparse
import logging
import sys
from pathlib import Path

from loran.pipeline.paired import NoPredictions
from loran.pipeline.records import CorruptRecord, with_command
from loran.pipeline.tables import MixedConfigs, build, load_records, load_rows, read_paper, to_markdown, write_csv

ROWS = Path(__file__).resolve().parents[1] / "configs" / "row"  # one file per Table 2 row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment_name of the grid (records in results/runs/<experiment>/)")
    parser.add_argument("--results", default="results", help="results folder (default: results)")
    parser.add_argument("--paper", default=None, help="the paper's values (default: <results>/paper/table2.csv)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s")  # a record left out is said on stderr
    results = Path(args.results)
    try:
        records = load_records(results / "runs" / args.experiment)
        table = build(records, load_rows(ROWS), read_paper(args.paper or results / "paper" / "table2.csv"))
    except (CorruptRecord, MixedConfigs, NoPredictions) as err:
        sys.exit(f"no table written: {err}")
    write_csv(table, results / f"{args.experiment}.csv")
    markdown = with_command(to_markdown(table, f"Table 2 ({args.experiment}): {len(records)} successful runs"),
                            "scripts/build_table.py", sys.argv[1:] if argv is None else argv)
    (results / f"{args.experiment}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
