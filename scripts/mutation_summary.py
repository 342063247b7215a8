"""The mutation run's verdicts per module, as the markdown table of results/mutation.md (run after `make mutate`).

    python scripts/mutation_summary.py                     # reads mutants/**/*.meta, mutmut's own verdicts
    python scripts/mutation_summary.py --equivalent results/mutation_equivalent.txt

A survivor listed in the equivalent file (one mutant name a line, then its reason after whitespace; # starts a
comment) is counted as equivalent: it cannot change any output. "of non-equivalent" = killed / (run - equivalent).
A listed name that did not survive is reported on stderr and the exit status is 1: the list must describe this run.
"""
import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

COLUMNS = ["killed", "timeout", "survived", "equivalent", "no tests", "not checked"]


def module_of(mutant: str) -> str:
    """'loran.pipeline.tables.x__fmt__mutmut_4' -> 'pipeline.tables'; methods are 'x<sep>Class<sep>name'."""
    return re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0].removeprefix("loran.")


def verdicts(mutants_dir: Path) -> dict[str, str]:
    """{mutant name: mutmut's status} over every mutated file's .meta."""
    out = {}
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = status_by_exit_code[code]
    return out


def read_equivalent(path: Path) -> dict[str, str]:
    """{mutant name: reason} from a file of 'name  reason' lines."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, reason = line.strip().partition(" ")
            out[name] = reason.strip()
    return out


def table(status: dict[str, str], equivalent: dict[str, str]) -> str:
    counts: dict[str, Counter] = {}
    for name, verdict in status.items():
        if verdict == "survived" and name in equivalent:
            verdict = "equivalent"
        counts.setdefault(module_of(name), Counter())[verdict if verdict in COLUMNS else "killed"] += 1
    lines = ["| module | mutants | " + " | ".join(COLUMNS) + " | kill rate | of non-equivalent |",
             "|---|" + "---|" * (len(COLUMNS) + 3)]
    for module, c in sorted(counts.items()) + [("all", sum(counts.values(), Counter()))]:
        run = sum(c[k] for k in ("killed", "timeout", "survived", "equivalent"))
        killed = c["killed"] + c["timeout"]
        rate = f"{100 * killed / run:.1f}%" if run else "-"
        of_non_eq = f"{100 * killed / (run - c['equivalent']):.1f}%" if run > c["equivalent"] else "-"
        lines.append(f"| {module} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in COLUMNS)
                     + f" | {rate} | {of_non_eq} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", default="mutants", help="mutmut's folder (default: mutants)")
    parser.add_argument("--equivalent", default=None, help="the equivalent survivors, one 'name  reason' a line")
    args = parser.parse_args(argv)
    status = verdicts(Path(args.mutants))
    if not status:
        sys.exit(f"no mutmut verdicts under {args.mutants}/: run `make mutate` first")
    equivalent = read_equivalent(Path(args.equivalent)) if args.equivalent else {}
    stale = sorted(name for name in equivalent if status.get(name) != "survived")
    for name in stale:
        print(f"listed as equivalent but {status.get(name, 'not a mutant of this run')}: {name}", file=sys.stderr)
    print(table(status, equivalent))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
