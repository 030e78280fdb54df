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
from eval.gate import GateDecision, GateError, decide, write_decision  # noqa: E402
from finetune.prepare import PrepareError, prepare_dataset  # noqa: E402
from finetune.train import FinetuneError, base_model_ref, finished_run  # noqa: E402
from serving.config import FitError, fit_report, model_spec, render_vllm_config, validate_with_vllm, write_vllm_config  # noqa: E402
from serving.registry import PromotionError, build_bundle, champion_info, fetch_champion, promote, rollback  # noqa: E402
from workspace.config import ConfigError, add_cli_args, load_config  # noqa: E402
from workspace.tracking import configure, stage_run  # noqa: E402


class GateFailed(RuntimeError):
    pass


def gate_table(d: GateDecision) -> Table:
    t = Table(title=f"gate: {'PASS' if d.passed else 'FAIL'} (reference: {d.reference})")
    for col in ("rule", "metric", "value", "threshold", "result", "detail"):
        t.add_column(col, overflow="fold")
    for r in d.rules:
        t.add_row(r.name, r.metric, "-" if r.value is None else f"{r.value:.4f}",
                  "-" if r.threshold is None else f"{r.threshold:.4f}",
                  "[green]pass[/]" if r.passed else "[red]FAIL[/]", r.detail)
    return t


@flow(name="promote")
def promote_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                 gate_only: bool = False) -> dict:
    import mlflow

    loaded = load_config(config, profile, overrides or [])
    cfg = loaded.config
    configure(loaded)
    console = Console()
    prepared = prepare_dataset(loaded)
    adapter = finished_run(loaded, prepared.content_hash)
    if adapter is None:
        raise FinetuneError("no finished finetune run for this config and dataset: run `make finetune` first")
    base, _ = base_model_ref(loaded)
    name = cfg.tracking.registered_model
    test = prepared.path / "test.jsonl"
    champ = champion_info(name)
    work = adapter / "promotion"
    import json

    manifest = json.loads((adapter / "manifest.json").read_text())
    if champ and champ["tags"].get("finetune_run_key") == manifest["run_key"]:
        console.print(f"[promote] this candidate ({manifest['run_key']}) is already {name}@champion (v{champ['version']}): "
                      "nothing to do")
        return {"version": champ["version"], "previous": None, "unchanged": True}
    if champ:
        _, champ_dir = fetch_champion(name, work / "champion")
        reference = ModelRef(f"champion-v{champ['version']}", base, str(champ_dir / "adapter"))
    else:
        reference = ModelRef("base", base)
    candidate = ModelRef("candidate", base, str(adapter))
    with stage_run(loaded, "gate") as gate_run:
        cand_res, ref_res = evaluate(loaded, candidate, test_file=test), evaluate(loaded, reference, test_file=test)
        decision = decide(cfg.gate, cand_res.metrics, ref_res.metrics, cand_res.items_path, ref_res.items_path,
                          manifest.get("verification") or {}, reference.name)
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
    console.print(gate_table(decision))
    if not decision.passed:
        raise GateFailed(f"gate failed: {decision.decided_by}. Table: {md}")
    if gate_only:
        return {"gate": decision.to_json()}

    # the serving configuration that goes with the version: base model + this adapter as a LoRA module
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
        "manifest.json": adapter / "manifest.json", "gate.json": js, "gate.md": md, "eval_report.md": report_md,
        "serving.yaml": write_vllm_config(serving, work / "serving.yaml", cfg.serving.api_key_env).read_text(),
        "fit_check.txt": fit.text() + "\n"})
    with stage_run(loaded, "promote") as run:
        result = promote(name, run.info.run_id, bundle, {
            "dataset_hash": manifest["dataset_hash"], "config_hash": loaded.hash, "git_commit": manifest["git_commit"],
            "gate": "pass", "gate_run_id": gate_run.info.run_id, "finetune_run_key": manifest["run_key"],
            "base_model": base})
    console.print(f"[promote] {name} v{result.version} is now @champion"
                  + (f" (v{result.previous} is @previous; `make rollback` restores it)" if result.previous else " (first champion)"))
    return {"version": result.version, "previous": result.previous}


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
            demoted, restored = rollback(loaded.config.tracking.registered_model)
            print(f"[rollback] @champion: v{demoted} -> v{restored} (v{demoted} is now @previous)")
            return 0
        promote_flow(config=args.config, profile=args.profile, overrides=args.overrides, gate_only=args.gate_only)
    except GateFailed as exc:
        print(f"\n[gate] {exc}", file=sys.stderr)
        return 3
    except (ConfigError, PrepareError, FinetuneError, EvalError, GateError, FitError, PromotionError) as exc:
        print(f"\n[error] {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
