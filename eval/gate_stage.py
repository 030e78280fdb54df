"""The gate stage under the stage contract (workspace/stage.py): the candidate against its reference on identical
items (cache hits after the evaluate stage), the rules of `gate.rules` (eval/gate.py), plus any rows measured
elsewhere (the serving SLOs, from serving/slo_stage.py), written as JSON and Markdown with the comparison report,
logged in a `gate` stage run. A refusal raises GateFailed (exit code 3), carrying the decision.

The reference is handed in by the flow: the registry's current champion, or, when the candidate already is the
champion, the version it was compared with when it was promoted (serving.registry.gate_reference), or the base
model. Its files are fetched here by their registry URI (`models:/<name>/<version>`), never by alias, so the
version decided on is the version whose files were evaluated. Wired by flows/promote.py and flows/pipeline.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from eval.evaluate import compare_report, evaluate, scoring_hash
from eval.gate import GateDecision, GateError, GateFailed, decide, with_rules, write_decision
from eval.judge import JudgeUnavailable
from eval.kobest import EvalError
from workspace.config.load import LoadedConfig
from workspace.model_ref import ModelNotFound, base_model
from workspace.stage import Stage, StageData, digest
from workspace.tracking import stage_run

GATE_VERSION = "4"  # 3: BCa bootstrap, min_items, min_effect, non-inferiority with Holm; 4: the gate mode


class Reference(StageData):
    version: str
    run_key: str
    artifact_uri: str  # models:/<name>/<version>

    @property
    def name(self) -> str:
        return f"champion-v{self.version}"


class GateInputs(StageData):
    adapter_dir: str
    run_key: str
    verification: dict
    test_file: str
    reference: Optional[Reference] = None  # None: the base model
    extra_rules: list[dict] = []  # rows measured by another stage (the SLO check), folded into the decision
    # the preference rule's arena tally {version, reference_version, wins, losses, ties}, read by the flow from the
    # gateway's database; purpose: champion (promotion) or candidate (registration for the canary, `make loop`)
    arena: Optional[dict] = None
    purpose: str = "champion"
    # the version @champion names now, for what a refusal says is still served (not part of the decision: the
    # reference is; when the candidate is the champion's own run, the reference is what it was compared with then)
    champion_version: Optional[str] = None
    # from the flow: the served decoding, where the evaluations are and the serving settings (as in EvaluateInputs:
    # the gate reuses those evaluations)
    sampling: dict
    out_root: str
    engine: dict


class GateOutputs(StageData):
    passed: bool
    adapter: str
    run_key: str
    reference: str
    reference_version: Optional[str]
    decided_by: str
    gate_json: str
    gate_md: str
    report_md: str
    report_png: Optional[str]
    run_id: str
    candidate_metrics: dict[str, float]
    reference_metrics: dict[str, float]
    rules: list[dict]
    mode: str = "full"  # the gate's mode (GateConfig.mode): 'floors_only' is recorded on the promotion


def gate_table(d: GateDecision) -> Table:
    t = Table(title=f"gate: {'PASS' if d.passed else 'FAIL'} (reference: {d.reference})")
    for col in ("rule", "metric", "n", "estimate", "interval", "method", "value", "threshold", "result"):
        t.add_column(col, overflow="fold")
    for r in d.rules:
        t.add_row(r.name, r.metric, "-" if r.n is None else str(r.n), "-" if r.estimate is None else f"{r.estimate:+.4f}",
                  r.interval(), r.method or "-", "-" if r.value is None else f"{r.value:.4f}",
                  "-" if r.threshold is None else f"{r.threshold:.4f}",
                  "[green]pass[/]" if r.passed else "[red]FAIL[/]")
    t.caption = f"decided by: {d.decided_by}" + (" | FLOORS ONLY: no statistical rule on the target metric"
                                                 if d.mode == "floors_only" else "")
    return t


class GateStage(Stage[GateInputs, GateOutputs]):
    name = "gate"
    Inputs, Outputs = GateInputs, GateOutputs
    error = GateError
    deterministic = (GateError, GateFailed, EvalError, JudgeUnavailable, ModelNotFound)

    def cache_key(self, loaded: LoadedConfig, inputs: GateInputs) -> str:
        cfg = loaded.config
        # rag_min_hit_at_5 is the rag stage's floor; the SLO settings reach the gate as measured rows
        gate_cfg = cfg.gate.model_dump(mode="json", exclude={"rag_min_hit_at_5", "slo"})
        return digest(inputs.run_key, inputs.reference and inputs.reference.model_dump(), gate_cfg,
                      cfg.eval.model_dump(mode="json"), inputs.extra_rules, inputs.verification, GATE_VERSION,
                      scoring_hash(),  # a change to how a score is computed re-scores, so it decides again
                      *([inputs.sampling] if inputs.sampling else []),
                      *([inputs.arena, inputs.purpose] if inputs.arena is not None or inputs.purpose != "champion" else []))

    def outputs_present(self, loaded: LoadedConfig, outputs: GateOutputs) -> bool:
        return Path(outputs.gate_json).exists()

    def run(self, loaded: LoadedConfig, inputs: GateInputs, console: Optional[Console] = None) -> GateOutputs:
        import mlflow

        cfg = loaded.config
        adapter = Path(inputs.adapter_dir)
        work = adapter / "promotion"
        base = base_model(loaded)
        candidate = base.with_adapter("candidate", str(adapter))
        if inputs.reference:
            ref_dir = _fetch(inputs.reference, work / f"reference-v{inputs.reference.version}")
            reference = base.with_adapter(inputs.reference.name, str(ref_dir / "adapter"))
        else:
            reference = base
        test = Path(inputs.test_file)
        decided = work / f"gate-{self.cache_key(loaded, inputs)}"  # one folder per question asked: a cached decision
        with stage_run(loaded, "gate") as gate_run:                 # never points at files another one overwrote
            where = {"test_file": test, "sampling": inputs.sampling, "out_root": Path(inputs.out_root),
                     "engine": inputs.engine}
            cand_res, ref_res = evaluate(loaded, candidate, **where), evaluate(loaded, reference, **where)
            decision = decide(cfg.gate, cand_res.metrics, ref_res.metrics, cand_res.items_path, ref_res.items_path,
                              inputs.verification, reference.name, inputs.arena, inputs.purpose)
            if inputs.extra_rules:
                decision = with_rules(decision, "slo", inputs.extra_rules)
            js, md = write_decision(decision, decided)
            report_md, report_png = compare_report([ref_res, cand_res], decided / "report")
            mlflow.set_tags({"gate": "pass" if decision.passed else "fail", "gate_reference": reference.name,
                             "gate_mode": decision.mode,
                             "adapter_dir": str(adapter), "decided_by": decision.decided_by[:250]})
            mlflow.log_metric("gate/passed", float(decision.passed))
            rows = [r.as_row() for r in decision.rules]
            mlflow.log_table({col: [row[col] for row in rows] for col in rows[0]} if rows else {"rule": []},
                             artifact_file="gate/rules.json")
            for p in (js, md, report_md, report_png):
                if p:
                    mlflow.log_artifact(str(p), "gate")
        (console or Console()).print(gate_table(decision))
        out = GateOutputs(passed=decision.passed, adapter=str(adapter), run_key=inputs.run_key, reference=reference.name,
                          reference_version=inputs.reference.version if inputs.reference else None,
                          decided_by=decision.decided_by, gate_json=str(js), gate_md=str(md), report_md=str(report_md),
                          report_png=str(report_png) if report_png else None, run_id=gate_run.info.run_id,
                          candidate_metrics=cand_res.metrics, reference_metrics=ref_res.metrics,
                          rules=[r.as_row() for r in decision.rules], mode=decision.mode)
        if not decision.passed:
            raise GateFailed(refusal_text(decision, md, report_md, cand_res.items_path, inputs, loaded),
                             out.model_dump(mode="json"))
        return out


def refusal_text(decision: GateDecision, gate_md: Path, report_md: Path, items: Path, inputs: GateInputs,
                 loaded: LoadedConfig) -> str:
    """What a refused candidate's user reads: the rule, its value, the files, what is still served, and what to do."""
    failed = [r for r in decision.rules if not r.passed]
    first = failed[0]
    value = "-" if first.value is None else f"{first.value:.4f}"
    threshold = "-" if first.threshold is None else f"{first.threshold:.4f}"
    name = loaded.config.tracking.registered_model
    champion = inputs.champion_version or (inputs.reference.version if inputs.reference else None)
    served = (f"{name}@champion is still v{champion} and keeps serving" if champion
              else f"{name} has no champion yet, so `make serve` has nothing to serve")
    what = "registered as candidate" if inputs.purpose == "candidate" else "promoted"
    seed = loaded.config.project.seed
    lines = [f"gate failed: nothing was {what}; {served}.",
             f"  rule '{first.name}' ({first.kind}) on {first.metric}: value {value} vs threshold {threshold}: "
             f"{first.detail}"]
    lines += [f"  also failed: '{r.name}' on {r.metric}" for r in failed[1:4]]
    lines += [f"  gate table: {gate_md}", f"  evaluation report: {report_md}", "  next:"]
    metric = first.metric if first.metric.startswith("eval/custom/") else "eval/custom/screens/xml_valid"
    lines.append(f"    - read the worst items:  .venv/bin/python -m llmops inspect-items {items} --metric {metric}")
    lines.append(f"    - retrain with another seed or setting:  make pipeline SET=\"project.seed={seed + 1}\"  "
                 "(or SET=\"finetune.max_steps=... finetune.learning_rate=...\"; make calibrate-gate measures a recipe)")
    lines.append("    - the gate alone, against the current champion (or the base), after any change:  make gate")
    return "\n".join(lines)


def _fetch(ref: Reference, dest: Path) -> Path:
    import mlflow

    if (dest / "adapter").is_dir():
        return dest
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.artifact_uri, dst_path=str(dest)))
    except mlflow.exceptions.MlflowException as exc:
        raise GateError(f"the reference {ref.artifact_uri} cannot be fetched: {exc}") from exc


GATE = GateStage()
