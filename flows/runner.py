"""How flows run a stage: one Prefect task per stage (workspace/stage.py contract), cached under the stage's OWN
key with its result persisted as JSON (.prefect/storage), recomputed when the cached outputs are gone
(`outputs_present`), retried only on what may pass a second time, with a line when it starts and ends.

Used by every flow module (flows/pipeline.py, flows/prepare.py, ...); nothing here knows what a stage does.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from prefect import task
from rich.console import Console

from eval.gate import GateFailed
from eval.evaluate_stage import EVALUATE
from eval.gate_stage import GATE
from finetune.finetune_stage import FINETUNE
from finetune.prepare_stage import PREPARE
from rag.rag_stage import RAG
from serving.promote_stage import PROMOTE
from serving.serve_check_stage import SERVE_CHECK
from serving.slo_stage import SLO
from workspace.config import ConfigError, LoadedConfig
from workspace.endpoint import EndpointError
from workspace.locks import LockBusy
from workspace.model_ref import ModelNotFound
from workspace.processes import ProcessError
from workspace.stage import Stage, StageData

STAGES: tuple[Stage, ...] = (PREPARE, FINETUNE, RAG, EVALUATE, SLO, GATE, PROMOTE, SERVE_CHECK)
# Errors with a message a person can act on: printed without a traceback, exit code 2 (GateFailed: 3).
KNOWN_ERRORS: tuple[type[BaseException], ...] = tuple(dict.fromkeys(
    (ConfigError, LockBusy, EndpointError, ProcessError, ModelNotFound, GateFailed)
    + tuple(s.error for s in STAGES) + tuple(e for s in STAGES for e in s.deterministic)))
NEVER_RETRIED: tuple[type[BaseException], ...] = tuple(dict.fromkeys(
    (ConfigError, LockBusy, GateFailed) + tuple(e for s in STAGES for e in s.deterministic)))
RETRIES = {"rag": 2, "promote": 1, "serve": 1}  # they talk to servers (Qdrant, MLflow, vLLM) that can blip


class _NamedFailureFilter(logging.Filter):
    """A named failure (KNOWN_ERRORS) is told once, in one line, by the command line; Prefect's task and flow loggers
    keep their failure line but drop its traceback (an unexpected error keeps its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KNOWN_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_NamedFailureFilter())


def _transient(task, task_run, state) -> bool:
    """Retry only what may pass a second time (a server blip), never a named, deterministic refusal."""
    return not isinstance(state.result(raise_on_failure=False), NEVER_RETRIED)


@task(persist_result=True, result_serializer="json")
def stage_task(stage: Stage, loaded: LoadedConfig, inputs: dict) -> dict:
    """The Prefect task of every stage: the stage's own `run`, its outputs as JSON."""
    return stage.run(loaded, stage.Inputs(**inputs)).model_dump(mode="json")


@dataclass
class StageRecord:
    name: str
    status: str = "pending"  # ran | cached | failed | skipped
    seconds: float = 0.0
    key: str = ""
    result: dict = field(default_factory=dict)
    error: str = ""


class StageRunner:
    """Runs stages in the order a flow calls them and keeps a record of each for the summary."""

    def __init__(self, loaded: LoadedConfig, console: Optional[Console] = None, force: bool = False):
        self.loaded, self.force = loaded, force
        self.console = console or Console()
        self.records: dict[str, StageRecord] = {}

    def run(self, stage: Stage, inputs: Optional[StageData] = None) -> Optional[Any]:
        """The stage's Outputs (cached or computed), or None when its configuration turns it off."""
        inputs = inputs if inputs is not None else stage.Inputs()
        why = stage.skip_reason(self.loaded, inputs)
        if why:
            self.skip(stage.name, why)
            return None
        key = stage.cache_key(self.loaded, inputs)
        rec = self.records.setdefault(stage.name, StageRecord(stage.name, key=key))
        self.console.print(f"[bold]▶ {stage.name}[/] [dim](key {key})[/]")
        t0 = time.monotonic()
        state = self._call(stage, inputs, key, refresh=self.force)
        if state.name == "Cached" and not state.is_failed():
            cached = stage.Outputs(**state.result())
            if not stage.outputs_present(self.loaded, cached):
                self.console.print(f"[dim]  {stage.name}: the cached result's outputs are gone; recomputing[/]")
                state = self._call(stage, inputs, key, refresh=True)
        rec.seconds = round(time.monotonic() - t0, 1)
        if state.is_failed() or state.is_crashed() or state.is_cancelled():
            rec.status = "failed"
            try:
                state.result(raise_on_failure=True)
            except BaseException as exc:  # noqa: BLE001 - re-raised after recording
                rec.error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                if isinstance(exc, GateFailed):
                    rec.result = exc.result
                self.console.print(f"[red]✗ {stage.name} failed after {rec.seconds} s:[/] {rec.error}")
                raise
            raise RuntimeError(f"stage {stage.name} ended in state {state.name}")
        rec.result = state.result()
        rec.status = "cached" if state.name == "Cached" else "ran"
        label = "[cyan]cached[/]" if rec.status == "cached" else "[green]done[/]"
        self.console.print(f"[bold]■ {stage.name}[/] {label} in {rec.seconds} s")
        return stage.Outputs(**rec.result)

    def _call(self, stage: Stage, inputs: StageData, key: str, refresh: bool):
        retries = RETRIES.get(stage.name, 0)
        options: dict = dict(name=stage.name, cache_key_fn=lambda *_: f"{stage.name}-{key}", refresh_cache=refresh,
                             task_run_name=f"{stage.name}-{key[:8]}", retries=retries)
        if retries:
            options.update(retry_condition_fn=_transient, retry_delay_seconds=5)
        return stage_task.with_options(**options)(stage, self.loaded, inputs.model_dump(mode="json"), return_state=True)

    def skip(self, name: str, why: str) -> None:
        self.records[name] = StageRecord(name, status="skipped", error=why)
        self.console.print(f"[bold]- {name}[/] [yellow]skipped[/]: {why}")
