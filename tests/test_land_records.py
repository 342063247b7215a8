"""scripts/land_records.py: a grid's records move from the worktree that ran them into this checkout only when each is
readable, names the worktree's clean HEAD and does not contradict a record already here; then the cells table is
rebuilt. Records are real ones (committed validation records) re-homed into temporary checkouts."""
import csv
import importlib.util
import json
import subprocess

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("land_records", REPO / "scripts" / "land_records.py")
land = importlib.util.module_from_spec(spec)
spec.loader.exec_module(land)

EXPERIMENT = "study_tuned_val"
REAL = sorted((REPO / "results" / "runs" / EXPERIMENT).glob("*/record.json"))[:3]


def git_checkout(path):
    path.mkdir()
    for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                                  "-m", "grid"]):
        subprocess.run(["git", *args], cwd=path, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()


def put(checkout, source, commit, dirty=False, **changes):
    record = {**json.loads(source.read_text()), "git": {"commit": commit, "dirty": dirty}, **changes}
    target = checkout / "results" / "runs" / EXPERIMENT / source.parent.name / "record.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record))
    return target


@pytest.fixture
def checkouts(tmp_path):
    grid, here = tmp_path / "grid", tmp_path / "here"
    return grid, here, git_checkout(grid)


def test_new_records_land_with_any_status_and_the_cells_table_counts_the_successful_ones(checkouts, capsys):
    grid, here, commit = checkouts
    (here / "results" / "runs" / EXPERIMENT).mkdir(parents=True)
    landed_before = put(grid, REAL[0], commit)
    (here / "results" / "runs" / EXPERIMENT / REAL[0].parent.name).mkdir()
    (here / "results" / "runs" / EXPERIMENT / REAL[0].parent.name / "record.json").write_bytes(
        landed_before.read_bytes())
    put(grid, REAL[1], commit)
    put(grid, REAL[2], commit, status="diverged", metrics=None)
    (grid / "results" / "runs" / EXPERIMENT / "a.cell.still.running").mkdir()   # no record.json yet
    land.main([EXPERIMENT, "--grid", str(grid), "--here", str(here)])
    out = capsys.readouterr().out
    assert "landed 2 records (1 diverged, 1 ok)" in out and "1 were here already" in out and ": 2 rows" in out
    for source in REAL[1:]:
        mine = here / "results" / "runs" / EXPERIMENT / source.parent.name / "record.json"
        assert mine.read_bytes() == (grid / "results" / "runs" / EXPERIMENT / source.parent.name
                                     / "record.json").read_bytes()
    rows = list(csv.DictReader((here / "results" / "runs" / f"{EXPERIMENT}_cells.csv").open()))
    assert sorted(r["cell"] for r in rows) == sorted(p.parent.name for p in REAL[:2])
    land.main([EXPERIMENT, "--grid", str(grid), "--here", str(here)])   # again: nothing new
    assert "landed 0 records (none new)" in capsys.readouterr().out


def test_a_failed_run_here_is_replaced_by_the_grids_rerun_and_a_diverged_one_by_a_rerun_that_diverged(checkouts,
                                                                                                      capsys):
    """train.py runs a failed cell again: the grid's newer record replaces the failed one landed here. A diverged
    record is a result: only the rerun of a grid at an older commit, diverged again, replaces it (another outcome never
    does: next test); a successful record here is never replaced."""
    grid, here, commit = checkouts
    put(here, REAL[0], commit, status="failed", metrics=None)
    rerun = put(grid, REAL[0], commit)
    put(here, REAL[1], commit, status="diverged", metrics=None, wall_time_s=1.0)
    again = put(grid, REAL[1], commit, status="diverged", metrics=None, wall_time_s=2.0)
    land.main([EXPERIMENT, "--grid", str(grid), "--here", str(here)])
    assert "landed 2 records (1 diverged, 1 ok)" in capsys.readouterr().out
    for source, landed in ((REAL[0], rerun), (REAL[1], again)):
        assert (here / "results" / "runs" / EXPERIMENT / source.parent.name / "record.json").read_bytes() == \
            landed.read_bytes()


@pytest.mark.parametrize("rerun", ["ok", "failed"])
def test_a_divergence_here_stands_against_a_grid_rerun_that_did_not_diverge_and_the_rest_lands(checkouts, capsys,
                                                                                              rerun):
    """A grid at an older commit runs a diverged cell again at each restart: a rerun that succeeded (another outcome)
    or failed (no result) does not replace the divergence landed here; it is named, and the grid's other records land."""
    grid, here, commit = checkouts
    diverged = put(here, REAL[0], commit, status="diverged", metrics=None)
    before = diverged.read_bytes()
    put(grid, REAL[0], commit, status=rerun, **({"metrics": None} if rerun == "failed" else {}))
    put(grid, REAL[1], commit)
    land.main([EXPERIMENT, "--grid", str(grid), "--here", str(here)])
    out = capsys.readouterr().out
    assert "landed 1 records (1 ok)" in out and diverged.read_bytes() == before
    assert f"kept the divergence here (a result; the rerun is not landed): {REAL[0].parent.name}: diverged here, " \
        f"{rerun} in the grid's rerun" in out
    assert (here / "results" / "runs" / EXPERIMENT / REAL[1].parent.name / "record.json").exists()


@pytest.mark.parametrize("problem, named", [
    ("other commit", "made at 0000000000000000000000000000000000000000 (dirty: False), not at the grid's clean HEAD"),
    ("dirty", "(dirty: True), not at the grid's clean HEAD"),
    ("no git", "made at None (dirty: None)"),
    ("corrupt", "is not a valid record"),
    ("differs here", "its record (ok) differs from"),
])
def test_a_record_that_must_not_land_is_named_and_nothing_lands(checkouts, problem, named):
    grid, here, commit = checkouts
    put(grid, REAL[0], commit)   # a good record: it must not land either
    bad = {"other commit": lambda: put(grid, REAL[1], "0" * 40),
           "dirty": lambda: put(grid, REAL[1], commit, dirty=True),
           "no git": lambda: put(grid, REAL[1], commit, git=None),
           "corrupt": lambda: put(grid, REAL[1], commit).write_text("{\"status\": "),
           "differs here": lambda: (put(here, REAL[1], commit, seed_note="another run"), put(grid, REAL[1], commit)),
           }[problem]
    bad()
    before = sorted(p.relative_to(here) for p in here.rglob("*")) if here.exists() else []
    with pytest.raises(SystemExit) as stop:
        land.main([EXPERIMENT, "--grid", str(grid), "--here", str(here)])
    assert "no records landed: 1 record(s) cannot land, nothing copied" in str(stop.value)
    assert REAL[1].parent.name in str(stop.value) and named in str(stop.value)
    assert (sorted(p.relative_to(here) for p in here.rglob("*")) if here.exists() else []) == before


def test_a_grid_with_no_record_yet_lands_nothing_and_writes_no_table(checkouts, capsys):
    grid, here, _ = checkouts
    land.main([EXPERIMENT, "--grid", str(grid), "--here", str(here)])
    assert capsys.readouterr().out == f"{EXPERIMENT}: no records in {grid} or here yet\n"
    assert not here.exists()


def test_a_grid_that_is_not_a_git_checkout_is_refused(tmp_path):
    (tmp_path / "grid").mkdir()
    with pytest.raises(SystemExit, match="no records landed: .*grid is not a git checkout"):
        land.main([EXPERIMENT, "--grid", str(tmp_path / "grid"), "--here", str(tmp_path)])
