"""`make lock`: compile the CUDA lock files from their `.in` files, and check that every lock still resolves.

The CPU locks (requirements/{workspace,train,serve}.lock) are frozen from environments built and tested on the
project's CPU machines; their CPU torch wheel lies in a local folder that no resolver but pip sees. The CUDA
variants cannot be built here (no GPU, and 3-5 GB of CUDA wheels), so they are *resolved* here instead, from
package metadata, for the platform they will be installed on:

    uv pip compile --no-config --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes

(uv reads wheel metadata without downloading wheels: a few seconds, where `pip install --dry-run` downloads
3-5 GB; ../shared/ENVIRONMENT.md). Each lock starts with the sha256 of its `.in` file, so a changed `.in` with an
old lock is caught (`--check`), and `--check` also re-resolves every lock for the target platform: a pin that
vanished from the index, a conflict, or a dependency the lock forgot fails it, without installing anything.

    python -m llmops gpu-lock            # (re)write requirements/train-gpu.lock and serve-gpu.lock
    python -m llmops gpu-lock --check    # stale or unresolvable lock -> exit 1, naming the lock and the package
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"  # Linux x86-64 with glibc >= 2.28: what the CUDA wheels of torch/vllm need
VARIANTS = {"train-gpu": "train-gpu.in", "serve-gpu": "serve-gpu.in"}
HEADER = "# source: requirements/{name} sha256={sha}"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


class LockError(RuntimeError):
    pass


def uv_bin() -> str:
    """uv of the workspace env (pinned in workspace.lock), else one on PATH."""
    for candidate in (Path(sys.executable).parent / "uv", ROOT / ".venv" / "bin" / "uv"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("uv")
    if not found:
        raise LockError("uv not found: run `make setup` (the workspace env pins uv) or `pip install uv`")
    return found


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pins(text: str) -> dict[str, str]:
    """name (normalised) -> version of every `name==version` line of a requirements/lock text."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _PIN.match(line.strip()) if not line.startswith((" ", "\t", "#")) else None
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def entries(text: str) -> dict[str, str]:
    """name -> the whole entry (the pin line and its --hash continuation lines) of a uv lock."""
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            m = _PIN.match(line)
            current = re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else None
            if current:
                out[current] = line + "\n"
        elif current and line.strip().startswith("--hash"):
            out[current] += line + "\n"
        else:
            current = None
    return out


def _compile(src: Path, out: Path, *, hashes: bool) -> subprocess.CompletedProcess:
    argv = [uv_bin(), "pip", "compile", "--no-config", "--quiet", "--python-version", PYTHON_VERSION,
            "--python-platform", PLATFORM, "--custom-compile-command", "make lock", str(src), "-o", str(out)]
    if hashes:
        argv.insert(3, "--generate-hashes")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}  # the local CPU wheel folder stays out
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def write_lock(variant: str) -> Path:
    src = REQ / VARIANTS[variant]
    lock = REQ / f"{variant}.lock"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / lock.name
        res = _compile(src, out, hashes=True)
        if res.returncode:
            raise LockError(f"{_rel(src)} does not resolve for Linux x86-64 / Python {PYTHON_VERSION}:\n"
                            f"{res.stderr.strip()}")
        text = HEADER.format(name=src.name, sha=_sha(src)) + "\n" + out.read_text()
        part = lock.with_suffix(".lock.partial")
        part.write_text(text)
        part.replace(lock)  # never a half-written lock
    return lock


@dataclass
class CheckResult:
    variant: str
    ok: bool
    packages: int
    problems: list[str]


def check_lock(variant: str) -> CheckResult:
    """Is the lock current with its .in, and does it resolve, complete and unchanged, for the target platform?"""
    src, lock = REQ / VARIANTS[variant], REQ / f"{variant}.lock"
    problems: list[str] = []
    if not lock.exists():
        return CheckResult(variant, False, 0, [f"{_rel(lock)} is missing: run `make lock`"])
    text = lock.read_text()
    first = text.splitlines()[0] if text else ""
    if first != HEADER.format(name=src.name, sha=_sha(src)):
        problems.append(f"{_rel(lock)} is stale: {_rel(src)} changed since it was compiled; "
                        "run `make lock`")
    locked = pins(text)
    wanted = pins(src.read_text())
    for name, version in wanted.items():
        if locked.get(name) != version:
            problems.append(f"{src.name} pins {name}=={version}, the lock has {locked.get(name, 'nothing')}")
    with tempfile.TemporaryDirectory() as tmp:
        # the lock itself as the input: every pin must exist for the platform, agree with every other pin's
        # requirements, and nothing may be missing (the resolution must add no package)
        only_pins = Path(tmp) / "pins.txt"
        only_pins.write_text("".join(f"{n}=={v}\n" for n, v in locked.items()))
        res = _compile(only_pins, Path(tmp) / "out.txt", hashes=False)
        if res.returncode:
            problems.append(f"{_rel(lock)} does not resolve for Linux x86-64 / Python {PYTHON_VERSION}: "
                            + " ".join(res.stderr.split())[:1500])
        else:
            resolved = pins((Path(tmp) / "out.txt").read_text())
            for name in sorted(set(resolved) - set(locked)):
                problems.append(f"{_rel(lock)} lacks {name}=={resolved[name]}, which its pins need")
    return CheckResult(variant, not problems, len(locked), problems)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--check", action="store_true", help="check instead of writing: current and resolvable")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown lock(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    rc = 0
    for variant in args.variants or list(VARIANTS):
        try:
            if args.check:
                res = check_lock(variant)
                print(f"[lock] {variant}: {'ok' if res.ok else 'FAILED'} ({res.packages} packages, "
                      f"Linux x86-64 / Python {PYTHON_VERSION})")
                for p in res.problems:
                    print(f"       {p}", file=sys.stderr)
                rc |= 0 if res.ok else 1
            else:
                lock = write_lock(variant)
                print(f"[lock] wrote {_rel(lock)} ({len(pins(lock.read_text()))} packages)")
        except (LockError, subprocess.TimeoutExpired) as exc:
            print(f"[lock] {variant}: {exc}", file=sys.stderr)
            rc = 1
    return rc
