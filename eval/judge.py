"""LLM-as-judge: DeepEval GEval with the rubric from config, judged by any OpenAI-compatible endpoint
(a local vLLM server, or a remote one whose API key comes from an environment variable named in config).

Without a configured judge the metric is reported as skipped with the reason; it never passes silently.
Structured outputs: DeepEval hands pydantic schemas; they are sent as `response_format` json_schema with bounded
strings and an integer score (a weak judge otherwise pads JSON forever; ENVIRONMENT.md). Called by eval/custom.py.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Optional

import httpx

from workspace import offline

offline.apply()

from deepeval.metrics import GEval  # noqa: E402
from deepeval.models import DeepEvalBaseLLM  # noqa: E402
from deepeval.test_case import LLMTestCase, SingleTurnParams  # noqa: E402

from workspace.config import JudgeConfig  # noqa: E402


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
        self.api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not self.api_key:
            raise JudgeUnavailable(f"judge api key: environment variable {cfg.api_key_env} is not set")
        super().__init__(model=cfg.model)

    def load_model(self):
        return self

    def get_model_name(self) -> str:
        return f"{self.cfg.model} @ {self.cfg.base_url}"

    def _post(self, prompt: str, schema=None) -> str:
        body = {"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
                "max_tokens": self.cfg.max_tokens}
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": schema.__name__, "schema": _bounded(schema.model_json_schema())}}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            r = httpx.post(f"{self.cfg.base_url.rstrip('/')}/chat/completions", json=body, headers=headers, timeout=120)
        except httpx.HTTPError as exc:
            raise JudgeUnavailable(f"judge endpoint {self.cfg.base_url} is unreachable: {exc}") from exc
        if r.status_code != 200:
            raise JudgeUnavailable(f"judge endpoint {self.cfg.base_url} answered {r.status_code}: {r.text[:200]}")
        choice = r.json()["choices"][0]
        self.last_finish_reason = choice.get("finish_reason")
        return choice["message"]["content"]

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
    A configured judge that is unusable (down, no key) raises JudgeUnavailable naming the endpoint."""
    if cfg is None:
        return None, "no judge configured (eval.judge is null): the LLM-as-judge metric was skipped"
    judge = OpenAICompatibleJudge(cfg)
    headers = {"Authorization": f"Bearer {judge.api_key}"} if judge.api_key else {}
    try:
        r = httpx.get(f"{cfg.base_url.rstrip('/')}/models", headers=headers, timeout=10)
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise JudgeUnavailable(f"judge endpoint {cfg.base_url} is not usable: {exc}") from exc
    return judge, "used"


def judge_metric(judge: OpenAICompatibleJudge, cfg: JudgeConfig, threshold: float = 0.5) -> GEval:
    return GEval(name="judge", criteria=cfg.rubric, model=judge, threshold=threshold, async_mode=False,
                 evaluation_params=[SingleTurnParams.INPUT, SingleTurnParams.ACTUAL_OUTPUT,
                                    SingleTurnParams.EXPECTED_OUTPUT], verbose_mode=False)


def score_with_judge(metric: GEval, case: LLMTestCase) -> tuple[float, str]:
    metric.measure(case)
    return float(metric.score or 0.0), metric.reason or ""
