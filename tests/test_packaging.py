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
