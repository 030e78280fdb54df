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
from workspace.locks import LockBusy, workspace_lock  # noqa: E402
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


def rag_answer_quality(loaded: LoadedConfig, model: ModelRef) -> dict:
    """Retrieve with the rag stage's index, answer with `model`, score citations (and the judge's metrics)."""
    import json

    import mlflow

    from eval.rag_quality import score_rag_answers
    from rag.answer import build_prompt
    from rag.index import DenseEmbedder, SparseEncoder, build_index, open_client, search
    from workspace.paths import resolve

    cfg = loaded.config
    client = open_client(cfg.rag)
    try:
        embedder, sparse = DenseEmbedder(cfg.rag.embedder), SparseEncoder()
        name = build_index(client, cfg.rag, embedder, sparse).collection
        qa = [json.loads(l) for l in resolve(cfg.rag.qa_set).read_text(encoding="utf-8").splitlines() if l.strip()]
        items = []
        for q in qa[: cfg.rag.eval_questions]:
            hits = search(client, name, q["question"], cfg.rag.mode, cfg.rag.top_k, embedder, sparse)
            items.append({"id": q["id"], "question": q["question"], "gold_answer": q.get("answer", ""),
                          "gold_docs": q["doc_ids"], "retrieved": [h["doc_id"] for h in hits],
                          "contexts": [h["text"] for h in hits],
                          "messages": [{"role": "user", "content": build_prompt(q["question"], hits)}]})
    finally:
        client.close()
    with stage_run(loaded, f"eval-rag-{model.name}"):
        metrics, rows, judge_note = score_rag_answers(cfg.eval, model, items)
        mlflow.log_metrics(metrics)
        mlflow.set_tag("judge", judge_note[:250])
        mlflow.log_table({"id": [r["id"] for r in rows], "question": [r["prompt"] for r in rows],
                          "answer": [r["output"] for r in rows], "scores": [json.dumps(r["scores"]) for r in rows]},
                         artifact_file="eval/rag_answers.json")
    return metrics


def run_evaluate(loaded: LoadedConfig) -> dict:
    """Base and candidate on identical items, the comparison report, RAG answer quality; JSON-friendly result."""
    import mlflow

    prepared = prepare_dataset(loaded)
    adapter = finished_run(loaded, prepared.content_hash)
    if adapter is None:
        raise FinetuneError("no finished finetune run for this config and dataset: run `make finetune` first")
    base, _ = base_model_ref(loaded)
    models = [ModelRef("base", base), ModelRef("candidate", base, str(adapter))]
    rag_metrics: dict = {}
    with stage_run(loaded, "evaluate") as run:
        results = [evaluate_task(loaded, m, str(prepared.path / "test.jsonl")) for m in models]
        md, png = compare_report(results, results[-1].out_dir / "report")
        mlflow.log_artifact(str(md), "report")
        if png:
            mlflow.log_artifact(str(png), "report")
        for r in results:
            mlflow.log_metrics({f"{r.model.name}/{k}": v for k, v in r.metrics.items()})
        if loaded.config.rag.enabled:
            rag_metrics = rag_answer_quality(loaded, models[-1])
            mlflow.log_metrics({f"candidate/{k}": v for k, v in rag_metrics.items()})
    Console().print(summary(results))
    print(f"[evaluate] report: {md}")
    return {"report": str(md), "report_png": str(png) if png else None, "run_id": run.info.run_id,
            "metrics": {r.model.name: r.metrics for r in results}, "rag_answer_metrics": rag_metrics,
            "cached": {r.model.name: r.cached for r in results}, "out_dirs": {r.model.name: str(r.out_dir) for r in results}}


@flow(name="evaluate")  # not log_prints: lm-eval prints task internals
def evaluate_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                  force: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    with workspace_lock("evaluate"):
        return run_evaluate(loaded)


if __name__ == "__main__":
    sys.exit(run_flow_cli(__doc__, evaluate_flow, (PrepareError, FinetuneError, EvalError, LockBusy)))
