"""The offline and telemetry environment variables, applied once, by the one command line (llmops/cli.py, which
every make target runs).

`apply(hub_enabled)` sets them in this process before deepeval, mlflow, prefect or transformers are imported;
`subprocess_env()` returns a copy of os.environ with them, for commands run in the train/serve envs.
Telemetry is always off. The hub is off unless the configuration switches it on (`hub.enabled`), and then the
HF_*_OFFLINE variables are removed. A user's own settings are respected: HF_HOME, HF_HUB_CACHE and every
cache folder a user has already set are left as they are (a team's shared Hugging Face cache on a GPU host
stays in use); only what is unset gets a folder inside the workspace.
"""
from __future__ import annotations

import os

from workspace.paths import CACHE, ROOT

# Always: no telemetry, no update checks.
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
# Defaults a user's own setting overrides. Prefect gives its temporary (ephemeral) API server 20 s to answer; on a
# busy 2-core machine with a fresh PREFECT_HOME (the server migrates a new SQLite database first) that ran out in CI
# (`RuntimeError: Timed out while attempting to connect to ephemeral Prefect API server`), so the workspace waits 120 s.
DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
# Offline by default: a library that would try a hub fails fast instead of hanging on the network.
HUB_OFF = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def workspace_dirs() -> dict[str, str]:
    """Cache folders for what the workspace itself generates. HF_HOME / HF_HUB_CACHE are deliberately absent:
    models come from the user's own Hugging Face cache; only lm-eval's `datasets` cache of the local task files
    (workspace junk) is kept inside the workspace."""
    return {
        "DEEPEVAL_HOME": str(CACHE / "deepeval"),
        "HF_DATASETS_CACHE": str(CACHE / "hf-datasets"),
        "VLLM_CACHE_ROOT": str(CACHE / "vllm"),
        "MPLCONFIGDIR": str(CACHE / "matplotlib"),
        "PREFECT_HOME": str(ROOT / ".prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(ROOT / ".prefect" / "storage"),
    }


def variables(hub_enabled: bool = False, environ: dict[str, str] | None = None) -> dict[str, str]:
    """What to set: telemetry off (forced), cache folders (only those not already set), hub off (unless enabled)."""
    environ = os.environ if environ is None else environ
    out = dict(TELEMETRY_OFF)
    out.update({k: v for k, v in {**DEFAULTS, **workspace_dirs()}.items() if not environ.get(k)})
    if not hub_enabled:
        out.update(HUB_OFF)
    return out


def apply(hub_enabled: bool = False) -> None:
    """Idempotent; call at an entry point (and again with the config's hub switch once it is loaded)."""
    os.environ.update(variables(hub_enabled))
    if hub_enabled:
        for key in HUB_OFF:
            os.environ.pop(key, None)


def telemetry_off() -> None:
    """Only the telemetry switches (never a folder): for modules that import deepeval and may be imported from a
    notebook or a test that has not called apply()."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def subprocess_env(hub_enabled: bool = False, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(variables(hub_enabled, env))
    if hub_enabled:
        for key in HUB_OFF:
            env.pop(key, None)
    if extra:
        env.update(extra)
    return env
