"""LLM-as-judge: DeepEval GEval with the rubric from config, judged by any OpenAI-compatible endpoint
(a local vLLM server, or a remote one whose API key comes from an environment variable named in config).

Without a configured judge the metric is reported as skipped with the reason; it never passes silently.
Structured outputs: DeepEval hands pydantic schemas; they are sent as `response_format` json_schema with bounded
strings and an integer score (a weak judge otherwise pads JSON forever: measured with the tiny model on vLLM, which needs
`--structured-outputs-config {"backend": "xgrammar", "disable_any_whitespace": true}`).
Requests go through workspace.endpoint (the openai client, timeouts, retries, the key from `api_key_env`).
Called by eval/evaluate.py and eval/rag_quality.py.
"""
from __future__ import annotations

import copy
import json
from typing import Optional

from deepeval.metrics import GEval
from deepeval.models import DeepEvalBaseLLM
from deepeval.test_case import LLMTestCase, SingleTurnParams

from workspace.config.evaluation import JudgeConfig
from workspace.endpoint import Endpoint, EndpointError


class JudgeUnavailable(RuntimeError):
    pass


def _bounded(schema: dict) -> dict:
    """Cap strings and arrays, make a numeric `score` an integer 0..10, so a small judge terminates."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "string":
                node.setdefault("maxLength", 200)
            if node.get("type") == "array":
                node.setdefault("maxItems", 5)
            for key, value in list(node.get("properties", {}).items()):
                if key == "score" and value.get("type") in ("number", "integer"):
                    node["properties"][key] = {"type": "integer", "enum": list(range(11))}
                else:
                    walk(value)
            for value in node.values():
                if isinstance(value, (dict, list)):
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


class OpenAICompatibleJudge(DeepEvalBaseLLM):
    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.endpoint = Endpoint(cfg.base_url.rstrip("/"), cfg.model, api_key_env=cfg.api_key_env, timeout_s=120)
        try:
            self.endpoint.api_key  # a configured variable that is unset fails here, before any request
        except EndpointError as exc:
            raise JudgeUnavailable(f"judge: {exc}") from None
        self.last_finish_reason = None
        super().__init__(model=cfg.model)

    def load_model(self):
        return self

    def get_model_name(self) -> str:
        return f"{self.cfg.model} @ {self.cfg.base_url}"

    def _post(self, prompt: str, schema=None) -> str:
        fmt = None
        if schema is not None:
            fmt = {"type": "json_schema", "json_schema": {"name": schema.__name__,
                                                          "schema": _bounded(schema.model_json_schema())}}
        try:
            text, _, self.last_finish_reason = self.endpoint.chat([{"role": "user", "content": prompt}],
                                                                  max_tokens=self.cfg.max_tokens, response_format=fmt)
        except EndpointError as exc:
            raise JudgeUnavailable(f"judge endpoint: {exc}") from exc
        return text

    def generate(self, prompt: str, schema=None):
        text = self._post(prompt, schema)
        if schema is None:
            return text
        try:
            return schema.model_validate(json.loads(text))
        except (json.JSONDecodeError, ValueError) as exc:
            raise JudgeUnavailable(
                f"judge {self.get_model_name()} returned no valid {schema.__name__} JSON (finish_reason "
                f"{self.last_finish_reason}): raise eval.judge.max_tokens or use a stronger judge; got {text[:120]!r}") from exc

    async def a_generate(self, prompt: str, schema=None):
        return self.generate(prompt, schema)

    def generate_with_schema(self, prompt, schema=None, **kwargs):
        return self.generate(prompt, schema)

    async def a_generate_with_schema(self, prompt, schema=None, **kwargs):
        return self.generate(prompt, schema)

    def supports_structured_outputs(self) -> bool:
        return True


def check_judge(cfg: Optional[JudgeConfig]) -> tuple[Optional[OpenAICompatibleJudge], str]:
    """(None, why) when no judge is configured: the metric is skipped and the report says so.
    A configured judge that is unusable (down, no key, a refused key) raises JudgeUnavailable naming the endpoint."""
    if cfg is None:
        return None, "no judge configured (eval.judge is null): the LLM-as-judge metric was skipped"
    judge = OpenAICompatibleJudge(cfg)
    try:
        judge.endpoint.models()
    except EndpointError as exc:
        raise JudgeUnavailable(f"judge endpoint {cfg.base_url} is not usable: {exc}") from exc
    return judge, "used"


def judge_metric(judge: OpenAICompatibleJudge, cfg: JudgeConfig, threshold: float = 0.5) -> GEval:
    return GEval(name="judge", criteria=cfg.rubric, model=judge, threshold=threshold, async_mode=False,
                 evaluation_params=[SingleTurnParams.INPUT, SingleTurnParams.ACTUAL_OUTPUT,
                                    SingleTurnParams.EXPECTED_OUTPUT], verbose_mode=False)


def score_with_judge(metric: GEval, case: LLMTestCase) -> tuple[float, str]:
    metric.measure(case)
    return float(metric.score or 0.0), metric.reason or ""
