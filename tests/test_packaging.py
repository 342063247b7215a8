"""The pins agree across pyproject.toml and environment.yml, and .ci/run calls the README's test command."""
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_environment_yml_pins_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"] + project["optional-dependencies"]["train"] + ["pytest==9.2.0"]
    env = set(re.findall(r"^\s*- ([A-Za-z0-9_.-]+==[^\s]+)$", (REPO / "environment.yml").read_text(), re.M))
    assert set(pins) <= env, sorted(set(pins) - env)


def test_ci_runs_the_readme_test_command():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci/run").read_text()
    assert "make test" in readme and "make test" in ci


def test_importing_the_adapter_pulls_in_nothing_of_the_pipeline():
    """`import loran` is the adapter (torch + peft); the Hydra/Trainer/W&B pipeline lives in loran.pipeline."""
    import subprocess
    import sys

    code = ("import loran, sys; print(sorted(m for m in sys.modules if m.startswith('loran.pipeline') or "
            "m.split('.')[0] in {'hydra', 'omegaconf', 'datasets', 'wandb', 'rouge_score', 'submitit', 'gguf'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
