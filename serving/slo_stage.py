"""The serving-SLO stage under the stage contract (workspace/stage.py), on only when `gate.slo.required`: serve the
candidate with the serving profile's settings, run the brief load step (`vllm bench serve`: `gate.slo.requests`
requests, `gate.slo.concurrency` in flight, prompts of `gate.slo.prompt_tokens`), and return the service plan's
KPIs as rule rows (TTFT p50, requests/min, error rate) that the gate folds into its decision and table. A
candidate that cannot be served or benchmarked gets a failing row naming why, not a crash.
Wired by flows/promote.py and flows/pipeline.py, between the evaluate and gate stages.
"""
from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Optional

from rich.console import Console

from serving.bench import BenchError, StepResult, as_dict, slo_benchmark, slo_rules, workload_texts
from workspace.config.load import LoadedConfig
from workspace.config.pipeline import adapter_mode
from workspace.config.serving import SloConfig
from workspace.endpoint import EndpointError
from workspace.model_ref import ModelNotFound, adapter_rank, base_model
from workspace.stage import Stage, StageData, digest, file_digest
from workspace.tracking import stage_run
from workspace.vllm_server import ServerError

SLO_VERSION = "4"  # 2: the merged weights measured in merged mode; 3: keyed on the workload, not the thresholds;
# 4: the workload files are inputs (the prepared test split, the corpus), the LoRA rank the adapter's own


class SloInputs(StageData):
    adapter_dir: str
    run_key: str
    # the workload, from the stages before (the flow names them): the requests' questions (the prepared test
    # split's user turns) and the passages that pad each prompt to gate.slo.prompt_tokens (the RAG corpus)
    requests_file: Optional[str] = None
    passages_file: Optional[str] = None
    slo: SloConfig  # the objectives and the step's size (gate.slo: the gate decides on the rows)


class SloOutputs(StageData):
    step: str
    metrics: dict[str, float]
    rules: list[dict]  # rows for the gate table: name, metric, value, threshold, passed, detail
    run_id: str
    result: dict = {}  # the measured step (serving.bench.StepResult); {} when it could not be measured


def slo_rows(outputs: SloOutputs, slo) -> list[dict]:
    """The gate's SLO rows for the thresholds configured NOW: the measurement is cached on the workload (what was
    served and how it was loaded), so changing a threshold re-decides without serving the candidate again."""
    if not outputs.result:
        return outputs.rules  # the row that says why it could not be served
    known = {f.name for f in fields(StepResult)}
    res = StepResult(**{k: (math.nan if v is None else v) for k, v in outputs.result.items() if k in known})
    return _json_safe(slo_rules(res, slo))


def _json_safe(rows: list[dict]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]


class SloStage(Stage[SloInputs, SloOutputs]):
    name = "slo"
    Inputs, Outputs = SloInputs, SloOutputs
    error = BenchError
    deterministic = (ModelNotFound, EndpointError)

    def skip_reason(self, loaded: LoadedConfig, inputs: SloInputs) -> Optional[str]:
        return None if inputs.slo.required else "gate.slo.required is false"

    def cache_key(self, loaded: LoadedConfig, inputs: SloInputs) -> str:
        cfg = loaded.config
        return digest(inputs.run_key, cfg.serving.model_dump(mode="json", exclude={"bench", "gateway", "replicas"}),
                      adapter_mode(cfg)[0],
                      inputs.slo.model_dump(mode="json", exclude={"required", "ttft_p50_ms", "min_requests_per_min",
                                                                     "max_error_rate"}),
                      *(file_digest(Path(f)) if f else None for f in (inputs.requests_file, inputs.passages_file)),
                      SLO_VERSION)

    def run(self, loaded: LoadedConfig, inputs: SloInputs, console: Optional[Console] = None) -> SloOutputs:
        import mlflow

        cfg, slo = loaded.config, inputs.slo
        base = base_model(loaded).base
        work = Path(inputs.adapter_dir) / "promotion" / "slo"
        # measure what will be served: the merged weights in merged mode, else the base + the adapter as LoRA
        manifest = Path(inputs.adapter_dir) / "manifest.json"
        merged = (json.loads(manifest.read_text()).get("merged_model") if manifest.exists() else None) \
            if adapter_mode(cfg)[0] == "merged" else None
        model, adapter = (merged, None) if merged else (base, inputs.adapter_dir)
        texts = workload_texts(*(Path(f) if f else None for f in (inputs.requests_file, inputs.passages_file)))
        (console or Console()).print(f"[slo] serving the candidate and sending {slo.requests} requests, {slo.concurrency} "
                                     f"at a time, ~{slo.prompt_tokens} prompt tokens ...")
        with stage_run(loaded, "slo-check") as run:
            result: dict = {}
            try:
                step = slo_benchmark(cfg.serving, slo, model, adapter, adapter_rank(inputs.adapter_dir), texts, work)
                rows, name, metrics = slo_rules(step, slo), step.step, step.metrics()
                result = {k: (None if isinstance(v, float) and v != v else v) for k, v in as_dict(step).items()}
            except (BenchError, ServerError) as exc:
                rows = [{"name": "slo-benchmark", "metric": "serve/*", "value": None, "threshold": None, "passed": False,
                         "detail": f"the candidate could not be served and benchmarked: {str(exc).splitlines()[0][:200]}"}]
                name, metrics = "none", {}
            mlflow.log_metrics({f"serve/{name}/{k}": v for k, v in metrics.items()})
            mlflow.log_dict({"step": name, "rules": rows}, "slo/rules.json")
        return SloOutputs(step=name, metrics=metrics, rules=_json_safe(rows), run_id=run.info.run_id, result=result)


SLO = SloStage()
