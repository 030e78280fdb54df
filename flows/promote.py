"""Prefect flow for the gate and promotion (`make gate`, `make promote`, `make rollback`).

The candidate (the finished finetune run of this config) and its reference (the registry's champion, or the
base model when there is none) are evaluated on identical items (cache hits after `make eval`), the serving SLOs
are measured when `gate.slo.required`, the gate decides (eval/gate_stage.py), and a passing candidate is
registered with its serving configuration, `champion` moving last (serving/promote_stage.py).

    .venv/bin/python -m flows.promote [--gate-only] [--rollback]
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
from flows.pipeline import evaluate_candidate, gate_candidate, promote_candidate  # noqa: E402
from flows.runner import StageRunner  # noqa: E402
from serving.registry import rollback  # noqa: E402
from workspace.config import load_config  # noqa: E402
from workspace.locks import workspace_lock  # noqa: E402
from workspace.tracking import configure  # noqa: E402


@flow(name="promote")
def promote_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                 gate_only: bool = False, force: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    runner = StageRunner(loaded, force=force)
    with workspace_lock("promote"):
        prepared = runner.run(PREPARE)
        tuned = FINETUNE.finished(loaded, prepared.content_hash)
        evaluate_candidate(runner, prepared, tuned)
        gate = gate_candidate(runner, loaded, prepared, tuned)
        if gate_only:
            return {"gate": gate.model_dump()}
        return promote_candidate(runner, gate).model_dump()


def rollback_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                  **_) -> None:
    loaded = load_config(config, profile, overrides or [])
    configure(loaded)
    with workspace_lock("rollback"):
        demoted, restored = rollback(loaded.config.tracking.registered_model)
    print(f"[rollback] @champion: v{demoted} -> v{restored} (v{demoted} is now @previous)")


def _options(ap) -> None:
    ap.add_argument("--gate-only", action="store_true", help="decide, do not promote")
    ap.add_argument("--rollback", action="store_true", help="move @champion back to @previous")


def main(argv: list[str] | None = None) -> int:
    def dispatch(rollback: bool = False, **kw):
        return rollback_flow(**kw) if rollback else promote_flow(**kw)

    return run_flow_cli(__doc__, dispatch, _options, argv)


if __name__ == "__main__":
    sys.exit(main())
