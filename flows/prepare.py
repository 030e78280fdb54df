"""Prefect flow for the dataset preparation stage (`make prepare`): finetune/prepare_stage.py.

    .venv/bin/python -m llmops prepare [--profile cpu_tiny] [--set data.val_ratio=0.2] [--force]

Validates, cleans, masks and splits data/raw sources into data/processed/<content-hash>/, recorded as an MLflow
run with the dataset as inputs. An unchanged rerun is a cache hit; --force redoes the work.
"""
from __future__ import annotations

from prefect import flow

from finetune.prepare_stage import PREPARE, PrepareInputs
from flows._cli import run_flow_cli
from flows.runner import StageRunner
from workspace.config import load_config
from workspace.locks import workspace_lock


@flow(name="prepare", log_prints=True)
def prepare_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                 force: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    with workspace_lock("prepare"):
        return StageRunner(loaded, force=force).run(PREPARE, PrepareInputs(force=force)).model_dump()


def main(argv: list[str] | None = None) -> int:
    return run_flow_cli(__doc__, prepare_flow, argv=argv)
