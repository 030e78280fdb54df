"""The whole job as one Prefect flow (`make pipeline`), in one MLflow parent run with a child run per stage:

    prepare -> finetune -> rag -> evaluate -> slo -> gate -> promote -> serve check

    .venv/bin/python -m llmops pipeline [--profile cpu_tiny] [--set finetune.lora_rank=16] [--force] [--no-serve-check]

This file only wires: the order, what each stage hands the next, the parent run and the summary (the
segments it shares with the per-stage flows are in segments.py). Every stage is
a workspace/stage.py contract in its own package; each is a Prefect task cached under the stage's own key
(flows/runner.py), with its result persisted under .prefect/storage: an unchanged rerun reports every stage as
cached and costs seconds; a changed config reruns only the stages whose key it changes (`finetune.lora_rank`
reruns finetune onwards, `rag.top_k` the rag stage and what reads its contexts). A cached result whose outputs are
gone (an adapter deleted, the champion rolled back, the Qdrant folder removed) is recomputed. A failed stage
leaves the earlier ones cached, so a rerun resumes from it. rag runs before evaluate: the evaluation answers
RAG questions from the index the rag stage built and checked against its hit@5 floor. The pipeline holds the
workspace lock: a second run started meanwhile waits for it (or refuses with --lock-timeout), naming the holder.

Exit codes: 0 done, 2 an error (named), 3 the gate refused the candidate.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from prefect import flow

from eval.gate import GateFailed
from finetune.finetune_stage import FINETUNE, FinetuneInputs
from finetune.prepare_stage import PREPARE, PrepareInputs
from flows.champion import resolve_init_adapter
from flows.runner import KNOWN_ERRORS, StageRunner
from flows.segments import (console_for_logs, evaluate_candidate, first_prompt, gate_candidate, promote_candidate,
                            test_file)
from flows.summary import run_summarised, run_url
from serving.serve_check_stage import SERVE_CHECK, ServeCheckInputs
from workspace import offline
from workspace.config import LoadedConfig, add_cli_args, load_config
from workspace.device import require_cuda
from workspace.locks import workspace_lock
from workspace.tracking import configure, pipeline_run


# ------------------------------------------------------------------------------ the stages, in order
def run_stages(loaded: LoadedConfig, runner: StageRunner, serve_check: bool) -> None:
    prepared = runner.run(PREPARE, PrepareInputs())
    tuned = runner.run(FINETUNE, FinetuneInputs(dataset_dir=prepared.path, dataset_hash=prepared.content_hash))
    evaluate_candidate(runner, prepared, tuned)
    gate = gate_candidate(runner, loaded, prepared, tuned)
    promote_candidate(runner, gate)
    if serve_check:
        runner.run(SERVE_CHECK, ServeCheckInputs(prompt=first_prompt(test_file(prepared))))
    else:
        runner.skip("serve", "--no-serve-check")


# ------------------------------------------------------------------------------------------------ the flow
@flow(name="pipeline")
def pipeline_flow(config: Optional[str] = None, profile: Optional[str] = None, overrides: Optional[list[str]] = None,
                  force: bool = False, serve_check: bool = True, lock_timeout: Optional[float] = None) -> dict:
    loaded = resolve_init_adapter(load_config(config, profile, overrides or []))
    offline.apply(loaded.config.hub.enabled)
    # before anything starts: a GPU setting on a machine without CUDA is refused here, naming the setting
    require_cuda(loaded, ("finetune", "eval", "serving"), what="the pipeline")
    console = console_for_logs()
    runner = StageRunner(loaded, console, force)
    t0 = time.monotonic()
    with workspace_lock("pipeline", lock_timeout):
        mlflow = configure(loaded)
        with pipeline_run(loaded) as parent:
            console.print(f"[bold]pipeline[/] profile {loaded.profile}, config {loaded.hash[:12]}, MLflow run "
                          f"{run_url(mlflow, parent.info.run_id)}")
            summary = run_summarised(loaded, runner, mlflow, parent.info.run_id, t0, console,
                                     lambda: run_stages(loaded, runner, serve_check))
    return summary["json"]


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--force", action="store_true", help="recompute every stage (the stages' own caches still apply)")
    ap.add_argument("--no-serve-check", action="store_true", help="skip the last stage (serving the champion once)")
    ap.add_argument("--lock-timeout", type=float, default=None,
                    help="seconds to wait for another run holding the workspace (default: wait; 0: refuse at once)")
    args = ap.parse_args(argv)
    try:
        pipeline_flow(config=args.config, profile=args.profile, overrides=list(args.overrides), force=args.force,
                      serve_check=not args.no_serve_check, lock_timeout=args.lock_timeout)
    except GateFailed as exc:
        print(f"\n[gate] {exc}", file=sys.stderr)
        return 3
    except KNOWN_ERRORS as exc:
        print(f"\n[error] {exc}", file=sys.stderr)
        return 2
    return 0

