"""A study's table from its records: every configuration against the control, paired by seed and example.

    python scripts/study_table.py study_sinter_screen                     # accuracy vs activation.name=identity
    python scripts/study_table.py study_sinter_screen --plan 5,836        # + the MDE of 5 seeds x 836 examples
    python scripts/study_table.py study_test --pair-by adapter.peft.r     # each rank against LoRA at that rank

Writes results/<experiment>.md and .csv (see loran/pipeline/study.py) and prints the markdown; each comparison's
p-value is also given Holm-adjusted over the table's comparisons. Where a comparison rests on one seed, also the
seed-to-seed null (<experiment>_seed_nulls.csv and a section of the markdown).
"""
import argparse
import logging
import sys
from pathlib import Path

from loran.pipeline.records import CorruptRecord, with_command
from loran.pipeline.study import (configurations, nulls_markdown, seed_nulls, study_rows, to_markdown, with_holm,
                                  write_csv)
from loran.pipeline.tables import load_records, require_identity


def key_value(text: str) -> tuple[str, str]:
    """argparse type: "activation.name=identity" -> ("activation.name", "identity")."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment_name (records in <results>/runs/<experiment>/)")
    parser.add_argument("--results", default="results")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--control", type=key_value, action="append", default=None, metavar="KEY=VALUE",
                        help="identity keys of the control configuration (default: activation.name=identity)")
    parser.add_argument("--pair-by", action="append", default=[], metavar="KEY",
                        help="compare each configuration with the control that has its value of KEY (e.g. a rank)")
    parser.add_argument("--plan", default=None, help="SEEDS,EXAMPLES: also the MDE a run of that size would have")
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s")  # a record left out is said on stderr
    results = Path(args.results)
    control = dict(args.control or [("activation.name", "identity")])
    plan = tuple(int(v) for v in args.plan.split(",")) if args.plan else None
    try:
        records = load_records(results / "runs" / args.experiment, metric=args.metric)
        if not records:
            sys.exit(f"no table written: no successful run record under {results / 'runs' / args.experiment} "
                     f"(that reports {args.metric!r})")
        require_identity(records, args.experiment)
        rows = with_holm(study_rows(records, args.metric, control, n_boot=args.boot, plan=plan,
                                    pair_by=tuple(args.pair_by)))
        # a table with a single-seed comparison shows, as its null, two seeds of one configuration compared alike
        nulls = seed_nulls(records, args.metric, n_boot=args.boot) if any(r.get("pairs") == 1 for r in rows) else []
    except (CorruptRecord, ValueError) as err:
        sys.exit(f"no table written: {err}")
    markdown = to_markdown(rows, args.metric, f"{args.experiment}: {len(records)} successful runs",
                           len(configurations(records))) + nulls_markdown(nulls)
    markdown = with_command(markdown, "scripts/study_table.py", sys.argv[1:] if argv is None else argv)
    write_csv(rows, results / f"{args.experiment}.csv")
    if nulls:
        write_csv(nulls, results / f"{args.experiment}_seed_nulls.csv")
    (results / f"{args.experiment}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
