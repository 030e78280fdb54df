"""Prefect flow for the evaluation stage (`make eval`): the base model and the finetuned candidate on identical
items (eval/evaluate_stage.py), after the rag stage when RAG is enabled (its checked contexts feed the RAG answer
quality). Needs a finished finetune run (`make finetune`).

    .venv/bin/python -m llmops evaluate [--set eval.backend=vllm] [--set eval.custom_limit=50]
"""
from __future__ import annotations

from prefect import flow

from finetune.finetune_stage import FINETUNE
from finetune.prepare_stage import PREPARE
from flows._cli import run_flow_cli
from flows.champion import resolve_init_adapter
from flows.segments import evaluate_candidate
from flows.runner import StageRunner
from workspace.config import load_config
from workspace.locks import workspace_lock


@flow(name="evaluate")  # not log_prints: lm-eval prints task internals
def evaluate_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                  force: bool = False) -> dict:
    loaded = resolve_init_adapter(load_config(config, profile, overrides or []))
    runner = StageRunner(loaded, force=force)
    with workspace_lock("evaluate"):
        prepared = runner.run(PREPARE)
        tuned = FINETUNE.finished(loaded, prepared.content_hash)
        _, evaluated = evaluate_candidate(runner, prepared, tuned)
        return evaluated.model_dump()


def main(argv: list[str] | None = None) -> int:
    return run_flow_cli(__doc__, evaluate_flow, argv=argv)
