"""Land a grid's finished records from the checkout that ran them (a worktree at a fixed commit) into this one.

    python scripts/land_records.py study_tuned_val --grid ../study2

Each cell's record.json under <grid>/results/runs/<experiment>/ that this checkout lacks is copied here, whatever its
status (a diverged run counts as run), and so is one that replaces a "failed" record here (an error, run again) or a
"diverged" one by the grid's rerun that diverged too (grids at commits before 2026-12-07 ran a diverged cell again). A
rerun there that did not diverge is not landed and is named: the divergence here stands (a result is never replaced by
another outcome of the same cell). Land before restarting such a grid, so that each divergence is here before a rerun
could replace it there. Before anything is copied, every one of them must read as a record, name the grid's HEAD commit
and be clean (`git.dirty` false: the code that ran is that commit's); a cell whose "ok" record here differs from the
grid's is named too. Any of these: nothing is copied, exit 1. Records are written atomically, so a cell still running
has no record.json yet and is left for a later landing. Then results/runs/<experiment>_cells.csv is rebuilt from the
records here.
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from loran.pipeline.records import CorruptRecord, cells_csv, read_record, rebuild_table


def grid_commit(grid: Path) -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=grid, capture_output=True, text=True, timeout=30)
    if head.returncode != 0:
        raise ValueError(f"{grid} is not a git checkout: {head.stderr.strip()}")
    return head.stdout.strip()


def to_land(grid: Path, here: Path, experiment: str) -> tuple[list[tuple[Path, str]], int, list[str]]:
    """The grid's record files this checkout lacks (or holds only as a failed run, or as a diverged one the grid's rerun
    repeats), with their statuses; how many it already holds; and the cells whose diverged record here stands against
    a rerun in the grid that did not diverge (kept here: a divergence is a result, not replaced by another outcome).
    ValueError naming every record that must not land (unreadable, made at another commit or with uncommitted code, or
    different from this checkout's successful record of the cell)."""
    commit = grid_commit(grid)
    new, same, kept, problems = [], 0, [], []
    for path in sorted((grid / "results" / "runs" / experiment).glob("*/record.json")):
        mine = here / "results" / "runs" / experiment / path.parent.name / "record.json"
        if mine.exists() and mine.read_bytes() == path.read_bytes():
            same += 1
            continue
        try:
            status_here = read_record(mine).get("status") if mine.exists() else None
            record = read_record(path)
        except CorruptRecord as err:
            problems.append(str(err))
            continue
        if status_here == "ok":
            problems.append(f"{path.parent.name}: its record ({record.get('status')}) differs from {mine} (ok)")
            continue
        if status_here == "diverged" and record.get("status") != "diverged":
            kept.append(f"{path.parent.name}: diverged here, {record.get('status')} in the grid's rerun")
            continue
        git = record.get("git") or {}
        if git.get("commit") != commit or git.get("dirty") is not False:
            problems.append(f"{path.parent.name}: made at {git.get('commit')} (dirty: {git.get('dirty')}), "
                            f"not at the grid's clean HEAD {commit[:7]}")
            continue
        new.append((path, record["status"]))
    if problems:
        raise ValueError(f"{len(problems)} record(s) cannot land, nothing copied:\n  " + "\n  ".join(problems))
    return new, same, kept


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--grid", required=True, type=Path, help="the checkout (worktree) that ran the grid")
    parser.add_argument("--here", default=Path("."), type=Path, help="the checkout that receives the records")
    args = parser.parse_args(argv)
    try:
        new, same, kept = to_land(args.grid, args.here, args.experiment)
    except ValueError as err:
        sys.exit(f"no records landed: {err}")
    statuses: dict[str, int] = {}
    runs, table = args.here / "results" / "runs" / args.experiment, cells_csv(args.here / "results", args.experiment)
    if not new and not runs.exists():   # nothing run yet (a grid landed before its first cell): no empty table
        print(f"{args.experiment}: no records in {args.grid} or here yet")
        return
    for path, status in new:
        target = runs / path.parent.name / "record.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        statuses[status] = statuses.get(status, 0) + 1
    rows = rebuild_table(runs, table)
    shown = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none new"
    print(f"{args.experiment}: landed {len(new)} records ({shown}) from {args.grid}; {same} were here already; "
          f"{table}: {rows} rows")
    for cell in kept:
        print(f"kept the divergence here (a result; the rerun is not landed): {cell}")


if __name__ == "__main__":
    main()
