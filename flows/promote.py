"""Prefect flow for the gate and promotion (`make gate`, `make promote`, `make rollback`).

The candidate (the finished finetune run of this config) and the reference (the current champion from the MLflow
registry, or the base model when there is none) are evaluated on identical items (cache hits after `make eval`),
the gate rules decide, and a passing candidate is registered with its adapter, manifest, evaluation report,
gate decision and vLLM serving configuration; `champion` moves last.

    .venv/bin/python -m flows.promote [--gate-only] [--rollback]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workspace import offline

offline.apply()

from prefect import flow  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from eval.evaluate import EvalError, ModelRef, compare_report, evaluate  # noqa: E402
from eval.gate import GateDecision, GateError, decide, with_rules, write_decision  # noqa: E402
from finetune.prepare import PrepareError, prepare_dataset  # noqa: E402
from finetune.train import FinetuneError, base_model_ref, finished_run  # noqa: E402
from serving.config import FitError, fit_report, model_spec, render_vllm_config, validate_with_vllm, write_vllm_config  # noqa: E402
from serving.registry import PromotionError, build_bundle, champion_info, fetch_champion, promote, rollback  # noqa: E402
from workspace.config import ConfigError, LoadedConfig, add_cli_args, load_config  # noqa: E402
from workspace.locks import LockBusy, workspace_lock  # noqa: E402
from workspace.paths import resolve  # noqa: E402
from workspace.tracking import configure, stage_run  # noqa: E402


def gate_table(d: GateDecision) -> Table:
    t = Table(title=f"gate: {'PASS' if d.passed else 'FAIL'} (reference: {d.reference})")
    for col in ("rule", "metric", "value", "threshold", "result", "detail"):
        t.add_column(col, overflow="fold")
    for r in d.rules:
        t.add_row(r.name, r.metric, "-" if r.value is None else f"{r.value:.4f}",
                  "-" if r.threshold is None else f"{r.threshold:.4f}",
                  "[green]pass[/]" if r.passed else "[red]FAIL[/]", r.detail)
    return t


class GateFailed(RuntimeError):
    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def run_gate(loaded: LoadedConfig) -> dict:
    """Candidate (this config's finished finetune run) vs reference (the champion, or the base model when there is
    none) on identical items; the rule table is written and logged in a `gate` stage run. JSON-friendly result;
    `unchanged` when the candidate already is the champion (nothing to decide)."""
    import json

    import mlflow

    cfg = loaded.config
    configure(loaded)
    prepared = prepare_dataset(loaded)
    adapter = finished_run(loaded, prepared.content_hash)
    if adapter is None:
        raise FinetuneError("no finished finetune run for this config and dataset: run `make finetune` first")
    base, _ = base_model_ref(loaded)
    name = cfg.tracking.registered_model
    champ = champion_info(name)
    work = adapter / "promotion"
    manifest = json.loads((adapter / "manifest.json").read_text())
    out = {"adapter": str(adapter), "run_key": manifest["run_key"], "registered_model": name}
    if champ and champ["tags"].get("finetune_run_key") == manifest["run_key"]:
        Console().print(f"[gate] this candidate ({manifest['run_key']}) already is {name}@champion "
                        f"(v{champ['version']}): nothing to decide")
        return {**out, "passed": True, "unchanged": True, "version": champ["version"], "reference": "itself",
                "decided_by": "already champion", "rules": []}
    if champ:
        _, champ_dir = fetch_champion(name, work / "champion")
        reference = ModelRef(f"champion-v{champ['version']}", base, str(champ_dir / "adapter"))
    else:
        reference = ModelRef("base", base)
    candidate = ModelRef("candidate", base, str(adapter))
    test = prepared.path / "test.jsonl"
    with stage_run(loaded, "gate") as gate_run:
        cand_res, ref_res = evaluate(loaded, candidate, test_file=test), evaluate(loaded, reference, test_file=test)
        decision = decide(cfg.gate, cand_res.metrics, ref_res.metrics, cand_res.items_path, ref_res.items_path,
                          manifest.get("verification") or {}, reference.name)
        if cfg.gate.slo.required:  # serve the candidate, benchmark it briefly, refuse it when it misses an SLO
            decision, slo_step = _slo(loaded, base, adapter, work / "slo", decision)
            mlflow.log_metrics({f"serve/{slo_step['step']}/{k}": v for k, v in slo_step["metrics"].items()})
        js, md = write_decision(decision, work / "gate")
        report_md, report_png = compare_report([ref_res, cand_res], work / "report")
        mlflow.set_tags({"gate": "pass" if decision.passed else "fail", "gate_reference": reference.name,
                         "adapter_dir": str(adapter), "decided_by": decision.decided_by[:250]})
        mlflow.log_metric("gate/passed", float(decision.passed))
        mlflow.log_table({"rule": [r.name for r in decision.rules], "metric": [r.metric for r in decision.rules],
                          "value": [r.value for r in decision.rules], "threshold": [r.threshold for r in decision.rules],
                          "passed": [r.passed for r in decision.rules], "detail": [r.detail for r in decision.rules]},
                         artifact_file="gate/rules.json")
        for p in (js, md, report_md, report_png):
            if p:
                mlflow.log_artifact(str(p), "gate")
    Console().print(gate_table(decision))
    result = {**out, "passed": decision.passed, "unchanged": False, "reference": reference.name,
              "decided_by": decision.decided_by, "gate_json": str(js), "gate_md": str(md), "report_md": str(report_md),
              "report_png": str(report_png) if report_png else None, "run_id": gate_run.info.run_id,
              "candidate_metrics": cand_res.metrics, "reference_metrics": ref_res.metrics,
              "rules": [{"name": r.name, "metric": r.metric, "value": r.value, "threshold": r.threshold,
                         "passed": r.passed, "detail": r.detail} for r in decision.rules]}
    if not decision.passed:
        raise GateFailed(f"gate failed: {decision.decided_by}. Table: {md}", result)
    return result


def _slo(loaded: LoadedConfig, base: str, adapter: Path, work: Path, decision: GateDecision) -> tuple[GateDecision, dict]:
    from serving.bench import BenchError, slo_benchmark, slo_rules, workload_texts
    from serving.vllm_server import ServerError

    cfg = loaded.config
    slo = cfg.gate.slo
    texts = workload_texts(resolve(cfg.data.test_source.path) if cfg.data.test_source else None, resolve(cfg.rag.corpus))
    Console().print(f"[gate] SLO check: serving the candidate and sending {slo.requests} requests, {slo.concurrency} "
                    f"at a time, ~{slo.prompt_tokens} prompt tokens ...")
    try:
        step = slo_benchmark(cfg.serving, slo, base, str(adapter), cfg.finetune.lora_rank, texts, work)
        rows = slo_rules(step, slo)
        info = {"step": step.step, "metrics": step.metrics()}
    except (BenchError, ServerError) as exc:
        rows = [{"name": "slo-benchmark", "metric": "serve/*", "value": None, "threshold": None, "passed": False,
                 "detail": f"the candidate could not be served and benchmarked: {str(exc).splitlines()[0][:200]}"}]
        info = {"step": "none", "metrics": {}}
    return with_rules(decision, "slo", rows), info


def run_promote(loaded: LoadedConfig, gate: dict) -> dict:
    """Register the candidate that passed `gate` with its adapter, manifest, evaluation report, gate decision and
    vLLM serving configuration (validated by vLLM's own parser, fit-checked); `champion` moves last."""
    import json

    cfg = loaded.config
    name = cfg.tracking.registered_model
    if gate.get("unchanged"):
        return {"version": gate["version"], "previous": None, "unchanged": True, "alias": "champion",
                "registered_model": name}
    if not gate.get("passed"):
        raise GateFailed(f"the candidate did not pass the gate: {gate.get('decided_by')}", gate)
    configure(loaded)
    adapter = Path(gate["adapter"])
    work = adapter / "promotion"
    base, _ = base_model_ref(loaded)
    manifest = json.loads((adapter / "manifest.json").read_text())
    serving = render_vllm_config(cfg.serving, base, lora_modules={cfg.serving.served_model_name: "adapter"},
                                 max_lora_rank=cfg.finetune.lora_rank)
    fit = fit_report(model_spec(base), cfg.serving)
    if not fit.fits:
        raise FitError(f"the serving profile does not fit its hardware:\n{fit.text()}")
    check = work / "serving-check.yaml"
    write_vllm_config({**serving, "lora-modules": [f"{cfg.serving.served_model_name}={adapter}"]}, check,
                      cfg.serving.api_key_env)
    validate_with_vllm(check)
    bundle = build_bundle(work / "bundle", adapter, {
        "manifest.json": adapter / "manifest.json", "gate.json": Path(gate["gate_json"]), "gate.md": Path(gate["gate_md"]),
        "eval_report.md": Path(gate["report_md"]),
        "serving.yaml": write_vllm_config(serving, work / "serving.yaml", cfg.serving.api_key_env).read_text(),
        "fit_check.txt": fit.text() + "\n"})
    with stage_run(loaded, "promote") as run:
        result = promote(name, run.info.run_id, bundle, {
            "dataset_hash": manifest["dataset_hash"], "config_hash": loaded.hash, "git_commit": manifest["git_commit"],
            "gate": "pass", "gate_run_id": gate.get("run_id") or "", "finetune_run_key": manifest["run_key"],
            "base_model": base})
    Console().print(f"[promote] {name} v{result.version} is now @champion"
                    + (f" (v{result.previous} is @previous; `make rollback` restores it)" if result.previous else " (first champion)"))
    return {"version": result.version, "previous": result.previous, "unchanged": False, "alias": "champion",
            "registered_model": name, "run_id": run.info.run_id}


@flow(name="promote")
def promote_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                 gate_only: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    with workspace_lock("promote"):
        gate = run_gate(loaded)
        if gate_only:
            return {"gate": gate}
        return run_promote(loaded, gate)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--gate-only", action="store_true", help="decide, do not promote")
    ap.add_argument("--rollback", action="store_true", help="move @champion back to @previous")
    args = ap.parse_args()
    try:
        if args.rollback:
            loaded = load_config(args.config, args.profile, args.overrides)
            configure(loaded)
            with workspace_lock("rollback"):
                demoted, restored = rollback(loaded.config.tracking.registered_model)
            print(f"[rollback] @champion: v{demoted} -> v{restored} (v{demoted} is now @previous)")
            return 0
        promote_flow(config=args.config, profile=args.profile, overrides=args.overrides, gate_only=args.gate_only)
    except GateFailed as exc:
        print(f"\n[gate] {exc}", file=sys.stderr)
        return 3
    except (ConfigError, PrepareError, FinetuneError, EvalError, GateError, FitError, PromotionError, LockBusy) as exc:
        print(f"\n[error] {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
