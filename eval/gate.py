"""The benchmark gate: a candidate is promoted only if every rule of `gate.rules` holds.

Rule kinds:
- `floor`: candidate metric >= threshold.
- `no_regression`: paired non-inferiority per metric matching a glob such as eval/kobest/*/acc: the one-sided upper
  confidence bound of mean(reference - candidate) over the SAME items must be below `tolerance`; Holm's procedure
  keeps the familywise error across the matched tasks at 1 - confidence.
- `improvement`: the lower bound of the paired BCa bootstrap interval of mean(candidate - reference) over the SAME
  items must exceed `min_effect` (the smallest gain that retraining with another seed does not produce by itself;
  measured by `make bench-gate`).
- `adapter_changes_outputs`: the finetune verification saw changed greedy outputs.
- `preference` (off by default): people in the gate. The candidate's win rate over the reference in the gateway's
  arena (ties count half), from votes the flow reads from the gateway database; the one-sided lower Wilson bound
  at `confidence` must exceed `threshold` (0.5 when unset) on at least `min_votes` votes. A candidate that is not
  registered yet has no votes: for registration as `candidate` (`make loop`) the row is "pending" and does not
  block, since the canary is how votes are collected; for promotion to champion it fails until enough votes exist.
Both statistical rules refuse to decide below `gate.min_items` paired items. The intervals come from
scipy.stats.bootstrap (paired, BCa), Holm from statsmodels. The reference is the current champion, or the base
model when there is none. Writes the decision and the rule table (n, estimate, interval, method for every
statistical row) as JSON and Markdown. Called by eval/gate_stage.py; tests and benchmarks/gate.py call `decide`,
`improvement_result` and `no_regression_results` directly.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from workspace.config.evaluation import GateConfig, GateRule


FLOORS_ONLY_NOTE = ("**Floors only** (gate.floors_only): no statistical rule on the target metric decided this "
                    "gate, so a pass here is not evidence of an improvement over the reference.")
EPS = 1e-9  # 0.525 - 0.05 is 0.47500000000000003 in floating point: a boundary value must not fail a rule


class GateError(RuntimeError):
    """The gate cannot decide (missing metric, items that do not pair); the message says which."""


class GateFailed(RuntimeError):
    """The gate decided against the candidate (exit code 3); `result` is the decision as JSON."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result

    def __reduce__(self):  # picklable whole (Prefect persists a task's exception): message lines and decision intact
        return (type(self), (str(self), self.result))


@dataclass
class RuleResult:
    name: str
    kind: str
    metric: str
    value: Optional[float]       # what is compared with the threshold (a bound, a p-value, a metric)
    threshold: Optional[float]
    passed: bool
    detail: str
    n: Optional[int] = None      # statistical rows: paired items,
    estimate: Optional[float] = None  # mean(candidate - reference),
    ci_low: Optional[float] = None    # its interval (None: open side),
    ci_high: Optional[float] = None
    method: Optional[str] = None      # and how it was computed

    def as_row(self) -> dict:
        row = asdict(self)
        for k in ("value", "estimate", "ci_low", "ci_high"):
            if row[k] is not None and not math.isfinite(row[k]):
                row[k] = None  # JSON has no infinity: an open side is null
        return row

    def interval(self) -> str:
        if self.ci_low is None and self.ci_high is None:
            return "-"
        lo = "-inf" if self.ci_low is None or self.ci_low == -math.inf else f"{self.ci_low:+.4f}"
        hi = "+inf" if self.ci_high is None or self.ci_high == math.inf else f"{self.ci_high:+.4f}"
        return f"[{lo}, {hi}]"


@dataclass
class GateDecision:
    passed: bool
    decided_by: str
    reference: str
    rules: list[RuleResult] = field(default_factory=list)
    mode: str = "full"  # GateConfig.mode: 'floors_only' when no statistical rule on the target metric decided

    def to_json(self) -> dict:
        return {"passed": self.passed, "decided_by": self.decided_by, "reference": self.reference, "mode": self.mode,
                "rules": [r.as_row() for r in self.rules]}

    def markdown(self) -> str:
        lines = [f"# Gate: {'PASS' if self.passed else 'FAIL'}", "", f"Reference: {self.reference}. Decided by: {self.decided_by}.",
                 *(["", FLOORS_ONLY_NOTE] if self.mode == "floors_only" else []),
                 "", "Statistical rows: n = paired items, estimate = mean(candidate - reference), interval = its "
                 "confidence interval (method column).", "",
                 "| rule | kind | metric | n | estimate | interval | method | value | threshold | result | detail |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rules:
            v = "-" if r.value is None else f"{r.value:.4f}"
            t = "-" if r.threshold is None else f"{r.threshold:.4f}"
            n = "-" if r.n is None else str(r.n)
            e = "-" if r.estimate is None else f"{r.estimate:+.4f}"
            lines.append(f"| {r.name} | {r.kind} | {r.metric} | {n} | {e} | {r.interval()} | {r.method or '-'} | {v} | "
                         f"{t} | {'pass' if r.passed else '**FAIL**'} | {r.detail} |")
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


@dataclass(frozen=True)
class Interval:
    """A paired comparison: the estimate (mean of per-item differences), its confidence interval, how many items
    and how it was computed. `low`/`high` are -inf/+inf on the open side of a one-sided interval."""
    estimate: float
    low: float
    high: float
    n: int
    method: str


def paired_scores(cand: dict[str, float], ref: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Candidate and reference scores aligned on the same item ids (refused when the items differ)."""
    if set(cand) != set(ref):
        only_c, only_r = sorted(set(cand) - set(ref))[:3], sorted(set(ref) - set(cand))[:3]
        raise GateError(f"candidate and reference were not evaluated on the same items (only candidate: {only_c}, "
                        f"only reference: {only_r}); evaluate both with the same eval config and test split")
    ids = sorted(cand)
    return np.array([cand[i] for i in ids], dtype=float), np.array([ref[i] for i in ids], dtype=float)


def _mean_diff(c, r, axis=-1):
    return np.mean(c - r, axis=axis)


def paired_interval(cand: np.ndarray, ref: np.ndarray, confidence: float, samples: int, seed: int = 0,
                    alternative: str = "two-sided") -> Interval:
    """Confidence interval of mean(candidate - reference) over paired items: scipy.stats.bootstrap with
    paired=True (items are resampled together with their pair) and BCa, which corrects the bias and skew that
    make plain percentile intervals under-cover on small, skewed samples. When every difference is the same the
    interval is that value (BCa is undefined there). `alternative` as in scipy: 'greater' gives [low, +inf),
    'less' gives (-inf, high]."""
    from scipy import stats

    diff = cand - ref
    n = len(diff)
    est = float(diff.mean()) if n else float("nan")
    sides = "two-sided" if alternative == "two-sided" else "one-sided"
    if n == 0:
        return Interval(est, float("nan"), float("nan"), 0, "no items")
    if np.ptp(diff) == 0:
        low = est if alternative != "less" else -np.inf
        high = est if alternative != "greater" else np.inf
        return Interval(est, low, high, n, f"all {n} differences equal")
    res = stats.bootstrap((cand, ref), _mean_diff, paired=True, vectorized=True, n_resamples=samples,
                          confidence_level=confidence, method="BCa", alternative=alternative,
                          random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Interval(est, low, high, n, f"paired bootstrap BCa, {sides} {confidence:.0%}, {samples} resamples")


def noninferiority_p(cand: np.ndarray, ref: np.ndarray, tolerance: float, samples: int, seed: int = 0) -> tuple[float, Interval]:
    """p-value of H0 'reference - candidate >= tolerance' (the candidate is worse by the tolerance or more),
    from the same paired BCa bootstrap, by inverting its one-sided upper bound: the smallest alpha at which the
    (1 - alpha) upper bound of mean(reference - candidate) is below the tolerance. Also the 95% bound."""
    from scipy import stats

    diff = ref - cand
    n = len(diff)
    if n and np.ptp(diff) == 0:
        return (0.0 if diff[0] < tolerance else 1.0), paired_interval(ref, cand, 0.95, samples, seed, alternative="less")
    boot = stats.bootstrap((ref, cand), _mean_diff, paired=True, vectorized=True, n_resamples=samples,
                           confidence_level=0.95, method="BCa", alternative="less",
                           random_state=np.random.default_rng(seed))
    # the 95% bound for the table from the same resamples (bootstrapping again would repeat the work)
    at95 = Interval(float(diff.mean()), -np.inf, float(boot.confidence_interval.high), n,
                    f"paired bootstrap BCa, one-sided 95%, {samples} resamples")

    def upper(alpha: float) -> float:  # the same resamples at another level (n_resamples=0 reuses them)
        r = stats.bootstrap((ref, cand), _mean_diff, paired=True, vectorized=True, n_resamples=0,
                            confidence_level=1 - alpha, method="BCa", alternative="less", bootstrap_result=boot)
        return float(r.confidence_interval.high)

    lo_a, hi_a = 1e-4, 1 - 1e-4  # the bound shrinks as alpha grows
    if upper(lo_a) < tolerance:
        return lo_a, at95
    if upper(hi_a) >= tolerance:
        return 1.0, at95
    for _ in range(30):
        mid = (lo_a + hi_a) / 2
        if upper(mid) < tolerance:
            hi_a = mid
        else:
            lo_a = mid
    return hi_a, at95


def holm(pvalues: list[float], alpha: float) -> tuple[list[bool], list[float]]:
    """Holm's step-down procedure (statsmodels): which hypotheses are rejected at familywise error alpha, and the
    adjusted p-values."""
    from statsmodels.stats.multitest import multipletests

    reject, adjusted, _, _ = multipletests(pvalues, alpha=alpha, method="holm")
    return [bool(x) for x in reject], [float(x) for x in adjusted]


def _matching(metrics: dict[str, float], pattern: str) -> list[str]:
    keys = sorted(k for k in metrics if fnmatch.fnmatchcase(k, pattern))
    if not keys:
        raise GateError(f"gate rule metric '{pattern}' matches no evaluated metric; known: {', '.join(sorted(metrics)[:8])}...")
    return keys


def _fmt(x: float) -> str:
    return "-inf" if x == -np.inf else "+inf" if x == np.inf else f"{x:+.4f}"


def improvement_result(rule: GateRule, metric: str, cand: np.ndarray, ref: np.ndarray, cfg: GateConfig,
                       seed: int = 0) -> RuleResult:
    """The improvement rule on aligned per-item scores: at least gate.min_items paired items, and the lower bound
    of the two-sided paired BCa interval of candidate - reference above the rule's minimum effect."""
    n = len(cand)
    min_effect = rule.min_effect
    if n < cfg.min_items:
        est = float((cand - ref).mean()) if n else None
        return RuleResult(rule.name, rule.kind, metric, None, min_effect, False,
                          f"too few paired items: {n} < gate.min_items {cfg.min_items}; no decision on so little "
                          "evidence (evaluate more items: eval.custom_limit / eval.limit)", n=n, estimate=est,
                          method="not tested")
    ci = paired_interval(cand, ref, rule.confidence, cfg.bootstrap_samples, seed)
    ok = ci.low > min_effect + EPS
    return RuleResult(rule.name, rule.kind, metric, ci.low, min_effect, ok,
                      f"mean diff {ci.estimate:+.4f}, {rule.confidence:.0%} CI [{_fmt(ci.low)}, {_fmt(ci.high)}] over "
                      f"{n} paired items; lower bound {'>' if ok else '<='} minimum effect {min_effect:+.4f}",
                      n=n, estimate=ci.estimate, ci_low=ci.low, ci_high=ci.high, method=ci.method)


def no_regression_results(rule: GateRule, keys: list[str], pairs: dict[str, tuple[np.ndarray, np.ndarray]],
                          cfg: GateConfig, seed: int = 0) -> list[RuleResult]:
    """Paired non-inferiority per metric (task): H0 'reference - candidate >= tolerance' is rejected when the
    one-sided upper bound of mean(reference - candidate) is below the tolerance; Holm's procedure keeps the
    familywise error across the tasks at 1 - confidence. A task passes when its H0 is rejected."""
    alpha = 1 - rule.confidence
    out: dict[str, RuleResult] = {}
    tested, pvals, bounds = [], [], {}
    for k in keys:
        cand, ref = pairs[k]
        if len(cand) < cfg.min_items:
            out[k] = RuleResult(rule.name, rule.kind, k, None, rule.tolerance, False,
                                f"too few paired items: {len(cand)} < gate.min_items {cfg.min_items}; no decision on "
                                "so little evidence", n=len(cand), estimate=float((cand - ref).mean()) if len(cand) else None,
                                method="not tested")
            continue
        p, at95 = noninferiority_p(cand, ref, rule.tolerance, cfg.bootstrap_samples, seed)
        tested.append(k)
        pvals.append(p)
        bounds[k] = at95
    if tested:
        reject, adjusted = holm(pvals, alpha)
        m = len(tested)
        for k, rej, p_adj in zip(tested, reject, adjusted):
            b = bounds[k]
            out[k] = RuleResult(
                rule.name, rule.kind, k, p_adj, alpha, rej,
                f"reference - candidate: mean {b.estimate:+.4f}, one-sided 95% upper bound {_fmt(b.high)} vs "
                f"tolerance {rule.tolerance}; Holm-adjusted p {p_adj:.4f} over {m} tasks "
                f"({'non-inferior' if rej else 'regression not ruled out'})",
                n=b.n, estimate=-b.estimate, ci_low=-b.high, ci_high=np.inf,
                method=f"paired bootstrap BCa non-inferiority, Holm over {m} at {alpha:.0%}")
    return [out[k] for k in keys]


def preference_result(rule: GateRule, arena: Optional[dict], purpose: str = "champion") -> RuleResult:
    """The arena rule on a tally {wins, losses, ties, version, reference_version}. The Wilson interval treats the
    ties-split score as a binomial proportion; a tie (0.5) varies less than a win or loss, so the bound is, if
    anything, conservative."""
    from statsmodels.stats.proportion import proportion_confint

    threshold = 0.5 if rule.threshold is None else rule.threshold
    arena = arena or {}
    wins, losses, ties = (int(arena.get(k, 0)) for k in ("wins", "losses", "ties"))
    n = wins + losses + ties
    versus = f"v{arena.get('version') or '?'} vs v{arena.get('reference_version') or '?'}"
    if n < rule.min_votes:
        pending = purpose == "candidate"
        return RuleResult(rule.name, rule.kind, "arena/win_rate", None, threshold, pending,
                          f"{'pending' if pending else 'too few votes'}: {n} of {rule.min_votes} arena votes "
                          f"({versus})" + ("; registered as candidate, the canary and arena collect them" if pending
                                           else "; keep the candidate in the arena (make loop registers it) and retry"),
                          n=n, method="arena votes, ties half")
    rate = (wins + 0.5 * ties) / n
    alpha = 1 - rule.confidence
    low, high = proportion_confint(wins + 0.5 * ties, n, alpha=2 * alpha, method="wilson")
    ok = low > threshold - EPS
    return RuleResult(rule.name, rule.kind, "arena/win_rate", float(low), threshold, ok,
                      f"win rate {rate:.3f} ({wins} won, {losses} lost, {ties} tied; {versus}); lower "
                      f"{rule.confidence:.0%} bound {low:.3f} {'>' if ok else '<='} {threshold}",
                      n=n, estimate=rate, ci_low=float(low), ci_high=math.inf,
                      method=f"Wilson one-sided {rule.confidence:.0%}, ties half")


def _rule(rule: GateRule, cfg: GateConfig, cand: dict, ref: dict, cand_items: Path, ref_items: Path,
          verification: dict, arena: Optional[dict] = None, purpose: str = "champion") -> list[RuleResult]:
    if rule.kind == "preference":
        return [preference_result(rule, arena, purpose)]
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
        keys = _matching(cand, rule.metric)
        for k in keys:
            if k not in ref:
                raise GateError(f"gate rule '{rule.name}': reference has no {k}")
        pairs = {k: paired_scores(item_scores(cand_items, k), item_scores(ref_items, k)) for k in keys}
        out += no_regression_results(rule, keys, pairs, cfg)
    elif rule.kind == "improvement":
        for k in _matching(cand, rule.metric):
            c, r = paired_scores(item_scores(cand_items, k), item_scores(ref_items, k))
            out.append(improvement_result(rule, k, c, r, cfg))
    return out


def decide(cfg: GateConfig, candidate_metrics: dict, reference_metrics: dict, candidate_items: Path, reference_items: Path,
           verification: dict, reference_name: str, arena: Optional[dict] = None,
           purpose: str = "champion") -> GateDecision:
    """`arena`: the preference rule's tally; `purpose`: champion (promotion) or candidate (registration only).
    A rule set with no rule is refused (it would pass everything); the config refuses it at load too."""
    if not cfg.rules:
        raise GateError("gate.rules is empty: a gate with no rule would pass every candidate")
    results: list[RuleResult] = []
    for rule in cfg.rules:
        results += _rule(rule, cfg, candidate_metrics, reference_metrics, candidate_items, reference_items,
                         verification, arena, purpose)
    failed = [r for r in results if not r.passed]
    return GateDecision(not failed, f"rule '{failed[0].name}' ({failed[0].metric}): {failed[0].detail}" if failed
                        else "all rules passed", reference_name, results, mode=cfg.mode)


def with_rules(decision: GateDecision, kind: str, rows: list[dict]) -> GateDecision:
    """The decision with more rule rows (e.g. the serving SLOs, measured outside this package) folded in."""
    rules = decision.rules + [RuleResult(r["name"], kind, r["metric"], r.get("value"), r.get("threshold"), bool(r["passed"]),
                                         r.get("detail", ""), n=r.get("n"), method=r.get("method")) for r in rows]
    failed = [r for r in rules if not r.passed]
    return GateDecision(not failed, f"rule '{failed[0].name}' ({failed[0].metric}): {failed[0].detail}" if failed
                        else "all rules passed", decision.reference, rules, mode=decision.mode)


def write_decision(decision: GateDecision, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "gate.json", out_dir / "gate.md"
    js.write_text(json.dumps(decision.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
    md.write_text(decision.markdown(), encoding="utf-8")
    return js, md
