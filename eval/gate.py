"""The benchmark gate: a candidate is promoted only if every rule of `gate.rules` holds.

Rule kinds: `floor` (candidate metric >= threshold), `no_regression` (candidate >= reference - tolerance on every
metric matching a glob such as eval/kobest/*/acc), `improvement` (the lower bound of a paired bootstrap confidence
interval of candidate - reference over the SAME items is above zero, so noise on a small eval set promotes
nothing), `adapter_changes_outputs` (the finetune verification saw changed greedy outputs). The reference is the
current champion, or the base model when there is none. Writes the decision and the rule table as JSON and
Markdown. Called by eval/gate_stage.py; tests call `decide` directly.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from workspace.config import GateConfig, GateRule


EPS = 1e-9  # 0.525 - 0.05 is 0.47500000000000003 in floating point: a boundary value must not fail a rule


class GateError(RuntimeError):
    """The gate cannot decide (missing metric, items that do not pair); the message says which."""


class GateFailed(RuntimeError):
    """The gate decided against the candidate (exit code 3); `result` is the decision as JSON."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


@dataclass
class RuleResult:
    name: str
    kind: str
    metric: str
    value: Optional[float]
    threshold: Optional[float]
    passed: bool
    detail: str


@dataclass
class GateDecision:
    passed: bool
    decided_by: str
    reference: str
    rules: list[RuleResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"passed": self.passed, "decided_by": self.decided_by, "reference": self.reference,
                "rules": [asdict(r) for r in self.rules]}

    def markdown(self) -> str:
        lines = [f"# Gate: {'PASS' if self.passed else 'FAIL'}", "", f"Reference: {self.reference}. Decided by: {self.decided_by}.",
                 "", "| rule | kind | metric | value | threshold | result | detail |", "|---|---|---|---|---|---|---|"]
        for r in self.rules:
            v = "-" if r.value is None else f"{r.value:.4f}"
            t = "-" if r.threshold is None else f"{r.threshold:.4f}"
            lines.append(f"| {r.name} | {r.kind} | {r.metric} | {v} | {t} | {'pass' if r.passed else '**FAIL**'} | {r.detail} |")
        return "\n".join(lines) + "\n"


def item_scores(items_path: Path, metric: str) -> dict[str, float]:
    """Per-item scores behind an aggregate metric name: eval/custom/<task>/<m> or eval/kobest/<task>/acc."""
    parts = metric.split("/")
    if len(parts) != 4 or parts[0] != "eval":
        raise GateError(f"metric '{metric}' is not of the form eval/<suite>/<task>/<metric>")
    _, suite, task, name = parts
    out: dict[str, float] = {}
    with open(items_path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row.get("suite") != suite:
                continue
            if suite == "kobest" and row.get("task") == f"kobest_{task}" and name in ("acc",):
                out[row["id"]] = float(row["acc"])
            elif suite == "custom" and row.get("task") == task and name in row.get("scores", {}):
                out[row["id"]] = float(row["scores"][name])
    if not out:
        raise GateError(f"no per-item scores for {metric} in {items_path}")
    return out


def paired_bootstrap_ci(cand: dict[str, float], ref: dict[str, float], confidence: float, samples: int,
                        seed: int = 0) -> tuple[float, float, float, int]:
    """(mean difference, CI low, CI high, n) of candidate - reference over the same item ids."""
    if set(cand) != set(ref):
        only_c, only_r = sorted(set(cand) - set(ref))[:3], sorted(set(ref) - set(cand))[:3]
        raise GateError(f"candidate and reference were not evaluated on the same items (only candidate: {only_c}, "
                        f"only reference: {only_r}); evaluate both with the same eval config and test split")
    ids = sorted(cand)
    diff = np.array([cand[i] - ref[i] for i in ids])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(samples, len(diff)))
    means = diff[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(diff.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)), len(diff)


def _matching(metrics: dict[str, float], pattern: str) -> list[str]:
    keys = sorted(k for k in metrics if fnmatch.fnmatchcase(k, pattern))
    if not keys:
        raise GateError(f"gate rule metric '{pattern}' matches no evaluated metric; known: {', '.join(sorted(metrics)[:8])}...")
    return keys


def _rule(rule: GateRule, cand: dict, ref: dict, cand_items: Path, ref_items: Path, verification: dict,
          samples: int) -> list[RuleResult]:
    if rule.kind == "adapter_changes_outputs":
        n, total = verification.get("outputs_differ"), verification.get("prompts")
        ok = bool(n)
        return [RuleResult(rule.name, rule.kind, "verify/outputs_differ", None if n is None else float(n), 1.0, ok,
                           f"{n}/{total} probe prompts changed" if n is not None else "no verification in the manifest")]
    if rule.metric is None:
        raise GateError(f"gate rule '{rule.name}' ({rule.kind}) needs a metric")
    out = []
    if rule.kind == "floor":
        if rule.threshold is None:
            raise GateError(f"gate rule '{rule.name}' (floor) needs a threshold")
        for k in _matching(cand, rule.metric):
            out.append(RuleResult(rule.name, rule.kind, k, cand[k], rule.threshold, cand[k] >= rule.threshold - EPS,
                                  f"{cand[k]:.4f} >= {rule.threshold}" if cand[k] >= rule.threshold else f"{cand[k]:.4f} < {rule.threshold}"))
    elif rule.kind == "no_regression":
        for k in _matching(cand, rule.metric):
            if k not in ref:
                raise GateError(f"gate rule '{rule.name}': reference has no {k}")
            floor = ref[k] - rule.tolerance
            out.append(RuleResult(rule.name, rule.kind, k, cand[k], floor, cand[k] >= floor - EPS,
                                  f"candidate {cand[k]:.4f} vs reference {ref[k]:.4f} (tolerance {rule.tolerance})"))
    elif rule.kind == "improvement":
        for k in _matching(cand, rule.metric):
            mean, lo, hi, n = paired_bootstrap_ci(item_scores(cand_items, k), item_scores(ref_items, k), rule.confidence, samples)
            out.append(RuleResult(rule.name, rule.kind, k, lo, 0.0, lo > 0,
                                  f"mean diff {mean:+.4f}, {rule.confidence:.0%} CI [{lo:+.4f}, {hi:+.4f}] over {n} paired items"))
    return out


def decide(cfg: GateConfig, candidate_metrics: dict, reference_metrics: dict, candidate_items: Path, reference_items: Path,
           verification: dict, reference_name: str) -> GateDecision:
    results: list[RuleResult] = []
    for rule in cfg.rules:
        results += _rule(rule, candidate_metrics, reference_metrics, candidate_items, reference_items, verification,
                         cfg.bootstrap_samples)
    failed = [r for r in results if not r.passed]
    return GateDecision(not failed, f"rule '{failed[0].name}' ({failed[0].metric}): {failed[0].detail}" if failed
                        else "all rules passed", reference_name, results)


def with_rules(decision: GateDecision, kind: str, rows: list[dict]) -> GateDecision:
    """The decision with more rule rows (e.g. the serving SLOs, measured outside this package) folded in."""
    rules = decision.rules + [RuleResult(r["name"], kind, r["metric"], r.get("value"), r.get("threshold"), bool(r["passed"]),
                                         r.get("detail", "")) for r in rows]
    failed = [r for r in rules if not r.passed]
    return GateDecision(not failed, f"rule '{failed[0].name}' ({failed[0].metric}): {failed[0].detail}" if failed
                        else "all rules passed", decision.reference, rules)


def write_decision(decision: GateDecision, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "gate.json", out_dir / "gate.md"
    js.write_text(json.dumps(decision.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
    md.write_text(decision.markdown(), encoding="utf-8")
    return js, md
