"""Prefect flow for the evaluation stage (`make eval`): the base model and the finetuned candidate, on
identical items: KoBEST (lm-evaluation-harness, all five tasks) and the custom DeepEval metrics on the held-out
test split (+ the LLM judge when configured). One MLflow child run per model (they compare side by side in the
MLflow UI), the report (Markdown + comparison PNG) on the stage run.

    .venv/bin/python -m flows.evaluate [--set eval.backend=vllm] [--set eval.custom_limit=50]
"""
from __future__ import annotations

import sys
from pathlib import Path

from workspace import offline

offline.apply()

from prefect import flow, task  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from eval.evaluate import EvalError, EvalResult, ModelRef, compare_report, evaluate, log_eval  # noqa: E402
from finetune.prepare import PrepareError, prepare_dataset  # noqa: E402
from finetune.train import FinetuneError, base_model_ref, finished_run  # noqa: E402
from flows._cli import run_flow_cli  # noqa: E402
from workspace.config import LoadedConfig, load_config  # noqa: E402
from workspace.tracking import stage_run  # noqa: E402


@task(name="evaluate-model")
def evaluate_task(loaded: LoadedConfig, model: ModelRef, test_file: str) -> EvalResult:
    import mlflow

    with stage_run(loaded, f"eval-{model.name}"):
        result = evaluate(loaded, model, test_file=Path(test_file))
        mlflow.set_tag("cache", "hit" if result.cached else "miss")
        log_eval(result)
    return result


def summary(results: list[EvalResult]) -> Table:
    t = Table(title="evaluation")
    t.add_column("metric")
    for r in results:
        t.add_column(r.model.name + (" (cached)" if r.cached else ""), justify="right")
    for k in sorted({k for r in results for k in r.metrics}):
        t.add_row(k.removeprefix("eval/"), *[f"{r.metrics.get(k, float('nan')):.3f}" for r in results])
    return t


@flow(name="evaluate")  # not log_prints: lm-eval prints task internals
def evaluate_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                  force: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    prepared = prepare_dataset(loaded)
    adapter = finished_run(loaded, prepared.content_hash)
    if adapter is None:
        raise FinetuneError("no finished finetune run for this config and dataset: run `make finetune` first")
    base, _ = base_model_ref(loaded)
    models = [ModelRef("base", base), ModelRef("candidate", base, str(adapter))]
    import mlflow

    with stage_run(loaded, "evaluate"):
        results = [evaluate_task(loaded, m, str(prepared.path / "test.jsonl")) for m in models]
        md, png = compare_report(results, results[-1].out_dir / "report")
        mlflow.log_artifact(str(md), "report")
        if png:
            mlflow.log_artifact(str(png), "report")
        for r in results:
            mlflow.log_metrics({f"{r.model.name}/{k}": v for k, v in r.metrics.items()})
    Console().print(summary(results))
    print(f"[evaluate] report: {md}")
    return {"report": str(md), "metrics": {r.model.name: r.metrics for r in results}}


if __name__ == "__main__":
    sys.exit(run_flow_cli(__doc__, evaluate_flow, (PrepareError, FinetuneError, EvalError)))
