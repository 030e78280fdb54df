"""The promotion stage under the stage contract (workspace/stage.py): a candidate that passed the gate is
registered with its adapter, manifest, evaluation report, gate decision and vLLM serving configuration (rendered
from the serving profile, fit-checked against its hardware, parsed by vLLM's own argument parser), as one new
version of `tracking.registered_model`; `champion` moves last (serving/registry.py: all or nothing). A candidate
that already is the champion registers nothing. A cached promotion is valid while the champion alias still points
at its version (`make rollback` makes the next pipeline run promote again).
Wired by flows/promote.py and flows/pipeline.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from rich.console import Console

from serving.config import FitError, fit_report, model_spec, render_vllm_config, validate_with_vllm, write_vllm_config
from serving.card import CARD, model_card
from serving.registry import CANDIDATE, PromotionError, alias_version, build_bundle, champion_info, promote, version_info
from workspace.config.load import LoadedConfig
from workspace.config.pipeline import adapter_mode
from workspace.model_ref import ModelNotFound, adapter_rank, base_model
from workspace.stage import Stage, StageData, digest
from workspace.tracking import configure, stage_run

PROMOTE_VERSION = "4"  # 3: serving.adapter_mode (merged weights in the bundle); 4: model card, dataset stats


def floors_only_over_full(gate_mode: str, champ: Optional[dict]) -> bool:
    """A floors-only pass would replace a champion that passed the statistical gate (refused: floors promote noise)."""
    return gate_mode == "floors_only" and bool(champ) and champ["tags"].get("gate_mode", "full") != "floors_only"


class PromoteInputs(StageData):
    passed: bool
    adapter: str
    run_key: str
    gate_json: str
    gate_md: str
    report_md: str
    gate_run_id: str = ""
    reference_version: Optional[str] = None  # what the gate compared with (recorded on the version)
    # champion: `make promote` / `make pipeline`; candidate: `make loop` registers it for the canary and the arena
    alias: Literal["champion", "candidate"] = "champion"


class PromoteOutputs(StageData):
    registered_model: str
    version: str
    previous: Optional[str]
    unchanged: bool
    alias: str = "champion"
    run_id: str = ""


class PromoteStage(Stage[PromoteInputs, PromoteOutputs]):
    name = "promote"
    Inputs, Outputs = PromoteInputs, PromoteOutputs
    error = PromotionError
    deterministic = (FitError, ModelNotFound)

    def cache_key(self, loaded: LoadedConfig, inputs: PromoteInputs) -> str:
        cfg = loaded.config
        return digest(inputs.run_key, inputs.passed, inputs.reference_version, cfg.tracking.registered_model,
                      cfg.serving.model_dump(mode="json", exclude={"bench", "gateway", "replicas"}), adapter_mode(cfg)[0],
                      PROMOTE_VERSION, *([inputs.alias] if inputs.alias != "champion" else []))
        # (the adapter's rank, which the rendered vLLM config covers, is part of what run_key identifies)

    def outputs_present(self, loaded: LoadedConfig, outputs: PromoteOutputs) -> bool:
        configure(loaded)
        champ = champion_info(outputs.registered_model)
        if outputs.alias == CANDIDATE and alias_version(outputs.registered_model, CANDIDATE) == outputs.version:
            return True
        return bool(champ and champ["version"] == outputs.version)

    def run(self, loaded: LoadedConfig, inputs: PromoteInputs, console: Optional[Console] = None) -> PromoteOutputs:
        console = console or Console()
        cfg = loaded.config
        name = cfg.tracking.registered_model
        if not inputs.passed:
            raise PromotionError("the candidate did not pass the gate: nothing to promote")
        configure(loaded)
        champ = champion_info(name)
        gate_mode = json.loads(Path(inputs.gate_json).read_text(encoding="utf-8")).get("mode", "full")
        if inputs.alias != CANDIDATE and floors_only_over_full(gate_mode, champ):
            raise PromotionError(
                f"this candidate passed a floors-only gate (gate.floors_only), and {name}@champion (v{champ['version']}) "
                "passed the statistical gate: a floors-only candidate never replaces it. Nothing was registered. "
                "Register it under its own name (tracking.registered_model, as the cpu_smoke profile does) or gate "
                "it with an improvement rule on gate.target_metric")
        mode, reason = adapter_mode(cfg)
        if champ and champ["tags"].get("finetune_run_key") == inputs.run_key and \
                champ["tags"].get("adapter_mode", "lora") == mode:
            console.print(f"[promote] this candidate ({inputs.run_key}) already is {name}@champion (v{champ['version']})")
            return PromoteOutputs(registered_model=name, version=champ["version"], previous=None, unchanged=True)
        if inputs.alias == CANDIDATE:
            cand = alias_version(name, CANDIDATE)
            tags = version_info(name, cand)["tags"] if cand else {}
            if tags.get("finetune_run_key") == inputs.run_key and tags.get("adapter_mode", "lora") == mode:
                console.print(f"[promote] this run ({inputs.run_key}) already is {name}@candidate (v{cand})")
                return PromoteOutputs(registered_model=name, version=cand, previous=None, unchanged=True,
                                      alias=CANDIDATE)
        adapter = Path(inputs.adapter)
        work = adapter / "promotion"
        base = base_model(loaded).base
        manifest = json.loads((adapter / "manifest.json").read_text())
        merged = manifest.get("merged_model") if mode == "merged" else None
        console.print(f"[promote] serving mode: {mode} ({reason})")
        if mode == "merged" and not (merged and (Path(merged) / "config.json").exists()):
            raise PromotionError("serving.adapter_mode resolves to merged, but the finetune run has no merged model: run "
                                 "`make finetune` (it merges a finished run without retraining) or set "
                                 "serving.adapter_mode=lora")
        if merged:  # the fast path: vLLM serves the merged weights as a plain model (relative to the version folder)
            serving = render_vllm_config(cfg.serving, "merged")
            check_conf = {**serving, "model": str(merged)}
        else:
            serving = render_vllm_config(cfg.serving, base, lora_modules={cfg.serving.served_model_name: "adapter"},
                                         max_lora_rank=adapter_rank(adapter))
            check_conf = {**serving, "lora-modules": [f"{cfg.serving.served_model_name}={adapter}"]}
        fit = fit_report(model_spec(base), cfg.serving)
        if not fit.fits:
            raise FitError(f"the serving profile does not fit its hardware:\n{fit.text()}")
        work.mkdir(parents=True, exist_ok=True)
        check = work / "serving-check.yaml"
        write_vllm_config(check_conf, check, cfg.serving.api_key_env)
        validate_with_vllm(check)
        stats = Path(manifest["dataset_dir"]) / "stats.json" if manifest.get("dataset_dir") else None
        bundle = build_bundle(work / "bundle", adapter, merged=Path(merged) if merged else None, files={
            **({"dataset_stats.json": stats} if stats and stats.exists() else {}),
            "manifest.json": adapter / "manifest.json", "gate.json": Path(inputs.gate_json),
            "gate.md": Path(inputs.gate_md), "eval_report.md": Path(inputs.report_md),
            "serving.yaml": write_vllm_config(serving, work / "serving.yaml", cfg.serving.api_key_env).read_text(),
            "fit_check.txt": fit.text() + "\n"})
        limits = [f"Served as {mode}: {reason}."] + (["Promoted on floors only (gate.floors_only)."]
                                                     if gate_mode == "floors_only" else [])
        (bundle / CARD).write_text(model_card(bundle, registered_model=name, alias=inputs.alias, limits=tuple(limits)),
                                   encoding="utf-8")

        def describe(version: str) -> str:  # the description: the card without the full report (MLflow's 5000 chars)
            return model_card(bundle, registered_model=name, version=version, alias=inputs.alias, limits=tuple(limits),
                              report=False)

        with stage_run(loaded, "promote") as run:
            result = promote(name, run.info.run_id, bundle, champion=inputs.alias != CANDIDATE, describe=describe,
                             tags={
                "dataset_hash": manifest["dataset_hash"], "config_hash": loaded.hash, "git_commit": manifest["git_commit"],
                "gate": "pass", "gate_run_id": inputs.gate_run_id, "finetune_run_key": inputs.run_key,
                "gate_reference_version": inputs.reference_version or "", "base_model": base, "adapter_mode": mode,
                "finetune_stage": manifest.get("stage", "sft"), "gate_mode": gate_mode})
        if inputs.alias == CANDIDATE:
            console.print(f"[promote] {name} v{result.version} is registered as @candidate (the champion stays "
                          f"v{result.previous or '-'}): the gateway's canary and arena serve it; `make promote "
                          f"VERSION={result.version}` makes it the champion. Card: `make card VERSION={result.version}`")
        else:
            console.print(f"[promote] {name} v{result.version} is now @champion"
                          + (f" (v{result.previous} is @previous; `make rollback` restores it)" if result.previous else " (first champion)"))
        return PromoteOutputs(registered_model=name, version=result.version, previous=result.previous, unchanged=False,
                              run_id=run.info.run_id, alias=inputs.alias)


PROMOTE = PromoteStage()
