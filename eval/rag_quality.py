"""Answer quality of retrieval-augmented answers, in the evaluation stage when RAG is enabled.

Rule-based DeepEval metrics that need no judge: `cites_something` (the answer cites at least one [doc-id]),
`citations_valid` (every cited id was among the retrieved passages), `cites_gold` (a document that answers the
question is cited), `answer_has_gold` (the expected answer string appears). With a configured judge, DeepEval's
FaithfulnessMetric and ContextualRelevancyMetric run too. The flow hands over questions with their retrieved
passages and ready prompts (qa_contexts.jsonl, written by the rag stage: retrieval is its job). Called by
eval/evaluate_stage.py.
"""
from __future__ import annotations

import re
from typing import Optional

from deepeval.test_case import LLMTestCase

from eval.generate import generate_hf, generate_openai
from eval.judge import check_judge
from eval.metrics import _RuleMetric
from workspace.config.evaluation import EvalConfig
from workspace.device import resolve_dtype
from workspace.endpoint import Endpoint
from workspace.model_ref import ModelRef

CITATION = re.compile(r"\[([^\[\]]+)\]")


def cited(text: str) -> set[str]:
    return set(CITATION.findall(text or ""))


class CitesSomething(_RuleMetric):
    name = "cites_something"

    def score_case(self, tc):
        return (1.0, "cites") if cited(tc.actual_output) else (0.0, "no [doc-id] citation")


class CitationsValid(_RuleMetric):
    name = "citations_valid"

    def score_case(self, tc):
        c = cited(tc.actual_output)
        retrieved = set(tc.metadata["retrieved"])
        return (1.0, "all cited ids were retrieved") if c and c <= retrieved else (0.0, f"cited {sorted(c)} vs retrieved")


class CitesGold(_RuleMetric):
    name = "cites_gold"

    def score_case(self, tc):
        return (1.0, "cites an answering document") if cited(tc.actual_output) & set(tc.metadata["gold_docs"]) else (0.0, "no answering document cited")


class AnswerHasGold(_RuleMetric):
    name = "answer_has_gold"

    def score_case(self, tc):
        return (1.0, "contains the answer") if tc.expected_output and tc.expected_output in (tc.actual_output or "") else (0.0, "answer not found")


def score_rag_answers(cfg: EvalConfig, model: ModelRef, items: list[dict], *, endpoint: Optional[Endpoint] = None,
                      sampling: Optional[dict] = None) -> tuple[dict[str, float], list[dict], str]:
    """items: {id, messages, question, gold_answer, gold_docs, retrieved (doc ids), contexts (texts)}.
    `sampling`: serving.decoding's penalties (answers decode as the served model does)."""
    if endpoint:
        gens = generate_openai(endpoint, items, cfg.max_new_tokens, sampling=sampling)
    else:
        gens = generate_hf(model.base, model.adapter, items, cfg.max_new_tokens, device=cfg.device,
                           dtype=resolve_dtype(cfg.device, cfg.dtype), sampling=sampling)
    metrics = [CitesSomething(), CitationsValid(), CitesGold(), AnswerHasGold()]
    judge, judge_note = check_judge(cfg.judge)  # a configured judge that is down raises JudgeUnavailable
    judged = []
    if judge:
        from deepeval.metrics import ContextualRelevancyMetric, FaithfulnessMetric

        judged = [FaithfulnessMetric(model=judge, async_mode=False, include_reason=False),
                  ContextualRelevancyMetric(model=judge, async_mode=False, include_reason=False)]
    sums: dict[str, float] = {}
    rows = []
    for item, out in zip(items, gens.outputs):
        tc = LLMTestCase(input=item["question"], actual_output=out, expected_output=item["gold_answer"],
                         retrieval_context=item["contexts"],
                         metadata={"retrieved": item["retrieved"], "gold_docs": item["gold_docs"]})
        scores = {}
        for m in metrics:
            scores[m.name] = m.measure(tc)
        for m in judged:
            m.measure(tc)
            scores[type(m).__name__.removesuffix("Metric").lower()] = float(m.score or 0.0)
        for k, v in scores.items():
            sums[k] = sums.get(k, 0.0) + v
        rows.append({"suite": "rag", "task": "qa", "id": item["id"], "prompt": item["question"], "output": out,
                     "reference": item["gold_answer"], "scores": scores})
    agg = {f"eval/rag/qa/{k}": v / len(rows) for k, v in sums.items()}
    return agg, rows, judge_note
