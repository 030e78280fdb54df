"""Model cards: what a registered version is, in Markdown, built from the files registered with it.

Generated at registration (serving/promote_stage.py) into the bundle as MODEL_CARD.md and stored as the version's
description; `make promote VERSION=n` appends the promotion decision; `make card VERSION=n` prints it. Sections:
base model and revision, data (hash, rows, harvested feedback), training (stage, method, config, loss), evaluation
against the reference with intervals (the gate table), the serving configuration and its fit check, serving numbers
(the SLO rows when measured) and known limits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

CARD = "MODEL_CARD.md"
FLOORS_ONLY = ("**Promoted on floors only** (`gate.floors_only: true`): no statistical rule on the target metric "
               "was applied, so this version is not shown to be better than its reference.")
TRAINING_KEYS = ("stage", "method", "lora_rank", "pref_beta", "init_adapter", "global_step", "final_train_loss",
                 "best_val_loss", "dpo_reward_accuracy", "dpo_reward_margin", "trainable_params", "tokens_per_s",
                 "train_runtime_s")


def _read(path: Path) -> Optional[str]:
    return path.read_text(encoding="utf-8") if path.exists() else None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def gate_rows(gate: dict) -> list[str]:
    lines = ["| rule | metric | n | estimate | interval | value | threshold | result | detail |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in gate.get("rules", []):
        lo, hi = r.get("ci_low"), r.get("ci_high")
        interval = "-" if lo is None and hi is None else \
            f"[{'-inf' if lo is None else f'{lo:+.4f}'}, {'+inf' if hi is None else f'{hi:+.4f}'}]"
        lines.append(f"| {r['name']} | {r['metric']} | {r.get('n') if r.get('n') is not None else '-'} | "
                     f"{'-' if r.get('estimate') is None else format(r['estimate'], '+.4f')} | {interval} | "
                     f"{'-' if r.get('value') is None else format(r['value'], '.4f')} | "
                     f"{'-' if r.get('threshold') is None else r['threshold']} | {'pass' if r['passed'] else 'FAIL'} | "
                     f"{(r.get('detail') or '').replace('|', '/')} |")
    return lines


def model_card(bundle: Path, *, registered_model: str, version: Optional[str] = None, alias: str = "champion",
               limits: tuple[str, ...] = (), report: bool = True) -> str:
    """The card of the bundle (a promotion folder or a downloaded version). `report=False` leaves the full evaluation
    report out (it is the artifact eval_report.md): the version's description holds at most MAX_DESCRIPTION
    characters (MLflow's SQL store), and the promotion decision is appended to it later."""
    manifest = json.loads(_read(bundle / "manifest.json") or "{}")
    gate = json.loads(_read(bundle / "gate.json") or "{}")
    serving = yaml.safe_load(_read(bundle / "serving.yaml") or "{}") or {}
    fit = _read(bundle / "fit_check.txt")
    stats = json.loads(_read(bundle / "dataset_stats.json") or "{}")
    title = f"{registered_model}" + (f" v{version}" if version else "") + f" (run {manifest.get('run_key', '?')})"
    out = [f"# Model card: {title}", "",
           f"Registered as `{alias}`. Base model `{manifest.get('base_model', '?')}` (revision "
           f"`{manifest.get('base_model_revision', '?')}`), trained from config `{manifest.get('config_hash', '?')}` "
           f"at commit `{manifest.get('git_commit', '?')}` (profile `{manifest.get('profile', '?')}`).", "",
           "## Data", "",
           f"- dataset hash `{manifest.get('dataset_hash', '?')}` ({manifest.get('dataset_dir', '?')})"]
    if stats:
        out.append("- rows: " + ", ".join(f"{k} {v}" for k, v in (stats.get("splits") or {}).items())
                   + f"; read {stats.get('rows_read')}, rejected {stats.get('rows_rejected')}")
        fb = stats.get("feedback")
        if fb:
            out.append(f"- harvested feedback ({', '.join(fb['harvests'])}): {fb['sft_rows']} supervised rows, "
                       f"{fb['preference_pairs']} preference pairs")
    out += ["", "## Training", "", "| item | value |", "|---|---|"]
    for k in TRAINING_KEYS:
        if manifest.get(k) is not None:
            out.append(f"| {k} | {_fmt(manifest[k])} |")
    v = manifest.get("verification") or {}
    if v:
        out.append(f"| outputs changed vs base | {v.get('outputs_differ')}/{v.get('prompts')} |")
    out += ["", "## Evaluation against the reference", "",
            f"Gate: **{'PASS' if gate.get('passed') else 'FAIL'}** against `{gate.get('reference', '?')}` "
            f"({gate.get('decided_by', '')}). Statistical rows: n paired items (or votes), estimate = mean(candidate - "
            "reference) (or the win rate), interval = its confidence interval.", ""]
    if gate.get("mode") == "floors_only":
        out += [FLOORS_ONLY, ""]
    out += gate_rows(gate)
    text = _read(bundle / "eval_report.md")
    if text and report:
        out += ["", "<details><summary>evaluation report</summary>", "", text.strip(), "", "</details>"]
    elif text:
        out += ["", "Every metric of both models: the version's artifact `eval_report.md` (and `MODEL_CARD.md`, this card "
                "with it)."]
    out += ["", "## Serving", "", f"- mode: {'merged weights' if serving.get('model') == 'merged' else 'LoRA module on the base'}",
            "- engine settings: " + ", ".join(f"{k}={serving[k]}" for k in ("dtype", "max-model-len", "max-num-seqs",
                                                                               "quantization", "tensor-parallel-size")
                                                if k in serving)]
    if fit:
        out += ["", "```", fit.strip(), "```"]
    slo = [r for r in gate.get("rules", []) if r.get("kind") == "slo"]
    out += ["", "## Serving numbers", ""]
    out += ([f"- {r['name']}: {r.get('detail', '')}" for r in slo] if slo else
            ["- not measured at registration (`gate.slo.required: false`); `make bench-serve` measures the champion "
             "(docs/BENCHMARKS.md)"])
    out += ["", "## Known limits", ""]
    known = list(limits) + [
        "Scores are on the shipped evaluation items only (KoBEST samples and the held-out screen requests); the "
        "intervals say how much they could move on the same kind of items, not on other tasks.",
    ]
    if manifest.get("stage") == "dpo":
        known.append("Trained with DPO on harvested preferences: it learned what the people who voted preferred, "
                     "from as many pairs as the data section says.")
    if (manifest.get("profile") or "").startswith("cpu"):
        known.append("The embedded CPU profile proves the plumbing: a 3.5M-parameter base model, not a useful assistant.")
    out += [f"- {k}" for k in known]
    return "\n".join(out) + "\n"


def with_promotion(card: str, version: str, gate: dict, old: Optional[str], limit: Optional[int] = None) -> str:
    """The card with the decision that made `version` the champion appended; with `limit`, the earlier card is cut
    (never the decision) so the whole fits."""
    lines = ["", f"## Promotion to champion (v{version}" + (f", replacing v{old})" if old else ")"), "",
             f"Gate: **{'PASS' if gate.get('passed') else 'FAIL'}** against `{gate.get('reference', '?')}` "
             f"({gate.get('decided_by', '')}).", ""] + ([FLOORS_ONLY, ""] if gate.get("mode") == "floors_only" else []) \
        + gate_rows(gate)
    section = "\n".join(lines) + "\n"
    card = card.rstrip("\n") + "\n"
    if limit is not None and len(card) + len(section) > limit:
        card = card[: max(0, limit - len(section) - 40)] + "\n\n(cut: the full card is MODEL_CARD.md)\n"
    return card + section
