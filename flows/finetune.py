"""Prefect flow for the finetune stage (`make finetune`): prepare (a cache hit after `make prepare`) -> QLoRA/LoRA
with LLaMA-Factory in the train env -> adapter verification -> manifest (finetune/finetune_stage.py), recorded in
an MLflow stage run with live metrics and the loss curve.

    .venv/bin/python -m llmops finetune [--profile cpu_tiny] [--set finetune.lora_rank=16] [--set finetune.max_steps=50]
    NODE_RANK=1 MASTER_ADDR=... .venv/bin/python -m llmops finetune --worker --profile ... --set finetune.nnodes=2
"""
from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from finetune.finetune_stage import FINETUNE, FinetuneInputs
from finetune.prepare_stage import PREPARE
from finetune.train import train_worker
from flows._cli import run_flow_cli
from flows.champion import resolve_init_adapter
from flows.runner import StageRunner
from workspace.config import load_config
from workspace.locks import workspace_lock


@flow(name="finetune", log_prints=True)
def finetune_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                  force: bool = False, worker: bool = False) -> dict:
    loaded = resolve_init_adapter(load_config(config, profile, overrides or []))
    runner = StageRunner(loaded, force=force)
    with workspace_lock("finetune"):
        prepared = runner.run(PREPARE)
        if worker:  # a NODE_RANK > 0 host of a multi-host run: only its share of the training
            seconds = train_worker(loaded, Path(prepared.path), prepared.content_hash)
            print(f"[finetune] node {os.environ.get('NODE_RANK')} done in {seconds:.0f} s; the NODE_RANK=0 host records the run")
            return {"worker": True, "seconds": seconds}
        return runner.run(FINETUNE, FinetuneInputs(dataset_dir=prepared.path, dataset_hash=prepared.content_hash,
                                                   force=force)).model_dump()


def main(argv: list[str] | None = None) -> int:
    return run_flow_cli(__doc__, finetune_flow, argv=argv, extra=lambda ap: ap.add_argument(
        "--worker", action="store_true", help="a NODE_RANK > 0 host of a multi-host run: train only (rank 0 records)"))
