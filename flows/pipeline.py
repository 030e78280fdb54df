"""The whole job as one Prefect flow (`make pipeline`), in one MLflow parent run with a child run per stage:

    prepare -> finetune -> rag -> evaluate -> slo -> gate -> promote -> serve check

    .venv/bin/python -m llmops pipeline [--profile cpu_tiny] [--set finetune.lora_rank=16] [--force] [--no-serve-check]

This file only wires: the order, what each stage hands the next, the parent run and the summary. Every stage is
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
import json
import sys
import time
from pathlib import Path
from typing import Optional

from prefect import flow
from rich.console import Console

from eval.evaluate_stage import EVALUATE, EvaluateInputs, EvaluateOutputs
from eval.gate import GateFailed
from eval.gate_stage import GATE, GateInputs, GateOutputs, Reference
from finetune.finetune_stage import FINETUNE, FinetuneInputs, FinetuneOutputs
from finetune.prepare_stage import PREPARE, PrepareInputs, PrepareOutputs
from flows.champion import resolve_init_adapter
from flows.runner import KNOWN_ERRORS, StageRunner
from flows.summary import run_summarised, run_url
from rag.rag_stage import RAG, RagOutputs
from serving.promote_stage import PROMOTE, PromoteInputs, PromoteOutputs
from serving.registry import champion_info, gate_reference, version_of_run
from serving.serve_check_stage import SERVE_CHECK, ServeCheckInputs
from serving.slo_stage import SLO, SloInputs, slo_rows
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


# ------------------------------------------------------------- segments shared with the per-stage flows
def test_file(prepared: PrepareOutputs) -> str:
    return str(Path(prepared.path) / "test.jsonl")


def evaluate_candidate(runner: StageRunner, prepared: PrepareOutputs,
                       tuned: FinetuneOutputs) -> tuple[Optional[RagOutputs], EvaluateOutputs]:
    """rag (when enabled) then evaluate, which scores RAG answers on the contexts the rag stage checked."""
    indexed = runner.run(RAG)
    evaluated = runner.run(EVALUATE, EvaluateInputs(test_file=test_file(prepared), adapter_dir=tuned.adapter_dir,
                                                    rag_contexts=indexed.qa_contexts if indexed else None))
    return indexed, evaluated


def arena_tally(loaded: LoadedConfig, version: Optional[str], reference_version: Optional[str]) -> Optional[dict]:
    """The gateway's arena votes between two registry versions, for the gate's preference rule (None when no such
    rule is configured). A candidate not registered yet has no votes."""
    if not any(r.kind == "preference" for r in loaded.config.gate.rules):
        return None
    tally = {"wins": 0, "losses": 0, "ties": 0}
    if version and reference_version:
        from serving.gateway import GatewayDb, database_url

        tally = GatewayDb(database_url(loaded)).arena_tally(version, reference_version)
    return {"version": version, "reference_version": reference_version, **tally}


def gate_candidate(runner: StageRunner, loaded: LoadedConfig, prepared: PrepareOutputs,
                   tuned: FinetuneOutputs, purpose: str = "champion") -> GateOutputs:
    """The serving SLOs (when required), then the gate against the reference the registry names. `purpose`:
    champion (promotion) or candidate (the loop's registration)."""
    slo = runner.run(SLO, SloInputs(adapter_dir=tuned.adapter_dir, run_key=tuned.run_key))
    configure(loaded)
    name = loaded.config.tracking.registered_model
    ref = gate_reference(name, tuned.run_key)
    champ = champion_info(name)
    arena = arena_tally(loaded, version_of_run(name, tuned.run_key), ref["version"] if ref else None)
    return runner.run(GATE, GateInputs(adapter_dir=tuned.adapter_dir, run_key=tuned.run_key,
                                       verification=tuned.manifest.get("verification") or {},
                                       test_file=test_file(prepared), reference=Reference(**ref) if ref else None,
                                       extra_rules=slo_rows(slo, loaded.config.gate.slo) if slo else [], arena=arena,
                                       purpose=purpose, champion_version=champ["version"] if champ else None))


def promote_candidate(runner: StageRunner, gate: GateOutputs, alias: str = "champion") -> PromoteOutputs:
    return runner.run(PROMOTE, PromoteInputs(passed=gate.passed, adapter=gate.adapter, run_key=gate.run_key,
                                             gate_json=gate.gate_json, gate_md=gate.gate_md, report_md=gate.report_md,
                                             gate_run_id=gate.run_id, reference_version=gate.reference_version,
                                             alias=alias))


def first_prompt(test: str) -> str:
    for line in Path(test).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            return next(m["content"] for m in row["messages"] if m["role"] == "user")
    return "회원 목록 화면을 생성해주세요. 필드: 이름, 이메일"


# ------------------------------------------------------------------------------------------------ the flow
def console_for_logs() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=160)  # logs and CI: wide enough for the run links


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

