"""The offline and telemetry environment variables, applied in one place (ENVIRONMENT.md, "Telemetry").

`apply()` sets them in this process (call it before importing deepeval, mlflow, prefect, transformers);
`subprocess_env()` returns a copy of os.environ with them, for commands run in the train/serve envs.
Hub access is a configuration switch (`hub.enabled`): only then are the HF_*_OFFLINE variables left unset.
"""
from __future__ import annotations

import os

from workspace.paths import CACHE, ROOT

# Always: no telemetry, no update checks, caches inside the workspace.
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DEEPEVAL_TELEMETRY_OPT_OUT": "YES",  # exactly YES, before deepeval is imported
    "DEEPEVAL_DISABLE_DOTENV": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}
# Offline by default: a library that would try a hub fails fast instead of hanging on the network.
HUB_OFF = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _workspace_dirs() -> dict[str, str]:
    return {
        "DEEPEVAL_HOME": str(CACHE / "deepeval"),
        "HF_HOME": str(CACHE / "huggingface"),
        "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
        "MPLCONFIGDIR": str(CACHE / "matplotlib"),
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(ROOT / ".prefect")),
        "PREFECT_LOCAL_STORAGE_PATH": os.environ.get("PREFECT_LOCAL_STORAGE_PATH", str(ROOT / ".prefect" / "storage")),
    }


def variables(hub_enabled: bool = False) -> dict[str, str]:
    out = dict(TELEMETRY_OFF)
    out.update(_workspace_dirs())
    if not hub_enabled:
        out.update(HUB_OFF)
    return out


def apply(hub_enabled: bool = False) -> None:
    for key, value in variables(hub_enabled).items():
        os.environ[key] = value
    if hub_enabled:
        for key in HUB_OFF:
            os.environ.pop(key, None)


def subprocess_env(hub_enabled: bool = False, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(variables(hub_enabled))
    if hub_enabled:
        for key in HUB_OFF:
            env.pop(key, None)
    if extra:
        env.update(extra)
    return env
