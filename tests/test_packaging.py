"""Packaging: the library's ranges, the exact environment (constraints.txt, environment.yml) inside them, CI's test
command, and what `import loran` loads."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _constraints() -> dict[str, str]:
    """{normalised name: version} of constraints.txt, the exact reproduction environment."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_environment_yml_pins_are_those_of_the_constraints():
    pins = _constraints()
    env = re.findall(r"^\s*- ([A-Za-z0-9_.-]+)==([^\s]+)$", (REPO / "environment.yml").read_text(), re.M)
    assert env and {canonicalize_name(n): v for n, v in env}.items() <= pins.items()
    assert "-c constraints.txt" in (REPO / "environment.yml").read_text()


def test_the_library_declares_ranges_that_the_constraints_satisfy():
    """pyproject.toml declares ranges (no == in the library or its extras: a user's stack is not rewritten), and the
    exact environment lies inside every one of them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _constraints()
    requirements = [Requirement(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]
    for req in requirements:
        if canonicalize_name(req.name) == "loran":  # an extra naming another extra
            continue
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"pinned in the library: {req}"
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), (str(req), pins[canonicalize_name(req.name)])
    assert {"torch", "transformers", "peft"} <= {canonicalize_name(r.name) for r in requirements}
    assert not any(canonicalize_name(r.name) == "bitsandbytes" for r in map(Requirement, project["dependencies"]))


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

    assert {"loran.config", "loran.layers"} <= set(graph) and "loran.layers" in graph["loran.dispatch"]
    for module in sorted(graph):
        if module not in state:
            visit(module)
