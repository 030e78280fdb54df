"""Shared fixtures: the offline environment for every test, a throwaway MLflow store, and a session folder for
everything the workspace would write under .cache/ or .prefect/ (locks, served champions, server logs, Prefect's
database and results), so no test writes into the working tree. Engine compile caches (vLLM's torch.compile
cache, the `datasets` cache of the task files) stay in the workspace's .cache on purpose: they only make later
starts faster and never change a result."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_SESSION = Path(tempfile.mkdtemp(prefix="llmops-tests-"))
_ROOT = Path(__file__).resolve().parents[1]
os.environ["LLMOPS_CACHE"] = str(_SESSION / "cache")  # read by workspace.paths at import: set before it
os.environ["PREFECT_HOME"] = str(_SESSION / "prefect")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION / "prefect" / "storage")
os.environ.setdefault("VLLM_CACHE_ROOT", str(_ROOT / ".cache" / "vllm"))
os.environ.setdefault("HF_DATASETS_CACHE", str(_ROOT / ".cache" / "hf-datasets"))
atexit.register(shutil.rmtree, _SESSION, ignore_errors=True)

import pytest  # noqa: E402

from workspace import offline  # noqa: E402

offline.apply()


@pytest.fixture
def tmp_tracking(tmp_path):
    """Overrides that point MLflow at a database and artifact root inside tmp_path."""
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts",
            "tracking.experiment=test-exp"]
