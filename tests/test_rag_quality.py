"""RAG answer quality in the evaluation stage: the rule-based citation metrics score what they claim, and a real
model's answers are scored end to end (the judge metrics are skipped with a note when no judge is configured)."""
from __future__ import annotations

from deepeval.test_case import LLMTestCase

from workspace.model_ref import ModelRef
from eval.rag_quality import AnswerHasGold, CitationsValid, CitesGold, CitesSomething, cited, score_rag_answers
from workspace.config import load_config
from workspace.paths import resolve


def tc(answer):
    return LLMTestCase(input="q", actual_output=answer, expected_output="부산",
                       metadata={"retrieved": ["doc-001", "doc-002"], "gold_docs": ["doc-002"]})


def test_citation_rules():
    good, wrong, none = tc("부산에 있습니다 [doc-002]"), tc("서울 [doc-009]"), tc("모릅니다")
    assert [m().measure(good) for m in (CitesSomething, CitationsValid, CitesGold, AnswerHasGold)] == [1, 1, 1, 1]
    assert [m().measure(wrong) for m in (CitesSomething, CitationsValid, CitesGold, AnswerHasGold)] == [1, 0, 0, 0]
    assert [m().measure(none) for m in (CitesSomething, CitationsValid, CitesGold, AnswerHasGold)] == [0, 0, 0, 0]


def test_real_answers_are_scored():
    cfg = load_config(overrides=["eval.max_new_tokens=24"]).config.eval
    items = [{"id": "q-1", "question": "가온 지사는 어디에 있나요?", "gold_answer": "부산", "gold_docs": ["doc-003"],
              "retrieved": ["doc-003"], "contexts": ["가온 지사는 부산에 있는 사무소이다."],
              "messages": [{"role": "user", "content": "[doc-003] 가온 지사는 부산에 있는 사무소이다.\n질문: 가온 지사는 어디에 있나요?"}]}]
    metrics, rows, note = score_rag_answers(cfg, ModelRef("base", str(resolve(load_config().config.base_model.path))), items)
    assert set(metrics) == {f"eval/rag/qa/{m}" for m in ("cites_something", "citations_valid", "cites_gold", "answer_has_gold")}
    assert len(rows) == 1 and isinstance(rows[0]["output"], str) and rows[0]["output"].strip()
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # each aggregate is exactly the item's rule score on the real answer
    assert metrics["eval/rag/qa/cites_something"] == float(bool(cited(rows[0]["output"])))
    assert "no judge configured" in note
