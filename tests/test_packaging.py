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


def _module_imports() -> dict[str, set[str]]:
    """For each module of the loran package, the loran modules it imports anywhere (module level or inside a function,
    where a late import would hide a cycle)."""
    import ast

    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "loran").rglob("*.py")}
    graph = {}
    for module, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[module] = {name for name in imported if name in files and name != module}
    return graph


def test_no_module_of_the_package_imports_itself_back():
    """No import cycle among loran's modules (config.py and layers.py used to import each other, one of them late)."""
    graph, state, path = _module_imports(), {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for child in sorted(graph[module]):
            if state.get(child) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(child):] + [child]))
            if child not in state:
                visit(child)
        path.pop()
        state[module] = "done"

    assert {"loran.config", "loran.layers"} <= set(graph) and "loran.layers" in graph["loran.config"]
    for module in sorted(graph):
        if module not in state:
            visit(module)
