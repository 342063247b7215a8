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


HIDE_BITSANDBYTES = """
import importlib.abc, importlib.util, sys
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "bitsandbytes" else _find(name, *a, **k)
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "bitsandbytes":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Hide())
"""


def test_without_bitsandbytes_the_adapter_loads_nothing_of_it_and_adapts_linear_layers():
    """bitsandbytes is optional (loran/compat.py): hidden here as if not installed (CI's second job uninstalls it),
    `import loran` neither loads it nor prints its CPU-kernel warning, the layer table covers nn.Linear and Conv1D
    only, and a LoRAN model of nn.Linear layers trains (a step changes B)."""
    import subprocess
    import sys

    code = HIDE_BITSANDBYTES + """
import torch
from torch import nn
import loran
from loran.dispatch import COVERED
model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
peft_model = loran.get_loran_model(model, loran.LoranConfig(r=2, target_modules=["0", "2"], activation="sinter"))
b = peft_model.base_model.model[0].lora_B["default"].weight
opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
peft_model(torch.randn(4, 8)).square().sum().backward()
opt.step()
print(sorted(c.__name__ for c in COVERED), "bitsandbytes" in sys.modules, bool(b.abs().sum() > 0))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "['Conv1D', 'Linear'] False True", out.stdout
    assert "gemm_4bit" not in out.stderr and "bitsandbytes" not in out.stderr, out.stderr[-2000:]


def test_help_and_completion_import_no_heavy_library():
    """`python train.py --help` and shell completion answer at Hydra's speed: neither imports torch, transformers,
    PEFT or bitsandbytes (they took 15 s when train.py imported them at the top; the time: scripts/time_cli.py)."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "wandb")
    for args, env in ((["--help"], {}), (["-sc", "query=bash"], {"COMP_LINE": "python train.py adapter=",
                                                                   "COMP_POINT": "24"})):
        out = subprocess.run([sys.executable, "-X", "importtime", "train.py", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=120, env={**__import__("os").environ, **env})
        assert out.returncode == 0, out.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
        assert not imported & set(heavy), sorted(imported & set(heavy))
    assert "adapter=dora" in out.stdout and "adapter=qlora" in out.stdout
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=120).stdout
    activations = re.search(r"^activation: (.*)$", help_text, re.M).group(1).split(", ")
    assert "none" in activations and not [a for a in activations if a.endswith("_default")], activations
    # its header (configs/train.yaml, hydra.help.header): the exit codes, and examples that compose and pass the checks
    assert "Exit codes: 0 done," in help_text and "2 configuration error" in help_text
    examples = [line.split("#")[0].split()[2:] for line in help_text.splitlines() if line.startswith("  python train")]
    assert len(examples) == 5
    from loran.pipeline.checks import check_config
    from conftest import cfg_of

    for overrides in examples:
        overrides = [o.split(",")[0] for o in overrides if not o.startswith("-") and o != "job"]  # a sweep's first cell
        check_config(cfg_of(*overrides))


def test_make_help_lists_every_target_with_its_time_and_hardware_and_is_the_default():
    """A bare `make` prints the help; every target of the Makefile is in it, each with a [time, hardware] note."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        import pytest
        pytest.skip("needs make")
    bare = subprocess.run(["make", "-s", "-C", str(REPO)], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and bare.stdout == subprocess.run(
        ["make", "-s", "-C", str(REPO), "help"], capture_output=True, text=True, timeout=60).stdout
    targets = re.findall(r"^([a-z0-9-]+):", (REPO / "Makefile").read_text(), re.M)
    listed = dict(re.findall(r"^  ([a-z0-9-]+) +(.*)$", bare.stdout, re.M))
    assert set(targets) == set(listed), set(targets) ^ set(listed)
    assert all(re.search(r"\[[^]]+\]$", doc) or name == "help" for name, doc in listed.items()), listed
