"""Where things live in the workspace: the repository root, the three virtual environments, generated dirs.

Every module resolves relative paths from the configuration against ROOT, never against the CWD.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("LLMOPS_ROOT", Path(__file__).resolve().parents[1]))

VENVS = {"workspace": ROOT / ".venv", "train": ROOT / ".venv-train", "serve": ROOT / ".venv-serve",
         # `make setup GPU=1`: the CUDA variants, beside the CPU ones (workspace/setup_env.py, workspace/device.py)
         "train-gpu": ROOT / ".venv-train-gpu", "serve-gpu": ROOT / ".venv-serve-gpu"}
CONFIGS = ROOT / "configs"
PROFILES = CONFIGS / "profiles"
DATA_RAW = ROOT / "data" / "raw"
DATA_PROCESSED = ROOT / "data" / "processed"
MODELS = ROOT / "models"
MLRUNS = ROOT / "mlruns"
CACHE = Path(os.environ["LLMOPS_CACHE"]) if os.environ.get("LLMOPS_CACHE") else ROOT / ".cache"  # tests: a temp folder


def resolve(path: str | os.PathLike) -> Path:
    """A path from the config: absolute as given, relative to the workspace root otherwise."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def env_python(env: str) -> Path:
    return VENVS[env] / "bin" / "python"
