"""`make gpu-kit`: the wheels the lent GPU machine lacks for the `cuda_tiny` path, in an ignored folder that travels
with the working tree (the machine has no network; at most 64 MiB travels, the tree included).

    python -m llmops gpu-kit --lock     # close requirements/gpu-kit.in into requirements/gpu-kit.lock
    python -m llmops gpu-kit            # download the lock into .gpu-kit/<site>/ (idempotent), then --check
    python -m llmops gpu-kit --check    # size, one version per package, every requirement met -> exit 1 if not

Two sites, as on the CPU, because the two CPU envs pin different versions (transformers 5.6.0 for LLaMA-Factory,
5.17.0 for the workspace): `train` (.gpu-kit/train, the finetune stage's subprocess) and `workspace` (.gpu-kit/workspace,
the stages that run in-process). On the machine each is installed into its own folder and put first on PYTHONPATH.

Why not a resolver: the CPU locks are the tested universe (frozen from environments built and tested here, installed
with --no-deps). The kit is their subset for Python 3.12 that the machine does not already hold, so the closure is
computed from the wheels' own metadata against the CPU lock's pins: a requirement is met by the kit, by the machine
(requirements/gpu-machine.txt, its listed packages), or it is absent from the CPU lock too (the CPU env, which the
tests run, lacks it as well: LLaMA-Factory's gradio, av and modelscope are its web UI's and media's, never imported
by training). The check lists every such waiver by name.

bitsandbytes is cut to the CUDA library of the machine's torch (cu130) and its CPU one: the wheel ships one library per
CUDA and ROCm version (a 43 MB wheel, 129 MB unpacked; cut: 3.6 MB).
"""
from __future__ import annotations

import argparse
import email.parser
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
KIT = ROOT / ".gpu-kit"
DOWNLOADS = ROOT / ".cache" / "gpu-kit"  # pip's downloads, before the bitsandbytes cut (does not travel)
IN, LOCK, MACHINE = REQ / "gpu-kit.in", REQ / "gpu-kit.lock", REQ / "gpu-machine.txt"
CPU_LOCKS = {"train": REQ / "train.lock", "workspace": REQ / "workspace.lock"}
TRAVEL_LIMIT = 64 * 2**20  # what one device call carries: the working tree, shared/ and the carried paths together
CUDA_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")  # the machine's torch is 2.11.0+cu130
# The machine's Python: where the wheels must install and what the markers are evaluated for.
PYTHON = "3.12"
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


class KitError(RuntimeError):
    pass


@dataclass(frozen=True)
class Entry:
    site: str
    name: str  # canonical
    version: str
    sha256: str
    filename: str

    def line(self) -> str:
        return f"{self.site} {self.name}=={self.version} sha256:{self.sha256} {self.filename}"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read_machine(path: Path = MACHINE) -> dict[str, Optional[Version]]:
    out: dict[str, Optional[Version]] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, ver = line.partition("==")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name.strip()):
            raise KitError(f"{_rel(path)}:{n}: '{raw}' is not NAME or NAME==VERSION")
        out[canonicalize_name(name)] = Version(ver) if ver else None
    return out


def read_cpu_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def read_in(path: Optional[Path] = None) -> dict[str, list[Requirement]]:
    """The sites' top-level requirements; the [machine] section (names the machine holds in a version taken to meet
    any requirement, each with its reason) comes back under the key "machine"."""
    path = path or IN
    sites: dict[str, list[Requirement]] = {}
    site = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            site = line.strip("[]")
            if site not in (*CPU_LOCKS, "machine"):
                raise KitError(f"{_rel(path)}:{n}: unknown section [{site}]; the sections are "
                               f"{sorted((*CPU_LOCKS, 'machine'))}")
            sites[site] = []
        elif site is None:
            raise KitError(f"{_rel(path)}:{n}: '{line}' comes before any [site] line")
        elif site == "machine" and "#" not in raw:
            raise KitError(f"{_rel(path)}:{n}: [machine] {line} needs its reason after a '#': why the machine's "
                           "version (unknown) meets every requirement on it")
        else:
            sites[site].append(Requirement(line))
    return sites


ANY = Version("0")  # the value of a [machine] name: its version is taken to meet every requirement (with its reason)


def load_machine() -> dict[str, Optional[Version]]:
    machine = read_machine()
    for req in read_in().get("machine", []):
        name = canonicalize_name(req.name)
        if name not in machine:
            raise KitError(f"{_rel(IN)}: [machine] {req.name} is not in {_rel(MACHINE)}: the machine does not hold it")
        machine[name] = ANY
    return machine


def read_lock(path: Path = LOCK) -> list[Entry]:
    if not path.exists():
        raise KitError(f"{_rel(path)} is missing: run `make gpu-kit LOCK=1`")
    entries = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            site, pin, sha, filename = line.split()
            name, version = pin.split("==")
            assert sha.startswith("sha256:")
        except (ValueError, AssertionError):
            raise KitError(f"{_rel(path)}:{n}: '{raw}' is not 'SITE NAME==VERSION sha256:HEX FILENAME'; "
                           "regenerate with `make gpu-kit LOCK=1`") from None
        entries.append(Entry(site, canonicalize_name(name), version, sha[7:], filename))
    return entries


def wheel_requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(zf.read(meta).decode())
    return [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


def applies(req: Requirement, extras: frozenset[str] = frozenset()) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in (extras or {""}))


def _bounded(spec: SpecifierSet) -> bool:
    return any(s.operator in ("<", "<=", "==", "~=", "===") for s in spec)


def machine_meets(req: Requirement, machine: dict[str, Optional[Version]]) -> bool:
    name = canonicalize_name(req.name)
    if name not in machine:
        return False
    have = machine[name]
    if have is ANY:
        return True
    if have is None:
        return not _bounded(req.specifier)
    return req.specifier.contains(have, prereleases=True)


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip"]


def fetch(pins: list[tuple[str, str]], dest: Path) -> dict[str, Path]:
    """Wheels of `pins` for the machine's Python into `dest` (pip download, no dependencies); an sdist-only package
    is built into a wheel here, and must come out pure Python (py3-none-any), else it cannot travel."""
    dest.mkdir(parents=True, exist_ok=True)
    have = {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in dest.glob("*.whl")}
    missing = [(n, v) for n, v in pins if n not in have]
    if missing:
        cmd = _pip() + ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
                        "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
                        *[a for p in PLATFORMS for a in ("--platform", p)], "--platform", "any", "-d", str(dest)]
        proc = subprocess.run(cmd + [f"{n}=={v}" for n, v in missing], capture_output=True, text=True)
        if proc.returncode != 0:  # one at a time only where the batch fails: the batch is one index round trip
            for n, v in missing:
                one = subprocess.run(cmd + [f"{n}=={v}"], capture_output=True, text=True)
                if one.returncode != 0:
                    _build_pure(n, v, dest, one.stderr)
        have = {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in dest.glob("*.whl")}
    lost = [f"{n}=={v}" for n, v in pins if n not in have]
    if lost:
        raise KitError(f"no wheel for {', '.join(lost)} for Python {PYTHON} manylinux x86-64")
    return {n: have[n] for n, _ in pins}


def _build_pure(name: str, version: str, dest: Path, why: str) -> None:
    """Build the wheel from the index's sdist. A wheel built here is not byte-reproducible (zip timestamps), so what
    the lock pins is the sdist's sha256: it is written beside the wheel (`<wheel>.sdist-sha256`) and `_sha` reads it."""
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(_pip() + ["download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                                       f"{name}=={version}"], capture_output=True, text=True)
        sdists = [p for p in Path(tmp).iterdir() if p.is_file()]
        if got.returncode != 0 or len(sdists) != 1:
            raise KitError(f"{name}=={version}: no wheel for Python {PYTHON} (pip download: {why.strip()[-300:]}) "
                           f"and no sdist either: {got.stderr.strip()[-300:]}")
        sdist_sha = _file_sha(sdists[0])
        proc = subprocess.run(_pip() + ["wheel", "--quiet", "--no-deps", "-w", str(Path(tmp) / "out"),
                                        str(sdists[0])], capture_output=True, text=True)
        built = list((Path(tmp) / "out").glob("*.whl"))
        if proc.returncode != 0 or not built:
            raise KitError(f"{name}=={version}: no wheel for Python {PYTHON} (pip download: {why.strip()[-300:]}) "
                           f"and building one failed: {proc.stderr.strip()[-300:]}")
        tags = parse_wheel_filename(built[0].name)[3]
        if not all(t.abi == "none" and t.platform == "any" for t in tags):
            raise KitError(f"{name}=={version} has only an sdist with compiled code: it cannot be built here for "
                           f"Python {PYTHON}; pin a version with a cp312 wheel in the CPU lock")
        (dest / (built[0].name + ".sdist-sha256")).write_text(sdist_sha + "\n")
        shutil.move(str(built[0]), dest / built[0].name)


def _cut_wheel(wheel: Path, drop: set[str]) -> None:
    """Rewrite `wheel` without the files in `drop`, its RECORD without their lines (write aside, then rename)."""
    tmp = wheel.with_name(wheel.name + ".cut")
    with zipfile.ZipFile(wheel) as zf, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in zf.infolist():
            if info.filename in drop:
                continue
            data = zf.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line + "\n" for line in data.decode().splitlines()
                               if line.split(",", 1)[0] not in drop).encode()
            out.writestr(info, data)
    tmp.replace(wheel)


def cut_bitsandbytes(wheel: Path) -> None:
    """Only the CUDA library the machine's torch loads (cu130) and the CPU one: the wheel ships one per CUDA and ROCm
    version (a 43 MB wheel, 129 MB unpacked)."""
    with zipfile.ZipFile(wheel) as zf:
        libs = [n for n in zf.namelist() if re.search(r"libbitsandbytes_\w+\.(so|dll|dylib)$", n)]
    kept = [n for n in libs if Path(n).name in CUDA_KEEP]
    if not any("cuda130" in n for n in kept):
        raise KitError(f"{wheel.name} has no libbitsandbytes_cuda130.so (it has {[Path(n).name for n in libs]}): "
                       "the machine's torch is cu130; pick a bitsandbytes version that ships it")
    _cut_wheel(wheel, set(libs) - set(kept))


def cut_lm_eval(wheel: Path) -> None:
    """Without lm-eval's own task folders (15,500 of its files, most of its 9.1 MB wheel): the workspace runs only the KoBEST task
    YAMLs of configs/tasks (eval/kobest.py, --include_path); the task machinery in lm_eval/tasks/*.py stays."""
    with zipfile.ZipFile(wheel) as zf:
        drop = {n for n in zf.namelist() if re.match(r"lm_eval/tasks/[^/]+/", n)}
    _cut_wheel(wheel, drop)


CUTS = {"bitsandbytes": cut_bitsandbytes, "lm-eval": cut_lm_eval}


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha(path: Path) -> str:
    """The wheel's sha256, or for a wheel built here from an sdist, the sdist's (see `_build_pure`)."""
    side = path.with_name(path.name + ".sdist-sha256")
    return side.read_text().strip() if side.exists() else _file_sha(path)


def lock(out: Path = LOCK) -> list[Entry]:
    """Close each site of gpu-kit.in over its wheels' requirements, with the CPU lock's pins; write the lock."""
    machine, sites = load_machine(), read_in()
    sites.pop("machine", None)
    entries: list[Entry] = []
    cache = DOWNLOADS
    for site, top in sites.items():
        pins = read_cpu_lock(CPU_LOCKS[site])
        wanted: dict[str, frozenset[str]] = {}
        queue = [(r, frozenset(r.extras)) for r in top]
        while queue:
            batch: list[tuple[str, str]] = []
            for req, extras in queue:
                name = canonicalize_name(req.name)
                if name in wanted and extras <= wanted[name]:
                    continue
                if name not in pins:
                    raise KitError(f"{_rel(IN)}: [{site}] {req.name} is not in {_rel(CPU_LOCKS[site])}: the kit "
                                   "carries only what the CPU env pins and tests")
                wanted[name] = wanted.get(name, frozenset()) | extras
                batch.append((name, pins[name]))
            queue = []
            wheels = fetch(batch, cache / site)
            for name, _ in batch:
                for r in wheel_requires(wheels[name]):
                    dep = canonicalize_name(r.name)
                    if (applies(r, wanted[name]) and not machine_meets(r, machine) and dep in pins):
                        queue.append((r, frozenset(r.extras)))
        for name in sorted(wanted):
            wheel = fetch([(name, pins[name])], cache / site)[name]
            entries.append(Entry(site, name, pins[name], _sha(wheel), wheel.name))
    text = ["# generated by `make gpu-kit LOCK=1` from requirements/gpu-kit.in (python -m llmops gpu-kit --lock);",
            "# SITE NAME==VERSION sha256:HASH-OF-THE-DOWNLOADED-WHEEL FILENAME (bitsandbytes is cut after the check;",
            "# a wheel built here from an sdist, not byte-reproducible, is pinned by its sdist's hash)"]
    tmp = out.with_name(out.name + ".part")
    tmp.write_text("\n".join(text + [e.line() for e in entries]) + "\n")
    tmp.replace(out)
    return entries


def build() -> list[Path]:
    """Every wheel of the lock in .gpu-kit/<site>/, verified against the lock's sha256; idempotent."""
    out = []
    for e in read_lock():
        dest = KIT / e.site / e.filename
        if dest.exists():
            out.append(dest)
            continue
        wheel = fetch([(e.name, e.version)], DOWNLOADS / e.site)[e.name]
        if _sha(wheel) != e.sha256:
            raise KitError(f"{wheel.name}: sha256 {_sha(wheel)} is not the lock's {e.sha256} "
                           f"({_rel(LOCK)}): the index serves another file; regenerate with `make gpu-kit LOCK=1`")
        tmp = dest.with_name(dest.name + ".part")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wheel, tmp)
        if e.name in CUTS:
            CUTS[e.name](tmp)
        tmp.replace(dest)
        out.append(dest)
    for site in CPU_LOCKS:  # a wheel left from an older lock would install a second version
        listed = {e.filename for e in read_lock() if e.site == site}
        for stray in (KIT / site).glob("*.whl"):
            if stray.name not in listed:
                stray.unlink()
    return out


def tree_bytes() -> int:
    """What a device call carries besides the kit: the tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


@dataclass
class Report:
    kit_bytes: int
    tree_bytes: int
    wheels: int
    waived: list[str]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check(kit: Path = KIT, lock_path: Path = LOCK) -> Report:
    """Problems that would stop the kit on the machine: over the travel limit, two versions of a package, a wheel
    the lock does not list (or one it lists missing), a requirement neither the kit nor the machine meets."""
    machine, entries = load_machine(), read_lock(lock_path)
    problems, waived = [], []
    kit_bytes = 0
    for site in CPU_LOCKS:
        pins = read_cpu_lock(CPU_LOCKS[site])
        wheels = sorted((kit / site).glob("*.whl"))
        kit_bytes += sum(w.stat().st_size for w in wheels)
        versions: dict[str, list[str]] = {}
        for w in wheels:
            name, version, *_ = parse_wheel_filename(w.name)
            versions.setdefault(canonicalize_name(name), []).append(str(version))
        for name, vs in versions.items():
            if len(vs) > 1:
                problems.append(f".gpu-kit/{site}: {name} in {len(vs)} versions {vs}: one stops the whole install")
        listed = {(e.name, e.version) for e in entries if e.site == site}
        for name, vs in versions.items():
            for v in vs:
                if (name, v) not in listed:
                    problems.append(f".gpu-kit/{site}: {name}=={v} is not in {_rel(lock_path)}")
        for name, v in listed:
            if name not in versions:
                problems.append(f".gpu-kit/{site}: {name}=={v} of the lock is missing: run `make gpu-kit`")
        for w in wheels:
            name = canonicalize_name(parse_wheel_filename(w.name)[0])
            for r in wheel_requires(w):
                if not applies(r):
                    continue
                dep = canonicalize_name(r.name)
                if dep in versions and any(r.specifier.contains(Version(v), prereleases=True) for v in versions[dep]):
                    continue
                if dep not in versions and machine_meets(r, machine):
                    continue
                if dep not in pins:
                    waived.append(f"{site}: {name} -> {r} (not in {_rel(CPU_LOCKS[site])} either)")
                    continue
                where = (f"the kit has {dep}=={versions[dep]}" if dep in versions else
                         f"the machine has {dep} {machine.get(dep) or '(version unknown)'}" if dep in machine else
                         "neither the kit nor the machine has it")
                problems.append(f".gpu-kit/{site}: {name} requires {r}: {where}")
    tree = tree_bytes()
    if kit_bytes + tree > TRAVEL_LIMIT:
        problems.append(f"the kit ({kit_bytes / 2**20:.1f} MiB) and the working tree ({tree / 2**20:.1f} MiB) are "
                        f"{(kit_bytes + tree) / 2**20:.1f} MiB, over the {TRAVEL_LIMIT / 2**20:.0f} MiB one device call carries")
    return Report(kit_bytes, tree, len(entries), sorted(set(waived)), problems)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="make gpu-kit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", action="store_true", help="re-close gpu-kit.in into gpu-kit.lock first")
    ap.add_argument("--check", action="store_true", help="only check the folder already built")
    args = ap.parse_args(argv)
    try:
        if args.lock:
            print(f"[gpu-kit] {len(lock())} wheels locked in {_rel(LOCK)}")
        if not args.check:
            build()
        rep = check()
    except KitError as exc:
        print(f"[gpu-kit] {exc}", file=sys.stderr)
        return 1
    print(f"[gpu-kit] {rep.wheels} wheels, {rep.kit_bytes / 2**20:.1f} MiB in .gpu-kit/ + working tree "
          f"{rep.tree_bytes / 2**20:.1f} MiB = {(rep.kit_bytes + rep.tree_bytes) / 2**20:.1f} of "
          f"{TRAVEL_LIMIT / 2**20:.0f} MiB")
    for w in rep.waived:
        print(f"[gpu-kit] waived as on the CPU: {w}")
    for p in rep.problems:
        print(f"[gpu-kit] PROBLEM {p}", file=sys.stderr)
    return 0 if rep.ok else 1
