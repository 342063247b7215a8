"""scripts/mutation_summary.py: mutmut's verdicts counted per module, equivalent survivors from a list."""
import json
import subprocess
import sys

from conftest import REPO


def test_the_summary_counts_each_modules_verdicts_and_refuses_a_stale_equivalent(tmp_path):
    meta = tmp_path / "mutants" / "loran" / "pipeline"
    meta.mkdir(parents=True)
    (meta / "tables.py.meta").write_text(json.dumps({"exit_code_by_key": {
        "loran.pipeline.tables.x__fmt__mutmut_1": 1, "loran.pipeline.tables.x__fmt__mutmut_2": 0,
        "loran.pipeline.tables.x_build__mutmut_1": 0, "loran.pipeline.tables.x_build__mutmut_2": 33}}))
    (tmp_path / "mutants" / "loran" / "variants.py.meta").write_text(json.dumps({"exit_code_by_key": {
        "loran.variants.xǁLoranVariantǁdelta__mutmut_1": 1, "loran.variants.x_choose_path__mutmut_1": 36,
        "loran.variants.x_choose_path__mutmut_2": None}}))
    equivalent = tmp_path / "equivalent.txt"
    equivalent.write_text("# name  reason\nloran.pipeline.tables.x_build__mutmut_1  the same bytes either way\n")
    script = [sys.executable, str(REPO / "scripts/mutation_summary.py"), "--mutants", str(tmp_path / "mutants")]
    done = subprocess.run([*script, "--equivalent", str(equivalent)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line for line in done.stdout.splitlines()[2:]}
    # module | mutants | killed | timeout | survived | equivalent | no tests | not checked | kill rate | of non-eq.
    assert rows["pipeline.tables"] == "| pipeline.tables | 4 | 1 | 0 | 1 | 1 | 1 | 0 | 33.3% | 50.0% |"
    assert rows["variants"] == "| variants | 3 | 1 | 1 | 0 | 0 | 0 | 1 | 100.0% | 100.0% |"
    assert rows["all"] == "| all | 7 | 2 | 1 | 1 | 1 | 1 | 1 | 60.0% | 75.0% |"
    equivalent.write_text("loran.pipeline.tables.x__fmt__mutmut_1  killed, not equivalent\n")
    stale = subprocess.run([*script, "--equivalent", str(equivalent)], capture_output=True, text=True, timeout=60)
    assert stale.returncode == 1
    assert "listed as equivalent but killed: loran.pipeline.tables.x__fmt__mutmut_1" in stale.stderr
