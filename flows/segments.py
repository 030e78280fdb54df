"""The segments the flows share: pipeline.py runs them in order; evaluate.py, promote.py, loop.py and
leaderboard.py run some of them. Each wires stages (workspace/stage.py contracts) through the runner: no business
logic and no cache key here."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rich.console import Console

from eval.evaluate_stage import EVALUATE, EvaluateInputs, EvaluateOutputs
from eval.gate_stage import GATE, GateInputs, GateOutputs, Reference
from finetune.finetune_stage import FinetuneOutputs
from finetune.prepare_stage import PrepareOutputs
from flows.runner import StageRunner
from rag.rag_stage import RAG, RagInputs, RagOutputs
from serving.promote_stage import PROMOTE, PromoteInputs, PromoteOutputs
from serving.registry import champion_info, gate_reference, version_of_run
from serving.slo_stage import SLO, SloInputs, slo_rows
from workspace.config import LoadedConfig
from workspace.paths import resolve
from workspace.tracking import configure


def test_file(prepared: PrepareOutputs) -> str:
    return str(Path(prepared.path) / "test.jsonl")


def as_served(loaded: LoadedConfig) -> dict:
    """What every evaluation gets from outside the eval section (EvaluateInputs, GateInputs, `evaluate()`'s
    keywords): the served decoding, so that what is evaluated is what is served; the folder evaluations are
    written under and found again; the serving settings the vllm backend starts vLLM with (the gateway's, the
    load benchmark's and the replicas' aside: a vLLM launch does not read them)."""
    return {"sampling": loaded.config.serving.decoding.non_default(),
            "out_root": str(resolve(loaded.config.data.output_dir) / "evals"),
            "engine": loaded.config.serving.model_dump(mode="json", exclude={"gateway", "bench", "replicas"})}


def rag_inputs(loaded: LoadedConfig) -> RagInputs:
    """What the rag stage gets from outside its section: the gate's floor for the index and where to write."""
    return RagInputs(min_hit_at_5=loaded.config.gate.rag_min_hit_at_5,
                     out_root=str(resolve(loaded.config.data.output_dir) / "rag"))


def evaluate_candidate(runner: StageRunner, prepared: PrepareOutputs,
                       tuned: FinetuneOutputs) -> tuple[Optional[RagOutputs], EvaluateOutputs]:
    """rag (when enabled) then evaluate, which scores RAG answers on the contexts the rag stage checked."""
    indexed = runner.run(RAG, rag_inputs(runner.loaded))
    evaluated = runner.run(EVALUATE, EvaluateInputs(test_file=test_file(prepared), adapter_dir=tuned.adapter_dir,
                                                    rag_contexts=indexed.qa_contexts if indexed else None,
                                                    **as_served(runner.loaded)))
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
    slo = runner.run(SLO, SloInputs(adapter_dir=tuned.adapter_dir, run_key=tuned.run_key,
                                    requests_file=test_file(prepared),
                                    passages_file=str(resolve(loaded.config.rag.corpus)), slo=loaded.config.gate.slo))
    configure(loaded)
    name = loaded.config.tracking.registered_model
    ref = gate_reference(name, tuned.run_key)
    champ = champion_info(name)
    arena = arena_tally(loaded, version_of_run(name, tuned.run_key), ref["version"] if ref else None)
    return runner.run(GATE, GateInputs(adapter_dir=tuned.adapter_dir, run_key=tuned.run_key,
                                       verification=tuned.manifest.get("verification") or {},
                                       test_file=test_file(prepared), reference=Reference(**ref) if ref else None,
                                       extra_rules=slo_rows(slo, loaded.config.gate.slo) if slo else [], arena=arena,
                                       purpose=purpose, champion_version=champ["version"] if champ else None,
                                       **as_served(loaded)))


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


def console_for_logs() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=160)  # logs and CI: wide enough for the run links
