"""A judge that answers with something other than the JSON DeepEval asked for is a clear, handled error naming the
judge, the finish reason and what to change, whatever a model writes: here a real HTTP server (the replica stand-in
of tests/upstream_double.py, which always answers plain words) plays a judge that ignores the schema. Through the
evaluation stage the error keeps the generations computed so far."""
from __future__ import annotations

import pytest

from eval.judge import JudgeUnavailable, check_judge, judge_metric, score_with_judge
from upstream_double import Upstream
from workspace.config import JudgeConfig


def test_a_malformed_judge_answer_is_a_named_error():
    from deepeval.test_case import LLMTestCase

    with Upstream() as up:
        up.state.max_model_len = 100_000  # the stand-in's context check counts words; GEval's prompts are long
        cfg = JudgeConfig(base_url=up.base_url, model="base", max_tokens=32)
        judge, why = check_judge(cfg)
        assert judge is not None and why == "used"
        with pytest.raises(JudgeUnavailable) as err:
            score_with_judge(judge_metric(judge, cfg), LLMTestCase(input="회원 목록 화면", actual_output="<Screen/>",
                                                                  expected_output="<Screen id=\"memberList\"/>"))
        msg = str(err.value)
        assert "returned no valid" in msg and "finish_reason length" in msg and "eval.judge.max_tokens" in msg
        assert up.base_url in msg and "base-0" in msg  # the endpoint and what it wrote
        assert up.state.requests[-1]["response_format"]["type"] == "json_schema"  # the schema was asked for
