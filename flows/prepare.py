"""Prefect flow for the dataset preparation stage (`make prepare`).

    .venv/bin/python -m flows.prepare [--profile cpu_tiny] [--set data.val_ratio=0.2] [--force]

Validates, cleans, masks and splits data/raw sources into data/processed/<content-hash>/ (finetune.prepare),
and records the stage as an MLflow run with the dataset as inputs. An unchanged rerun is a cache hit.
"""
from __future__ import annotations

import sys

from workspace import offline

offline.apply()

from prefect import flow, task  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from finetune.prepare import PrepareError, log_to_mlflow, prepare_dataset  # noqa: E402
from flows._cli import run_flow_cli  # noqa: E402
from workspace.config import LoadedConfig, load_config  # noqa: E402
from workspace.locks import LockBusy, workspace_lock  # noqa: E402
from workspace.tracking import stage_run  # noqa: E402


def print_summary(result) -> None:
    s = result.stats
    table = Table(title=f"prepare: {result.path}" + ("  (cache hit: inputs unchanged)" if result.skipped else ""))
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("rows read", str(s["rows_read"]))
    table.add_row("rejected (quarantine.jsonl)", f"{s['rows_rejected']} ({s['reject_ratio']:.1%})")
    for reason, n in s["rejected_by_reason"].items():
        table.add_row(f"  {reason}", str(n))
    table.add_row("duplicates exact / normalised", f"{s['duplicates_exact']} / {s['duplicates_normalized']}")
    table.add_row("PII masked", ", ".join(f"{k} {v}" for k, v in s["pii_masked"].items() if v) or "none")
    for name, n in s["splits"].items():
        tok = s["tokens"].get(name) or {}
        table.add_row(f"{name} rows", f"{n}  (tokens p50 {tok.get('p50', '-')}, p99 {tok.get('p99', '-')}, max {tok.get('max', '-')})")
    table.add_row("seconds", str(s["seconds"]))
    Console().print(table)


@task(name="prepare-dataset")
def prepare_task(loaded: LoadedConfig, force: bool = False):
    with stage_run(loaded, "prepare") as run:
        result = prepare_dataset(loaded, force=force)
        import mlflow

        mlflow.set_tag("cache", "hit" if result.skipped else "miss")
        log_to_mlflow(result)
    print_summary(result)
    return {"path": str(result.path), "content_hash": result.content_hash, "run_id": run.info.run_id,
            "skipped": result.skipped, "splits": {k: str(v) for k, v in result.splits.items()},
            "rows": dict(result.stats["splits"]), "rows_read": result.stats["rows_read"],
            "rows_rejected": result.stats["rows_rejected"]}


@flow(name="prepare", log_prints=True)
def prepare_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                 force: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    with workspace_lock("prepare"):
        return prepare_task(loaded, force)


if __name__ == "__main__":
    sys.exit(run_flow_cli(__doc__, prepare_flow, (PrepareError, LockBusy)))
