"""The leaderboard: several models' evaluation results (eval/evaluate.py, identical items, cached per model key) in
one table, the shape of the team's KoBEST comparison (one row per model; BoolQ, COPA, WiC, HellaSwag, SentiNeg
accuracy and macro-F1; then the custom metrics and the serving numbers), every score with a bootstrap confidence
interval over its items (scipy.stats.bootstrap, percentile; macro-F1 recomputed on each resample), written as
Markdown, JSON and a PNG. Wired by flows/leaderboard.py (`make leaderboard`), which picks the models and logs the
MLflow run.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from eval.evaluate import EvalResult

KOBEST = {"boolq": "BoolQ", "copa": "COPA", "wic": "WiC", "hellaswag": "HellaSwag", "sentineg": "SentiNeg"}


@dataclass
class Score:
    value: float
    low: Optional[float] = None
    high: Optional[float] = None
    n: int = 0

    def text(self, digits: int = 3) -> str:
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass
class Row:
    name: str
    kind: str  # base | registered | listed
    detail: str  # base path / version and aliases
    scores: dict[str, Score] = field(default_factory=dict)
    serving: dict[str, float] = field(default_factory=dict)
    cached: bool = False


def _interval(data: tuple, stat, confidence: float, samples: int, seed: int) -> tuple[Optional[float], Optional[float]]:
    from scipy.stats import bootstrap

    if len(data[0]) < 2 or all(np.all(d == d[0]) for d in data):
        return None, None  # one item, or all identical: no spread to resample
    res = bootstrap(data, stat, confidence_level=confidence, n_resamples=samples, method="percentile",
                    paired=len(data) > 1, vectorized=True, random_state=seed)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (None, None) if math.isnan(lo) or math.isnan(hi) else (lo, hi)


def _gold_index(item: dict) -> Optional[int]:
    """The correct choice's index: lm-eval records an index for most KoBEST tasks and the choice's text for COPA,
    whose index follows from pred and acc (two choices)."""
    if isinstance(item.get("target"), int):
        return item["target"]
    if item.get("pred") is None:
        return None
    if item.get("acc") == 1.0:
        return int(item["pred"])
    if len(item.get("loglikelihoods") or []) == 2:
        return 1 - int(item["pred"])
    return None


def macro_f1(gold: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    """Macro-F1 over the classes present in gold or pred, vectorised over resamples (the last axis is the items);
    equal to sklearn's f1_score(average="macro", zero_division=0), which is ~100x slower inside a bootstrap."""
    classes = np.union1d(np.unique(gold), np.unique(pred))
    f1s = []
    for c in classes:
        g, p = gold == c, pred == c
        tp = np.sum(g & p, axis=axis)
        denom = np.sum(g, axis=axis) + np.sum(p, axis=axis)
        f1s.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.mean(f1s, axis=0)


def scores(result: EvalResult, confidence: float, samples: int, seed: int = 0) -> dict[str, Score]:
    """Every per-item metric of one evaluation with its interval: kobest/<task>/acc and f1_macro, custom/<task>/<m>."""
    kobest: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    custom: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in Path(result.items_path).read_text(encoding="utf-8").splitlines():
        it = json.loads(line)
        if it.get("suite") == "kobest":
            gold = _gold_index(it)
            if gold is not None:
                kobest[it["task"].removeprefix("kobest_")].append((gold, int(it["pred"]), float(it["acc"])))
        elif it.get("suite") == "custom":
            for k, v in (it.get("scores") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    custom[it["task"]][k].append(float(v))
    out: dict[str, Score] = {}
    for task, items in kobest.items():
        gold, pred, acc = (np.array(col) for col in zip(*items))
        lo, hi = _interval((acc,), np.mean, confidence, samples, seed)
        out[f"kobest/{task}/acc"] = Score(float(acc.mean()), lo, hi, len(acc))
        lo, hi = _interval((gold, pred), macro_f1, confidence, samples, seed)
        out[f"kobest/{task}/f1_macro"] = Score(float(macro_f1(gold, pred)), lo, hi, len(acc))
    for task, metrics in custom.items():
        for k, values in metrics.items():
            arr = np.array(values)
            lo, hi = _interval((arr,), np.mean, confidence, samples, seed)
            out[f"custom/{task}/{k}"] = Score(float(arr.mean()), lo, hi, len(arr))
    return out


def columns(rows: list[Row]) -> list[str]:
    keys = {k for r in rows for k in r.scores}
    kb = [f"kobest/{t}/{m}" for t in KOBEST for m in ("acc", "f1_macro") if f"kobest/{t}/{m}" in keys]
    return kb + sorted(k for k in keys if k.startswith("custom/"))


def _label(key: str) -> str:
    parts = key.split("/")
    if parts[0] == "kobest":
        return f"{KOBEST.get(parts[1], parts[1])} {'acc' if parts[2] == 'acc' else 'F1'}"
    return parts[-1]


def markdown(rows: list[Row], confidence: float, items_note: str) -> str:
    cols = columns(rows)
    serving = sorted({k for r in rows for k in r.serving})
    lines = ["# Leaderboard", "",
             f"Every model on identical items ({items_note}). Each cell: the score and its {confidence:.0%} bootstrap "
             "interval over the items (percentile; macro-F1 recomputed per resample). Bold: the best score in the "
             "column. With a few dozen items per task, intervals that overlap do not separate two models.", "",
             "| model | kind | " + " | ".join(_label(c) for c in cols) + "".join(f" | {s}" for s in serving) + " |",
             "|---|---|" + "---|" * (len(cols) + len(serving))]
    best = {c: max((r.scores[c].value for r in rows if c in r.scores), default=None) for c in cols}
    for r in rows:
        cells = []
        for c in cols:
            s = r.scores.get(c)
            cells.append("-" if s is None else (f"**{s.text()}**" if s.value == best[c] and len(rows) > 1 else s.text()))
        cells += [f"{r.serving[s]:,.1f}" if s in r.serving else "-" for s in serving]
        lines.append(f"| {r.name} | {r.kind} | " + " | ".join(cells) + " |")
    lines += ["", "| model | what | evaluated |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.detail} | {'cached' if r.cached else 'now'} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(rows)
    fig, ax = plt.subplots(figsize=(max(8, len(cols) * 0.7), 4.8))
    x = np.arange(len(cols))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        vals = [r.scores[c].value if c in r.scores else 0 for c in cols]
        err = [[max(0.0, r.scores[c].value - r.scores[c].low) if c in r.scores and r.scores[c].low is not None else 0
                for c in cols],
               [max(0.0, r.scores[c].high - r.scores[c].value) if c in r.scores and r.scores[c].high is not None else 0
                for c in cols]]
        ax.bar(x + i * width, vals, width, yerr=err, capsize=2, label=r.name)
    ax.set_xticks(x + width * (len(rows) - 1) / 2)
    ax.set_xticklabels([_label(c) for c in cols], rotation=50, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (bars: confidence interval)")
    ax.set_title("Leaderboard: KoBEST (acc, macro-F1) and custom metrics")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rows: list[Row], out_dir: Path, confidence: float, items_note: str) -> tuple[Path, Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "leaderboard.md"
    md.write_text(markdown(rows, confidence, items_note), encoding="utf-8")
    js = out_dir / "leaderboard.json"
    js.write_text(json.dumps([{"name": r.name, "kind": r.kind, "detail": r.detail, "serving": r.serving,
                               "scores": {k: vars(s) for k, s in r.scores.items()}} for r in rows],
                             indent=2, ensure_ascii=False), encoding="utf-8")
    return md, js, plot(rows, out_dir / "leaderboard.png")
