"""Prefect flow for the dataset preparation stage (`make prepare`): finetune/prepare_stage.py.

    .venv/bin/python -m flows.prepare [--profile cpu_tiny] [--set data.val_ratio=0.2] [--force]

Validates, cleans, masks and splits data/raw sources into data/processed/<content-hash>/, recorded as an MLflow
run with the dataset as inputs. An unchanged rerun is a cache hit; --force redoes the work.
"""
from __future__ import annotations

if __name__ == "__main__":  # a command: re-run under workspace/guard.py first (nothing it starts outlives it)
    from workspace.processes import guard_this_process

    guard_this_process()

import sys

from workspace import offline

offline.apply()

from prefect import flow  # noqa: E402

from finetune.prepare_stage import PREPARE, PrepareInputs  # noqa: E402
from flows._cli import run_flow_cli  # noqa: E402
from flows.runner import StageRunner  # noqa: E402
from workspace.config import load_config  # noqa: E402
from workspace.locks import workspace_lock  # noqa: E402


@flow(name="prepare", log_prints=True)
def prepare_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                 force: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    with workspace_lock("prepare"):
        return StageRunner(loaded, force=force).run(PREPARE, PrepareInputs(force=force)).model_dump()


if __name__ == "__main__":
    sys.exit(run_flow_cli(__doc__, prepare_flow))
