"""Custom metrics for the generation tasks, as DeepEval metrics (BaseMetric subclasses), rule-based and offline.

Screen XML task: `xml_valid` (well-formed), `xml_structure` (Screen root with an id and exactly one element per
requested field), `field_f1` (requested vs produced fields), `char_ngram_f1` (character n-gram F1 against the
reference, suited to Korean). Structured JSON task (the seeds' TIL report): `json_schema_valid`.
Each metric has a threshold and a direction from config (MetricSpec). Called by eval/evaluate.py.
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Optional

from deepeval.metrics import BaseMetric
from deepeval.test_case import LLMTestCase

FIELD_TAGS = ("Column", "Field")


def parse_xml(text: str) -> Optional[ET.Element]:
    text = (text or "").strip()
    m = re.search(r"<Screen\b.*</Screen>", text, re.S)  # tolerate chatter around the document
    candidate = m.group(0) if m else text
    try:
        return ET.fromstring(candidate)
    except ET.ParseError:
        return None


def field_ids(root: Optional[ET.Element]) -> list[str]:
    if root is None:
        return []
    return [el.get("id") for el in root.iter() if el.tag in FIELD_TAGS and el.get("id")]


class _RuleMetric(BaseMetric):
    """Shared plumbing: a deterministic score in [0, 1]; success = score >= threshold (or <= when lower is better)."""

    name = "rule"

    def __init__(self, threshold: float = 0.5, greater_is_better: bool = True):
        self.threshold = threshold
        self.greater_is_better = greater_is_better
        self.async_mode = False
        self.include_reason = True
        self.verbose_mode = False

    @property
    def __name__(self):  # DeepEval reports metrics by this name
        return self.name

    def score_case(self, test_case: LLMTestCase) -> tuple[float, str]:
        raise NotImplementedError

    def measure(self, test_case: LLMTestCase, *args, **kwargs) -> float:
        self.score, self.reason = self.score_case(test_case)
        self.success = self.score >= self.threshold if self.greater_is_better else self.score <= self.threshold
        return self.score

    async def a_measure(self, test_case: LLMTestCase, *args, **kwargs) -> float:
        return self.measure(test_case)

    def is_successful(self) -> bool:
        return bool(self.success)


class XmlWellFormed(_RuleMetric):
    name = "xml_valid"

    def score_case(self, tc):
        return (1.0, "well-formed") if parse_xml(tc.actual_output) is not None else (0.0, "not well-formed XML")


class XmlStructure(_RuleMetric):
    """Screen root with an id, and exactly one Column/Field per requested field (each with a label)."""

    name = "xml_structure"

    def score_case(self, tc):
        root = parse_xml(tc.actual_output)
        ref = parse_xml(tc.expected_output)
        if root is None:
            return 0.0, "not well-formed"
        if root.tag != "Screen" or not root.get("id"):
            return 0.0, f"root is <{root.tag}> without the Screen id"
        produced = field_ids(root)
        requested = field_ids(ref)
        if len(produced) != len(set(produced)):
            return 0.0, "a field appears more than once"
        missing_label = [el.get("id") for el in root.iter() if el.tag in FIELD_TAGS and not el.get("label")]
        if missing_label:
            return 0.0, f"fields without a label: {missing_label}"
        if sorted(produced) != sorted(requested):
            return 0.0, f"fields {sorted(produced)} != requested {sorted(requested)}"
        return 1.0, "structure matches the request"


class FieldCoverageF1(_RuleMetric):
    name = "field_f1"

    def score_case(self, tc):
        produced, requested = set(field_ids(parse_xml(tc.actual_output))), set(field_ids(parse_xml(tc.expected_output)))
        if not requested:
            return 0.0, "reference has no fields"
        tp = len(produced & requested)
        if not tp:
            return 0.0, f"none of {sorted(requested)} produced"
        p, r = tp / len(produced), tp / len(requested)
        return 2 * p * r / (p + r), f"precision {p:.2f} recall {r:.2f}"


class CharNgramF1(_RuleMetric):
    """Character n-gram F1 (n=1..3 averaged, whitespace removed): robust to Korean spacing and particles."""

    name = "char_ngram_f1"

    def score_case(self, tc):
        a = re.sub(r"\s+", "", tc.actual_output or "")
        b = re.sub(r"\s+", "", tc.expected_output or "")
        if not a or not b:
            return 0.0, "empty output or reference"
        scores = []
        for n in (1, 2, 3):
            ca = Counter(a[i:i + n] for i in range(len(a) - n + 1))
            cb = Counter(b[i:i + n] for i in range(len(b) - n + 1))
            overlap = sum((ca & cb).values())
            if not overlap:
                scores.append(0.0)
                continue
            p, r = overlap / sum(ca.values()), overlap / sum(cb.values())
            scores.append(2 * p * r / (p + r))
        return sum(scores) / len(scores), "mean char 1-3 gram F1"


class JsonSchemaValid(_RuleMetric):
    """The output parses as JSON and has the reference's keys with the same value types (the TIL-report task:
    a structured JSON answer). Score = share of reference keys present with the right type; 0 if unparsable."""

    name = "json_schema_valid"

    def score_case(self, tc):
        try:
            ref = json.loads(tc.expected_output)
        except (TypeError, json.JSONDecodeError):
            return 0.0, "reference is not JSON"
        text = (tc.actual_output or "").strip()
        m = re.search(r"\{.*\}", text, re.S)
        try:
            out = json.loads(m.group(0) if m else text)
        except json.JSONDecodeError:
            return 0.0, "output is not JSON"
        if not isinstance(ref, dict) or not isinstance(out, dict):
            return (1.0, "same type") if type(ref) is type(out) else (0.0, "not an object")
        ok = [k for k, v in ref.items() if k in out and type(out[k]) is type(v)]
        return len(ok) / max(len(ref), 1), f"{len(ok)}/{len(ref)} keys with the right type"


METRICS: dict[str, type[_RuleMetric]] = {m.name: m for m in (XmlWellFormed, XmlStructure, FieldCoverageF1, CharNgramF1,
                                                              JsonSchemaValid)}


def build_metrics(specs) -> list[_RuleMetric]:
    out = []
    for spec in specs:
        if spec.name not in METRICS:
            raise ValueError(f"eval.custom_metrics: unknown metric '{spec.name}'; known: {', '.join(METRICS)}")
        out.append(METRICS[spec.name](threshold=spec.threshold, greater_is_better=spec.greater_is_better))
    return out
