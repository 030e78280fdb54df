"""The evaluation stage under the stage contract (workspace/stage.py): the base model and the finetuned candidate
on identical items (KoBEST through lm-eval, the custom DeepEval metrics on the held-out split, the LLM judge when
configured), one MLflow child run per model, the comparison report (Markdown + PNG), and, when RAG is enabled,
answer quality of the candidate on the questions and passages the rag stage retrieved (its qa_contexts.jsonl).

The cache key combines each model's evaluation cache key (eval/evaluate.py) and the RAG contexts' digest.
Wired by flows/evaluate.py and flows/pipeline.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from eval.evaluate import SUITES, EvalResult, cache_key, compare_report, evaluate, log_eval
from eval.judge import JudgeUnavailable, check_judge
from eval.kobest import EvalError
from eval.rag_quality import score_rag_answers
from workspace.config.load import LoadedConfig
from workspace.endpoint import EndpointError
from workspace.model_ref import ModelNotFound, ModelRef, base_model
from workspace.stage import Stage, StageData, digest, file_digest
from workspace.tracking import stage_run


class EvaluateInputs(StageData):
    test_file: str  # the prepared held-out split
    adapter_dir: str  # the candidate's adapter
    rag_contexts: Optional[str] = None  # the rag stage's qa_contexts.jsonl (None: no RAG answer quality)
    # from the flow (flows/segments.as_served): the served decoding (serving.decoding.non_default(): what is
    # evaluated is what is served), the folder the evaluations are written under and found again
    # (<data.output_dir>/evals), and the serving settings
    sampling: dict
    out_root: str
    engine: dict  # the serving settings the vllm backend starts vLLM with (serving.*, the gateway's aside)


class EvaluateOutputs(StageData):
    report: str
    report_png: Optional[str]
    run_id: str
    metrics: dict[str, dict[str, float]]  # model name -> metrics
    rag_answer_metrics: dict[str, float]
    cached: dict[str, bool]
    out_dirs: dict[str, str]


def summary_table(results: list[EvalResult]) -> Table:
    t = Table(title="evaluation")
    t.add_column("metric")
    for r in results:
        t.add_column(r.model.name + (" (cached)" if r.cached else ""), justify="right")
    for k in sorted({k for r in results for k in r.metrics}):
        t.add_row(k.removeprefix("eval/"), *[f"{r.metrics.get(k, float('nan')):.3f}" for r in results])
    return t


def rag_answer_quality(loaded: LoadedConfig, model: ModelRef, contexts: Path, sampling: dict) -> dict[str, float]:
    """Answer the rag stage's questions (its retrieved passages, ready prompts) with `model`; score citations
    (and the judge's metrics when a judge is configured), in an `eval-rag-<model>` run."""
    import mlflow

    items = [json.loads(line) for line in contexts.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise EvalError(f"{contexts} has no questions: the rag stage wrote no RAG contexts")
    with stage_run(loaded, f"eval-rag-{model.name}"):
        metrics, rows, judge_note = score_rag_answers(loaded.config.eval, model, items, sampling=sampling)
        mlflow.log_metrics(metrics)
        mlflow.set_tag("judge", judge_note[:250])
        mlflow.log_table({"id": [r["id"] for r in rows], "question": [r["prompt"] for r in rows],
                          "answer": [r["output"] for r in rows], "scores": [json.dumps(r["scores"]) for r in rows]},
                         artifact_file="eval/rag_answers.json")
    return metrics


class EvaluateStage(Stage[EvaluateInputs, EvaluateOutputs]):
    name = "evaluate"
    Inputs, Outputs = EvaluateInputs, EvaluateOutputs
    error = EvalError
    deterministic = (EvalError, JudgeUnavailable, ModelNotFound, EndpointError)

    def models(self, loaded: LoadedConfig, inputs: EvaluateInputs) -> list[ModelRef]:
        base = base_model(loaded)
        return [base, base.with_adapter("candidate", inputs.adapter_dir)]

    def cache_key(self, loaded: LoadedConfig, inputs: EvaluateInputs) -> str:
        test = Path(inputs.test_file)
        keys = {m.name: cache_key(loaded, m, SUITES, test, loaded.config.eval.backend, inputs.sampling)
                for m in self.models(loaded, inputs)}
        rag = file_digest(Path(inputs.rag_contexts)) if inputs.rag_contexts else None
        return digest(keys, rag)

    def outputs_present(self, loaded: LoadedConfig, outputs: EvaluateOutputs) -> bool:
        return all((Path(d) / "metrics.json").exists() for d in outputs.out_dirs.values())

    def run(self, loaded: LoadedConfig, inputs: EvaluateInputs, console: Optional[Console] = None) -> EvaluateOutputs:
        import mlflow

        models = self.models(loaded, inputs)
        # a configured judge is asked first: one that is down or refuses the key stops the stage before minutes of
        # generation, not after (eval/evaluate.py keeps partial results for a judge that fails later, mid-run)
        try:
            check_judge(loaded.config.eval.judge)
        except JudgeUnavailable as exc:
            raise EvalError(f"{exc}. Nothing was evaluated: start the judge, fix eval.judge (base_url, model, "
                            f"api_key_env), or set eval.judge to null to skip the LLM-as-judge metric") from exc
        rag_metrics: dict = {}
        with stage_run(loaded, "evaluate") as run:
            results = []
            for m in models:
                with stage_run(loaded, f"eval-{m.name}"):
                    r = evaluate(loaded, m, test_file=Path(inputs.test_file), sampling=inputs.sampling,
                                 out_root=Path(inputs.out_root), engine=inputs.engine)
                    mlflow.set_tag("cache", "hit" if r.cached else "miss")
                    log_eval(r)
                results.append(r)
            md, png = compare_report(results, results[-1].out_dir / "report")
            mlflow.log_artifact(str(md), "report")
            if png:
                mlflow.log_artifact(str(png), "report")
            for r in results:
                mlflow.log_metrics({f"{r.model.name}/{k}": v for k, v in r.metrics.items()})
            if inputs.rag_contexts:
                rag_metrics = rag_answer_quality(loaded, models[-1], Path(inputs.rag_contexts), inputs.sampling)
                mlflow.log_metrics({f"candidate/{k}": v for k, v in rag_metrics.items()})
        console = console or Console()
        console.print(summary_table(results))
        console.print(f"[evaluate] report: {md}")
        return EvaluateOutputs(report=str(md), report_png=str(png) if png else None, run_id=run.info.run_id,
                               metrics={r.model.name: r.metrics for r in results}, rag_answer_metrics=rag_metrics,
                               cached={r.model.name: r.cached for r in results},
                               out_dirs={r.model.name: str(r.out_dir) for r in results})


EVALUATE = EvaluateStage()
