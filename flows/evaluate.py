"""Prefect flow for the evaluation stage (`make eval`): the base model and the finetuned candidate on identical
items (eval/evaluate_stage.py), after the rag stage when RAG is enabled (its checked contexts feed the RAG answer
quality). Needs a finished finetune run (`make finetune`).

    .venv/bin/python -m flows.evaluate [--set eval.backend=vllm] [--set eval.custom_limit=50]
"""
from __future__ import annotations

if __name__ == "__main__":  # a command: re-run under workspace/guard.py first (nothing it starts outlives it)
    from workspace.processes import guard_this_process

    guard_this_process()

import sys

from workspace import offline

offline.apply()

from prefect import flow  # noqa: E402

from finetune.finetune_stage import FINETUNE  # noqa: E402
from finetune.prepare_stage import PREPARE  # noqa: E402
from flows._cli import run_flow_cli  # noqa: E402
from flows.champion import resolve_init_adapter  # noqa: E402
from flows.pipeline import evaluate_candidate  # noqa: E402
from flows.runner import StageRunner  # noqa: E402
from workspace.config import load_config  # noqa: E402
from workspace.locks import workspace_lock  # noqa: E402


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


if __name__ == "__main__":
    sys.exit(run_flow_cli(__doc__, evaluate_flow))
