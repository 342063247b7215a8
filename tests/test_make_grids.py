"""Every grid the Makefile launches, as make would launch it: its train.py commands composed and checked cell by
cell (each sweep value a distinct cell), and its table commands pointed at the experiment those cells write to."""
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from loran.pipeline.cells import identity, register_resolver
from loran.pipeline.checks import check_config
from loran.pipeline.study import study_rows
from conftest import REPO, cfg_of

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="every test here runs make")

GRIDS = ["reproduce-table2", "reproduce-table2-mini", "study-sinter-screen", "study-sine-omega", "study-sinter",
         "study-rank", "study-rank-null", "study-sine-scale", "study-tuned-length", "study-tuned-val", "study-tuned-test"]
CELLS = {"reproduce-table2": 48, "reproduce-table2-mini": 48}   # 8 rows x 2 tasks x 3 seeds
TABLE_SCRIPTS = {"scripts/build_table.py", "scripts/study_table.py", "scripts/study_choose.py",
                 "scripts/study_confirm.py"}
CHOSEN_LENGTH = 200  # what the stand-in interpreter answers for `scripts/study_choose.py length`
# what the stand-in answers for `study_choose.py overrides`: one run a line, seed-major
LORA_CELL = "dataset=bbc_news trainer.args.max_steps=200 trainer.args.learning_rate=0.003 activation=identity"
DORA_CELL = "dataset=bbc_headlines trainer.args.max_steps=400 trainer.args.learning_rate=0.0003 adapter=dora"
CHOSEN_CELLS = [f"{LORA_CELL} seed=2", f"{DORA_CELL} seed=2", f"{LORA_CELL} seed=3"]


def make_calls(target: str, tmp_path: Path) -> list[list[str]]:
    """The argument lists make passes to $(PY) for `target`, recorded by a stand-in interpreter (STAMP emptied, so
    make neither builds nor needs the venv)."""
    log, fake = tmp_path / "calls.jsonl", tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    f"if sys.argv[1:3] == ['scripts/study_choose.py', 'length']: print({CHOSEN_LENGTH})\n"
                    f"if sys.argv[1:3] == ['scripts/study_choose.py', 'overrides']: print({chr(10).join(CHOSEN_CELLS)!r})\n")
    fake.chmod(0o755)
    done = subprocess.run(["make", "-s", "-C", str(REPO), target, f"PY={fake}", "STAMP="], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "MAKEFLAGS": ""})
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def expand(overrides: list[str]) -> list[list[str]]:
    """A -m command's override lists, one per cell, as Hydra's basic sweeper builds them: the experiment's own
    hydra.sweeper.params and the command's comma sweeps expanded (the command's value wins for a key both name; no
    Makefile value holds a comma otherwise); Hydra's own groups (hydra/launcher=...) left out, they choose where a cell
    runs, not what it is."""
    given = [o for o in overrides if not o.startswith("hydra/")]
    first = [f"{o.split('=', 1)[0]}={o.split('=', 1)[1].split(',')[0]}" for o in given]
    register_resolver()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        swept = compose("train", overrides=first, return_hydra_config=True).hydra.sweeper.params or {}
    named = {o.split("=", 1)[0] for o in given}
    given += [f"{key}={value}" for key, value in swept.items() if key not in named]
    axes = [[f"{o.split('=', 1)[0]}={v}" for v in o.split("=", 1)[1].split(",")] for o in given]
    return [list(cell) for cell in itertools.product(*axes)]


@pytest.mark.parametrize("target", GRIDS)
def test_each_make_grid_composes_into_distinct_checked_cells_and_tables_them(target, tmp_path):
    calls = make_calls(target, tmp_path)
    trains = [c[1:] for c in calls if c[0] == "train.py"]
    tables = [c for c in calls if c[0] in TABLE_SCRIPTS]
    assert trains and tables and len(trains) + len(tables) == len(calls), calls
    experiments, count = set(), 0
    for args in trains:
        assert args[0] == "-m", args  # a grid is a multirun: Hydra's launcher, resumable cell by cell
        cells = []
        for overrides in expand(args[1:]):
            cfg = cfg_of(*overrides, f"results_dir={tmp_path}")
            check_config(cfg)
            cells.append(cfg.cell)
            experiments.add(cfg.experiment_name)
        assert len(set(cells)) == len(cells), f"{target}: a sweep value that names no new cell in {args}"
        count += len(cells)
    assert count == CELLS.get(target, count), f"{target}: {count} cells"
    # the experiment is the first argument of a table script; study_choose.py's comes after what it chooses, and its
    # `overrides` reads the validation grid that chose the test cells
    tabled = {t[2] if t[0] == "scripts/study_choose.py" else t[1] for t in tables if t[1:2] != ["overrides"]}
    assert tabled == experiments, (tables, experiments)


def test_the_tuned_grid_runs_the_extension_it_owes_for_every_method_on_both_seeds_before_choosing(tmp_path):
    """study-tuned-val: after the protocol's grid, the rates `study_choose.py extension` names (here 1e-2 on
    headlines) run for every method of the grid, seeds 0 and 1, and only then are the choices made."""
    log, fake = tmp_path / "calls.jsonl", tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    f"if sys.argv[1:3] == ['scripts/study_choose.py', 'length']: print({CHOSEN_LENGTH})\n"
                    f"if sys.argv[1:3] == ['scripts/study_choose.py', 'extension']: print('bbc_headlines 0.01')\n")
    fake.chmod(0o755)
    done = subprocess.run(["make", "-s", "-C", str(REPO), "study-tuned-val", f"PY={fake}", "STAMP="],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "MAKEFLAGS": ""})
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    at = calls.index(["scripts/study_choose.py", "extension", "study_tuned_val"])
    base, extension = [c for c in calls[:at] if c[0] == "train.py"], [c for c in calls[at:] if c[0] == "train.py"]
    assert len(base) == 4 * 2 * 2 and len(extension) == 4 * 2   # 4 commands a task and seed: the 6 methods
    for seed in (0, 1):
        ran = [c for c in extension if f"seed={seed}" in c]
        like = [c for c in base if f"seed={seed}" in c and "dataset=bbc_headlines" in c]
        assert [[o for o in c if not o.startswith("trainer.args.learning_rate=")] for c in ran] == \
            [[o for o in c if not o.startswith("trainer.args.learning_rate=")] for c in like]
        assert all("trainer.args.learning_rate=0.01" in c for c in ran)
    assert calls[-2:] == [["scripts/study_choose.py", "lr", "study_tuned_val"],
                          ["scripts/study_choose.py", "seeds", "study_tuned_val"]]


def test_the_grids_progress_reads_the_grid_checkouts_records(tmp_path):
    log, fake = tmp_path / "calls.jsonl", tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    for grid, results in (("../study2", "../study2/results"), (None, "./results")):
        log.unlink(missing_ok=True)
        done = subprocess.run(["make", "-s", "-C", str(REPO), "study-progress", f"PY={fake}", "STAMP="]
                              + ([f"GRID={grid}"] if grid else []), capture_output=True, text=True, timeout=120,
                              env={**os.environ, "MAKEFLAGS": ""})
        assert done.returncode == 0, done.stderr
        assert json.loads(log.read_text()) == ["scripts/study_choose.py", "progress", "study_tuned_val", "--results",
                                               results]


def test_the_confirmation_trains_every_cell_in_the_grid_checkout_and_tables_only_here(tmp_path):
    """GRID=<dir>: what that checkout holds lands here first; each chosen cell trains there (the validation grid's code),
    none of them reading the list of cells from its stdin; then the records land here and the table is built here."""
    log, fake, grid = tmp_path / "calls.jsonl", tmp_path / "python", tmp_path / "grid"
    grid.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"read = sys.stdin.read() if sys.argv[1:2] == ['train.py'] else ''\n"
                    f"open({str(log)!r}, 'a').write(json.dumps([os.getcwd(), read, sys.argv[1:]]) + '\\n')\n"
                    f"if sys.argv[1:3] == ['scripts/study_choose.py', 'overrides']: print({chr(10).join(CHOSEN_CELLS)!r})\n")
    fake.chmod(0o755)
    done = subprocess.run(["make", "-s", "-C", str(REPO), "study-tuned-test", f"PY={fake}", "STAMP=", f"GRID={grid}"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "MAKEFLAGS": ""})
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0] == [str(REPO), "", ["scripts/study_choose.py", "overrides", "study_tuned_val"]]
    # records of an earlier, cut run land first: a diverged one is here before the grid's train.py could rerun it
    assert calls[1] == [str(REPO), "", ["scripts/land_records.py", "study_tuned_test", "--grid", str(grid)]]
    assert calls[2:-2] == [[str(grid), "", ["train.py", "-m", "experiment=study_tuned_test", *cell.split()]]
                           for cell in CHOSEN_CELLS]
    assert calls[-2:] == [[str(REPO), "", ["scripts/land_records.py", "study_tuned_test", "--grid", str(grid)]],
                          [str(REPO), "", ["scripts/study_confirm.py", "study_tuned_test"]]]


def test_the_study_control_is_one_configuration_at_each_rank_with_the_scale_control_present(tmp_path):
    """study-sine-scale runs LoRA at lora_alpha 200 next to the control (LoRA at 16): the control the Makefile gives
    the study tables picks exactly one configuration per rank, and the scale control is compared with it (with the
    old default control, activation.name=identity alone, the table refuses: two controls at r = 8)."""
    (call,) = [c for c in make_calls("study-rank", tmp_path) if c[0] == "scripts/study_table.py"]
    control = dict(value.split("=", 1) for flag, value in zip(call, call[1:]) if flag == "--control")
    assert call[call.index("--plan") + 1] == "3,836"  # the first round's confirmation: 3 seeds x 836 test articles
    assert control == {"activation.name": "identity", "adapter.peft.lora_alpha": "16"}

    def record(*overrides):
        cfg = cfg_of("experiment=study_test", "adapter.peft.r=8", *overrides)
        return {"cell": cfg.cell, "identity": identity(cfg), "choices": {"seed": 0}, "trainable_params": 1,
                "metrics": {"accuracy": 0.5}, "predictions": [{"id": "a", "prediction": "x", "accuracy": 1.0},
                                                              {"id": "b", "prediction": "y", "accuracy": 0.0}]}

    records = [record("activation=identity"), record("activation=identity", "adapter.peft.lora_alpha=200"),
               record("adapter=dora")]
    rows = study_rows(records, "accuracy", control, pair_by=("adapter.peft.r",), n_boot=10)
    assert [r["control"] for r in rows] == [True, False, False]
    assert all(r["versus"] == rows[0]["configuration"] for r in rows[1:])
    assert "lora_alpha=16" in rows[0]["configuration"]
    with pytest.raises(ValueError, match="matches 2 configurations"):
        study_rows(records, "accuracy", {"activation.name": "identity"}, pair_by=("adapter.peft.r",), n_boot=10)


def test_every_phony_target_has_a_rule_and_a_line_in_make_help():
    """A name in .PHONY without a rule makes `make <name>` print "Nothing to be done" and exit 0."""
    text = (REPO / "Makefile").read_text()
    (phony,) = [line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith(".PHONY:")]
    rules = {line.split(":", 1)[0] for line in text.splitlines() if line[:1].isalpha() and ":" in line
             and "=" not in line.split(":", 1)[0]}
    assert sorted(set(phony) - rules) == []
    done = subprocess.run(["make", "-s", "-C", str(REPO), "help", "STAMP="], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "MAKEFLAGS": ""})
    listed = {line.split()[0] for line in done.stdout.splitlines()[1:] if line.startswith("  ")}
    assert sorted(set(phony) - listed - {"help", "clean-venv"}) == []
