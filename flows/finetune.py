"""Prefect flow for the finetune stage (`make finetune`): prepare (a cache hit after `make prepare`) ->
LLaMA-Factory QLoRA/LoRA training in the train env -> adapter verification -> manifest, all recorded in an
MLflow stage run with live metrics and the loss curve.

    .venv/bin/python -m flows.finetune [--profile cpu_tiny] [--set finetune.lora_rank=16] [--set finetune.max_steps=50]
"""
from __future__ import annotations

import sys

from workspace import offline

offline.apply()

from prefect import flow, task  # noqa: E402
from rich.console import Console  # noqa: E402

from finetune.prepare import PrepareError, prepare_dataset  # noqa: E402
from finetune.stage import log_finetune, run_finetune, summary_table  # noqa: E402
from finetune.train import FinetuneError  # noqa: E402
from flows._cli import run_flow_cli  # noqa: E402
from workspace.config import LoadedConfig, load_config  # noqa: E402
from workspace.locks import LockBusy, workspace_lock  # noqa: E402
from workspace.tracking import stage_run  # noqa: E402


@task(name="finetune")
def finetune_task(loaded: LoadedConfig, dataset_dir: str, dataset_hash: str, force: bool = False) -> dict:
    from pathlib import Path

    console = Console()
    with stage_run(loaded, "finetune") as run:
        result = run_finetune(loaded, Path(dataset_dir), dataset_hash, mlflow_run_id=run.info.run_id, console=console,
                              force=force)
        log_finetune(result, loaded)
    console.print(summary_table(result))
    return {"adapter_dir": str(result.adapter_dir), "manifest": result.manifest, "run_id": run.info.run_id,
            "skipped": result.skipped}


@flow(name="finetune", log_prints=True)
def finetune_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                  force: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    with workspace_lock("finetune"):
        prepared = prepare_dataset(loaded)
        return finetune_task(loaded, str(prepared.path), prepared.content_hash, force)


if __name__ == "__main__":
    sys.exit(run_flow_cli(__doc__, finetune_flow, (PrepareError, FinetuneError, LockBusy)))
