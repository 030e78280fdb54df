"""The loop as one Prefect flow (`make loop`, deployment `loop/weekly` in prefect.yaml, which can be scheduled):

    harvest -> prepare -> finetune -> rag -> evaluate -> slo -> gate -> register as @candidate

What people said in the gateway (ratings, corrections, arena votes) since the champion was registered (or
`loop.since`, or SINCE=) is harvested to data/raw/feedback/<date>/; the run trains with `loop.stage` (dpo by default:
LLaMA-Factory's DPO on the harvested pairs, starting from the champion's adapter, which is also DPO's reference)
on the prepared data plus the harvest (`data.feedback.enabled` and `finetune.stage` are set for this run and printed);
the candidate is evaluated and gated against the champion like any other, with a `preference` rule (if configured)
pending until the candidate has arena votes; and a pass registers it as `candidate`, never as the champion. The
gateway's canary (`serving.gateway.canary`, alias candidate) and arena then serve it. Promotion stays a decision:
`make promote VERSION=n` gates it again with its arena votes and prints what the canary saw.

    .venv/bin/python -m llmops loop [--since 2026-11-01] [--profile cpu_smoke] [--set loop.stage=sft]
"""
from __future__ import annotations

import time
from typing import Optional

from prefect import flow

from finetune.finetune_stage import FINETUNE, FinetuneInputs
from finetune.prepare_stage import PREPARE, PrepareInputs
from flows._cli import run_flow_cli
from flows.champion import resolve_init_adapter
from flows.harvest import harvest_table
from flows.segments import console_for_logs, evaluate_candidate, gate_candidate, promote_candidate
from flows.runner import StageRunner
from flows.summary import run_summarised, run_url
from serving.gateway import harvest_feedback, parse_since, since_of_version
from serving.registry import champion_info
from workspace.config import LoadedConfig, load_config
from workspace.locks import workspace_lock
from workspace.paths import resolve
from workspace.tracking import configure, pipeline_run


def loop_settings(loaded: LoadedConfig, has_champion: bool) -> dict[str, object]:
    """What the loop sets for its own run, on top of the user's config (typed values, laid over it by
    LoadedConfig.with_values)."""
    lp = loaded.config.loop
    out: dict[str, object] = {"finetune.stage": lp.stage, "data.feedback.enabled": True}
    if lp.learning_rate is not None:
        out["finetune.learning_rate"] = lp.learning_rate
    if lp.max_steps is not None:
        out["finetune.max_steps"] = lp.max_steps
    if lp.pref_ftx is not None and lp.stage == "dpo":
        out["finetune.pref_ftx"] = lp.pref_ftx
    if lp.from_champion and has_champion:
        out["finetune.init_adapter"] = "champion"
    return out


def _shown(values: dict[str, object]) -> str:
    """key=value as a person would write it after --set (true, 1, 5e-05)."""
    def one(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)
    return " ".join(f"{k}={one(v)}" for k, v in values.items())


@flow(name="loop")
def loop_flow(config: Optional[str] = None, profile: Optional[str] = None, overrides: Optional[list[str]] = None,
              since: Optional[str] = None, force: bool = False) -> dict:
    user = load_config(config, profile, overrides or [])
    console = console_for_logs()
    mlflow = configure(user)
    name = user.config.tracking.registered_model
    t0 = time.monotonic()
    with workspace_lock("loop"):
        champ = champion_info(name)
        start = parse_since(since or user.config.loop.since)
        if start is None and champ is not None:
            start = since_of_version(user, champ["version"])  # what people said about the current champion
        got = harvest_feedback(user, out_root=resolve(user.config.data.feedback.dir), since=start)
        console.print(harvest_table(got))
        n = len(got.sft) + len(got.pairs)
        if n < user.config.loop.min_items:
            console.print(f"[loop] {n} harvested rows and pairs < loop.min_items {user.config.loop.min_items}: nothing "
                          "to learn from yet; collect ratings, corrections and arena votes in the gateway")
            return {"stopped": "too little feedback", "harvest": got.manifest}
        extra = loop_settings(user, champ is not None)
        console.print(f"[loop] this run's settings on top of the config: {_shown(extra)}")
        loaded = resolve_init_adapter(user.with_values("the loop's settings (loop.*)", extra))
        runner = StageRunner(loaded, console, force)
        with pipeline_run(loaded, name=f"loop-{loaded.hash[:8]}") as parent:
            console.print(f"[bold]loop[/] profile {loaded.profile}, config {loaded.hash[:12]}, MLflow run "
                          f"{run_url(mlflow, parent.info.run_id)}")
            mlflow.log_dict(got.manifest, "harvest/manifest.json")
            done: dict = {}

            def stages() -> None:
                prepared = runner.run(PREPARE, PrepareInputs())
                tuned = runner.run(FINETUNE, FinetuneInputs(dataset_dir=prepared.path,
                                                            dataset_hash=prepared.content_hash))
                evaluate_candidate(runner, prepared, tuned)
                gate = gate_candidate(runner, loaded, prepared, tuned, purpose="candidate")
                done["registered"] = promote_candidate(runner, gate, alias="candidate")

            summary = run_summarised(loaded, runner, mlflow, parent.info.run_id, t0, console, stages)
            registered = done["registered"]
    canary = loaded.config.serving.gateway.canary
    share = (f"the gateway's canary sends {canary.percent:g}% of champion requests to it" if canary and
             canary.alias == "candidate" and canary.percent > 0 else
             "no canary share is configured (serving.gateway.canary: {alias: candidate, percent: 10}); the arena "
             "serves it")
    console.print(f"[loop] v{registered.version} is @candidate: {share}. When its arena and usage numbers convince "
                  f"you: make promote VERSION={registered.version}")
    return {"harvest": got.manifest, "registered": registered.model_dump(), "summary": summary["json"]}


def _options(ap) -> None:
    ap.add_argument("--since", default=None, help="harvest from this ISO date (default: since the champion was registered)")


def main(argv: list[str] | None = None) -> int:
    return run_flow_cli(__doc__, loop_flow, _options, argv=argv)
