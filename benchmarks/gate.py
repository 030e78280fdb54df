"""The default recipe's margin and the gate's error rates, measured (make bench-gate), and min_effect for a team's own
recipe (make calibrate-gate):

    .venv/bin/python -m llmops bench gate [--seeds 42,...,49] [--base-seeds 1234,1235] [--trials 500] [--repeats 2]
                                         [--reference-recipe finetune.max_steps=100] [--no-write]
    .venv/bin/python -m llmops bench gate --calibrate [--seeds 42,...,47]      # make calibrate-gate

1. The recipe on every seed and base build. The configured recipe is trained with each seed on each base-model build
   (the base built with another `base_model.build.seed` stands in for another machine: the self-built base is not
   bit-identical across CPUs), and every run is evaluated on the same items and gated against its own base with the
   configured rules: the recipe table (xml_valid, the target metric, the verdict) is the evidence that the default job
   passes with margin. Finetune and evaluation are cached by their keys: a rerun trains nothing new.
2. min_effect from a real null, chosen on one half of the seeds and validated on the other. Within each base build the
   first half of the seeds calibrates: the pooled seed-to-seed SD of the target metric (with its chi-square 95%
   interval) gives min_effect = z(0.95)·√2·SD, the one-sided 5% point of the difference between two seeds of one recipe.
   The second half validates: its seeds are paired disjointly (independent pairs only), the better of each pair gated
   against the worse (the direction most likely to promote) with the chosen min_effect and with 0.
3. Simulation with the seed effect kept: whole per-item differences between two seeds of the recipe (not centred: a
   seed pair's own mean difference is part of the null), resampled to n items, a known effect added, the improvement
   rule deciding; false promotion at effect 0, power at the others, for the chosen min_effect, the configured one and 0.
4. Decoding: the first `--sweep-seeds` adapters of each base build decoded with each frequency penalty of PENALTIES
   (serving.decoding, applied alike to evaluation and serving): where the configured value sits (`--only-sweep`: this
   table alone).
5. A real improvement: the recipe against a weaker reference recipe (`--reference-recipe`, 100 steps) on the first
   base build, and reproducibility (the first seed trained `--repeats` times in all, adapters compared tensor by tensor).

`--calibrate` is what a team runs on its own recipe and hardware: the recipe's seeds on the configured base, the
seed SD with its interval, the independent seed pairs, and the config line to paste (no simulation, nothing written).
Writes docs/BENCHMARKS.md (section gate), docs/gate_power.png, and a `bench-gate` MLflow run with both.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.evaluate import EvalResult, evaluate
from eval.gate import decide, improvement_result, item_scores, paired_scores
from finetune.base_model import build_base_model
from finetune.finetune_stage import run_finetune
from finetune.prepare import prepare_dataset
from flows.segments import as_served
from benchmarks.report import update_section
from workspace.config import GateRule, LoadedConfig, add_cli_args, load_config, load_from_args
from workspace.model_ref import base_model
from workspace.paths import ROOT, resolve

EFFECTS = [0.0, 0.02, 0.05, 0.10]
PENALTIES = [0.0, 0.1, 0.2, 0.3, 0.5]  # serving.decoding.frequency_penalty values of the decoding sweep
PLOT = ROOT / "docs" / "gate_power.png"
Z95 = 1.6448536269514722  # one-sided 5% point of the standard normal
SEEDS = "42,43,44,45,46,47,48,49"


@dataclass
class Trial:
    recipe: str
    base_seed: int
    seed: int
    adapter: Path
    manifest: dict
    result: EvalResult


def _loaded(args, overrides: list[str]) -> LoadedConfig:
    return load_config(args.config, profile=args.profile, overrides=list(args.overrides) + overrides)


def base_overrides(args, loaded: LoadedConfig, base_seed: int) -> list[str]:
    """The overrides that select the base build of `base_seed` (built under models/bench-base-<seed> when it is not the
    configured one; skipped when current)."""
    build = loaded.config.base_model.build
    if loaded.config.base_model.source != "build" or base_seed == build.seed:
        return []
    over = [f"base_model.build.seed={base_seed}", f"base_model.path=models/bench-base-{base_seed}"]
    other = _loaded(args, over).config.base_model
    print(f"[bench-gate] base build seed {base_seed}: {other.path}", flush=True)
    build_base_model(other.build, resolve(other.path))
    return over


def train_and_evaluate(args, recipe: str, overrides: list[str], base_seed: int, seed: int, test: Path, prepared, *,
                       output_root: Path | None = None, eval_root: Path | None = None) -> Trial:
    # LoRA modules, no merged copy: the merge is a serving step and changes no score of the in-process scorer
    loaded = _loaded(args, overrides + [f"project.seed={seed}", "serving.adapter_mode=lora"])
    t0 = time.time()
    run = run_finetune(loaded, prepared.path, prepared.content_hash, output_root=output_root)
    print(f"[bench-gate] {recipe} base {base_seed} seed {seed}: {'cached' if run.skipped else 'trained'} "
          f"{run.output_dir.name} ({time.time() - t0:.0f} s)", flush=True)
    ref = base_model(loaded).with_adapter(f"{recipe}-b{base_seed}-s{seed}", str(run.output_dir))
    where = as_served(loaded)  # the served decoding and the workspace's evaluations, or a folder of the caller's
    if eval_root is not None:
        where["out_root"] = eval_root
    res = evaluate(loaded, ref, test_file=test, backend="hf", **where)
    print(f"[bench-gate]   xml_valid {res.metrics.get('eval/custom/screens/xml_valid', float('nan')):.2f}, "
          f"target {res.metrics.get(args.target, float('nan')):.4f}", flush=True)
    return Trial(recipe, base_seed, seed, run.output_dir, run.manifest, res)


def gate_pair(loaded: LoadedConfig, cand: Trial, ref_result: EvalResult, ref_name: str):
    return decide(loaded.config.gate, cand.result.metrics, ref_result.metrics, cand.result.items_path,
                  ref_result.items_path, cand.manifest.get("verification") or {}, ref_name)


def improvement_rule(loaded: LoadedConfig) -> GateRule:
    rules = loaded.config.gate.statistical_rules()
    if not rules:
        raise SystemExit("bench-gate: the configured gate has no improvement rule on gate.target_metric to measure")
    return rules[0]


# ------------------------------------------------------------------------------------------------ statistics
def pooled_sd(groups: list[list[float]]) -> tuple[float, int]:
    """The pooled within-group SD (each group: one base build's seeds) and its degrees of freedom."""
    ss = sum(float(np.sum((np.array(g) - np.mean(g)) ** 2)) for g in groups if len(g) > 1)
    df = sum(len(g) - 1 for g in groups if len(g) > 1)
    return (math.sqrt(ss / df) if df else 0.0), df


def sd_interval(sd: float, df: int, confidence: float = 0.95) -> tuple[float, float]:
    """The chi-square confidence interval of a normal SD estimated with `df` degrees of freedom."""
    from scipy import stats

    if df < 1:
        return float("nan"), float("nan")
    a = 1 - confidence
    return (sd * math.sqrt(df / stats.chi2.ppf(1 - a / 2, df)), sd * math.sqrt(df / stats.chi2.ppf(a / 2, df)))


def min_effect_from_sd(sd: float) -> float:
    """The one-sided 5% point of the difference between two seeds' means (SD·√2), rounded up to 0.005."""
    return math.ceil(Z95 * math.sqrt(2) * sd / 0.005 - 1e-9) * 0.005


def independent_pairs(trials: list[Trial], target: str) -> list[tuple[Trial, Trial]]:
    """Disjoint pairs in seed order, each as (better, worse) on the target: no seed is used twice, so the pairs are
    independent evidence, and each is gated in the direction most likely to promote."""
    ordered = sorted(trials, key=lambda t: t.seed)
    pairs = []
    for a, b in zip(ordered[0::2], ordered[1::2]):
        pairs.append((a, b) if a.result.metrics[target] >= b.result.metrics[target] else (b, a))
    return pairs


def simulate(loaded: LoadedConfig, rule: GateRule, pools: list[np.ndarray], sizes: list[int], effects: list[float],
             trials: int, min_effects: list[float], seed: int = 0) -> dict:
    """Promotion rate per (min_effect, n, effect) of the improvement rule on resampled real differences. `pools` are
    whole per-item differences between seeds (their mean, the seed effect, is kept); pass each pair in both
    directions so the null is symmetric."""
    cfg = loaded.config.gate
    rng = np.random.default_rng(seed)
    out: dict = {}
    total = len(min_effects) * len(sizes) * len(effects)
    done = 0
    for me in min_effects:
        r = rule.model_copy(update={"min_effect": me})
        for n in sizes:
            for eff in effects:
                promoted = 0
                for t in range(trials):
                    pool = pools[rng.integers(len(pools))]
                    d = rng.choice(pool, size=n, replace=True) + eff
                    promoted += improvement_result(r, rule.metric, d, np.zeros(n), cfg, seed=t).passed
                out[(me, n, eff)] = promoted / trials
                done += 1
                print(f"[bench-gate] simulation {done}/{total}: min_effect {me:g}, n {n}, effect {eff:+.2f}: "
                      f"promoted {promoted}/{trials}", flush=True)
    return out


def wilson(k: float, n: int) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(round(k * n), n, alpha=0.05, method="wilson")
    return float(lo), float(hi)


def plot_power(sim: dict, sizes: list[int], effects: list[float], min_effects: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(min_effects), figsize=(5.5 * len(min_effects), 4), sharey=True, squeeze=False)
    for ax, me in zip(axes[0], min_effects):
        for n in sizes:
            ax.plot(effects, [sim[(me, n, e)] for e in effects], marker="o", label=f"{n} items")
        ax.axhline(0.05, color="red", lw=0.8, ls="--", label="5% (false promotion goal at effect 0)")
        ax.set_title(f"improvement rule, min_effect {me:g}")
        ax.set_xlabel("true effect on the target metric (seed effect kept)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("promotion rate")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def adapter_max_diff(a: Path, b: Path) -> float:
    from safetensors.numpy import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if set(ta) != set(tb):
        return float("inf")
    return max(float(np.max(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)))) for k in ta)


def _items(res: EvalResult) -> dict:
    rows = {}
    with open(res.items_path, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            rows[(r["suite"], r["id"])] = r.get("scores") or r.get("acc")
    return rows


# ------------------------------------------------------------------------------------------------- reports
def calibration(trials_by_base: dict[int, list[Trial]], target: str, rule: GateRule, loaded: LoadedConfig,
                split: bool) -> dict:
    """min_effect from the calibration seeds (the first half of each base build's seeds when `split`, else all),
    validated on the disjoint pairs of the other half (or, without a split, of the same seeds: not held out)."""
    cal, val = {}, {}
    for b, ts in trials_by_base.items():
        ordered = sorted(ts, key=lambda t: t.seed)
        half = len(ordered) // 2 if split and len(ordered) >= 4 else len(ordered)
        cal[b], val[b] = ordered[:half], (ordered[half:] if half < len(ordered) else ordered)
    sd, df = pooled_sd([[t.result.metrics[target] for t in ts] for ts in cal.values()])
    lo, hi = sd_interval(sd, df)
    chosen = min_effect_from_sd(sd)
    pairs = [p for ts in val.values() for p in independent_pairs(ts, target)]
    rows = []
    for better, worse in pairs:
        c, r = paired_scores(item_scores(better.result.items_path, target), item_scores(worse.result.items_path, target))
        res = {me: improvement_result(rule.model_copy(update={"min_effect": me}), target, c, r, loaded.config.gate)
               for me in (chosen, 0.0)}
        rows.append({"base": better.base_seed, "candidate": better.seed, "reference": worse.seed,
                     "estimate": res[chosen].estimate, "interval": res[chosen].interval(),
                     "promoted": res[chosen].passed, "promoted_at_0": res[0.0].passed})
    return {"sd": sd, "df": df, "sd_low": lo, "sd_high": hi, "min_effect": chosen,
            "min_effect_low": min_effect_from_sd(lo) if not math.isnan(lo) else float("nan"),
            "min_effect_high": min_effect_from_sd(hi) if not math.isnan(hi) else float("nan"),
            "calibration_seeds": {b: [t.seed for t in ts] for b, ts in cal.items()},
            "validation_seeds": {b: [t.seed for t in ts] for b, ts in val.items()}, "held_out": split, "pairs": rows}


def calibration_lines(cal: dict, rule: GateRule, target: str) -> list[str]:
    held = "held-out" if cal["held_out"] else "the same (not held out: too few seeds to split)"
    lines = [f"Seed SD of `{target}` (pooled within base builds, calibration seeds "
             f"{'; '.join(f'base {b}: {s}' for b, s in cal['calibration_seeds'].items())}): **{cal['sd']:.4f}** "
             f"({cal['df']} degrees of freedom; 95% interval [{cal['sd_low']:.4f}, {cal['sd_high']:.4f}]).", "",
             f"min_effect = z(0.95)·√2·SD, rounded up to 0.005: **{cal['min_effect']:.3f}** (from the SD interval's "
             f"ends: {cal['min_effect_low']:.3f} to {cal['min_effect_high']:.3f}; configured now: {rule.min_effect:g}).", "",
             f"Validation on {held} seeds, independent pairs only (each seed in one pair; the better of the pair "
             "gated against the worse):", "",
             "| base build | candidate seed | reference seed | mean diff | 95% interval | promoted (chosen min_effect) | "
             "promoted (min_effect 0) |", "|---|---|---|---|---|---|---|"]
    for p in cal["pairs"]:
        lines.append(f"| {p['base']} | {p['candidate']} | {p['reference']} | {p['estimate']:+.4f} | {p['interval']} | "
                     f"{'**yes**' if p['promoted'] else 'no'} | {'yes' if p['promoted_at_0'] else 'no'} |")
    n = len(cal["pairs"])
    lines += ["", f"Promoted: **{sum(p['promoted'] for p in cal['pairs'])} of {n}** independent seed-only pairs with "
              f"min_effect {cal['min_effect']:.3f}; {sum(p['promoted_at_0'] for p in cal['pairs'])} of {n} with 0."]
    return lines


def decoding_sweep(args, trials: list[Trial], base_over: dict[int, list[str]], test: Path) -> list[str]:
    """The custom metrics of the given adapters decoded with each frequency penalty of PENALTIES (the setting
    serving.decoding applies alike to evaluation and serving): where the configured value sits."""
    lines = ["| base build | seed | frequency_penalty | xml_valid | char_ngram_f1 | field_f1 |", "|---|---|---|---|---|---|"]
    for t in trials:
        for pen in PENALTIES:
            lp = _loaded(args, base_over[t.base_seed] + [f"project.seed={t.seed}", f"serving.decoding.frequency_penalty={pen}"])
            res = evaluate(lp, base_model(lp).with_adapter(f"sweep-b{t.base_seed}-s{t.seed}", str(t.adapter)),
                           suites=("custom",), test_file=test, backend="hf", **as_served(lp))
            m = res.metrics
            lines.append(f"| {t.base_seed} | {t.seed} | {pen:g} | {m['eval/custom/screens/xml_valid']:.2f} | "
                         f"{m['eval/custom/screens/char_ngram_f1']:.4f} | {m['eval/custom/screens/field_f1']:.4f} |")
            print(f"[bench-gate] sweep base {t.base_seed} seed {t.seed} penalty {pen:g}: xml_valid "
                  f"{m['eval/custom/screens/xml_valid']:.2f}", flush=True)
    return lines


def config_line(rule: GateRule, min_effect: float) -> str:
    return (f"    - {{name: {rule.name}, kind: improvement, metric: {rule.metric}, confidence: {rule.confidence:g}, "
            f"min_effect: {min_effect:.3f}}}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--seeds", default=None, help=f"training seeds (default {SEEDS}; --calibrate: 42..47)")
    ap.add_argument("--base-seeds", default=None,
                    help="base-model build seeds (default: the configured build seed and the next one; --calibrate: "
                         "the configured base only)")
    ap.add_argument("--calibrate", action="store_true",
                    help="make calibrate-gate: the configured recipe's seeds, min_effect and the config line only")
    ap.add_argument("--reference-recipe", default="finetune.max_steps=100",
                    help="space-separated overrides of the weaker recipe the real improvement is measured against "
                         "('' skips it)")
    ap.add_argument("--reference-seeds", type=int, default=3, help="seeds of the reference recipe (first base build)")
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=2, help="trainings of the first seed for reproducibility (0: skip)")
    ap.add_argument("--sweep-seeds", type=int, default=2,
                    help="seeds per base build whose adapters are decoded with each frequency penalty (0: no sweep)")
    ap.add_argument("--only-sweep", action="store_true",
                    help="the decoding sweep alone (trains or reuses the first --sweep-seeds seeds), printed")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    loaded = load_from_args(args)
    rule = improvement_rule(loaded)
    target = args.target = rule.metric
    seeds = [int(s) for s in (args.seeds or ("42,43,44,45,46,47" if args.calibrate else SEEDS)).split(",")]
    build_seed = loaded.config.base_model.build.seed
    base_seeds = ([int(s) for s in args.base_seeds.split(",")] if args.base_seeds else
                  [build_seed] if args.calibrate else [build_seed, build_seed + 1])
    prepared = prepare_dataset(loaded)
    test = prepared.path / "test.jsonl"
    t_start = time.time()

    # 1. the recipe on every seed and base build, each gated against its own base
    trials: dict[int, list[Trial]] = {}
    bases: dict[int, EvalResult] = {}
    base_over: dict[int, list[str]] = {}
    if args.only_sweep:
        firsts = []
        for b in base_seeds:
            base_over[b] = base_overrides(args, loaded, b)
            firsts += [train_and_evaluate(args, "recipe", base_over[b], b, s, test, prepared)
                       for s in seeds[:args.sweep_seeds]]
        print("\n".join(decoding_sweep(args, firsts, base_over, test)))
        return 0
    for b in base_seeds:
        base_over[b] = base_overrides(args, loaded, b)
        lb = _loaded(args, base_over[b])
        bases[b] = evaluate(lb, base_model(lb), test_file=test, backend="hf", **as_served(lb))
        trials[b] = []
    for s in seeds:  # seed by seed across the builds: a run stopped early has evidence from both
        for b in base_seeds:
            trials[b].append(train_and_evaluate(args, "recipe", base_over[b], b, s, test, prepared))
    verdicts = {(t.base_seed, t.seed): gate_pair(_loaded(args, base_over[t.base_seed]), t, bases[t.base_seed],
                                                 f"base build {t.base_seed}")
                for ts in trials.values() for t in ts}
    cal = calibration(trials, target, rule, loaded, split=not args.calibrate)

    recipe_lines = ["| base build | seed | final val loss | xml_valid | " + target.removeprefix("eval/") +
                    " | gate vs its base (configured rules) | decided by |", "|---|---|---|---|---|---|---|"]
    xml = []
    for b, ts in trials.items():
        for t in ts:
            d = verdicts[(b, t.seed)]
            m = t.result.metrics
            xml.append(m["eval/custom/screens/xml_valid"])
            recipe_lines.append(f"| {b} | {t.seed} | {t.manifest.get('final_val_loss') or float('nan'):.3f} | "
                                f"{m['eval/custom/screens/xml_valid']:.2f} | {m[target]:.4f} | "
                                f"{'**pass**' if d.passed else 'FAIL'} | {d.decided_by[:90]} |")
    passed = sum(d.passed for d in verdicts.values())
    summary = (f"{len(xml)} runs ({len(seeds)} seeds x {len(base_seeds)} base builds): minimum xml_valid "
               f"**{min(xml):.2f}** (mean {np.mean(xml):.3f}); the gate against the base passed **{passed} of "
               f"{len(verdicts)}**.")

    if args.calibrate:
        lines = [f"make calibrate-gate: recipe = profile `{loaded.profile}` ({' '.join(args.overrides) or 'as configured'}), "
                 f"seeds {seeds}, base build {base_seeds}.", "", *recipe_lines, "", summary, "",
                 *calibration_lines(cal, rule, target), "",
                 "Paste into configs/pipeline.yaml, gate.rules (replacing the improvement rule):", "",
                 config_line(rule, cal["min_effect"])]
        print("\n".join(lines))
        return 0

    # 2./3. simulation with the seed effect kept: every within-build seed pair's whole per-item differences, both ways
    pools = []
    for ts in trials.values():
        for a, b in itertools.combinations(ts, 2):
            d = np.subtract(*paired_scores(item_scores(a.result.items_path, target), item_scores(b.result.items_path, target)))
            pools += [d, -d]
    n_eval = len(pools[0])
    sizes = [max(1, n_eval // 2), n_eval, 2 * n_eval]
    min_effects = sorted({0.0, rule.min_effect, cal["min_effect"]})
    sim = simulate(loaded, rule, pools, sizes, EFFECTS, args.trials, min_effects)
    png = plot_power(sim, sizes, EFFECTS, min_effects, PLOT if not args.no_write else Path(tempfile.mkdtemp()) / "p.png")

    sweep = (decoding_sweep(args, [t for ts in trials.values() for t in ts[:args.sweep_seeds]], base_over, test)
             if args.sweep_seeds else [])

    # 4. a real improvement and reproducibility (first base build)
    b0 = base_seeds[0]
    better_rows = []
    if args.reference_recipe.strip() and args.reference_seeds > 0:
        weaker = [train_and_evaluate(args, "reference-recipe", base_over[b0] + args.reference_recipe.split(), b0, s, test,
                                     prepared) for s in seeds[:args.reference_seeds]]
        for c, r in itertools.product(trials[b0][:args.reference_seeds], weaker):
            d = gate_pair(_loaded(args, base_over[b0]), c, r.result, f"reference recipe seed {r.seed}")
            i = next(x for x in d.rules if x.kind == "improvement")
            better_rows.append(f"| recipe seed {c.seed} | reference recipe seed {r.seed} | "
                               f"{'**yes**' if d.passed else 'no'} | {i.estimate:+.4f} | {i.interval()} |")
    repro_rows, eval_twice = [], None
    work = Path(tempfile.mkdtemp(prefix="bench-gate-", dir=ROOT / "models"))
    try:
        if args.repeats > 1:
            first = trials[b0][0]
            for i in range(1, args.repeats):
                again = train_and_evaluate(args, f"repeat{i}", base_over[b0], b0, first.seed, test, prepared,
                                           output_root=work / f"repeat{i}", eval_root=work / f"eval{i}")
                quality = {k for k in first.result.metrics if "per_s" not in k}  # speeds vary, scores must not
                repro_rows.append({
                    "repeat": i + 1, "adapter_max_abs_diff": adapter_max_diff(first.adapter, again.adapter),
                    "val_loss": again.manifest.get("final_val_loss"), "first_val_loss": first.manifest.get("final_val_loss"),
                    "metrics_equal": all(again.result.metrics.get(k) == first.result.metrics[k] for k in quality)})
            lf = _loaded(args, base_over[b0] + [f"project.seed={first.seed}"])
            fresh = evaluate(lf, base_model(lf).with_adapter("again", str(first.adapter)), test_file=test, backend="hf",
                             out_root=work / "eval-again", sampling=lf.config.serving.decoding.non_default())
            eval_twice = _items(fresh) == _items(first.result)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"Configured gate: {len(loaded.config.gate.rules)} rules; target metric `{target}`, improvement rule "
             f"min_effect {rule.min_effect:g}, confidence {rule.confidence}, gate.min_items {loaded.config.gate.min_items}, "
             f"{loaded.config.gate.bootstrap_samples} bootstrap resamples; {n_eval} evaluated items on the target. "
             f"Recipe = the configured profile `{loaded.profile}`; seeds {seeds}; base builds (base_model.build.seed) "
             f"{base_seeds}; CPU: this machine's.", "",
             "### The recipe on every seed and base build, gated against its own base", "", *recipe_lines, "", summary,
             "", "### min_effect from a real null: chosen on half the seeds, validated on the other half", "",
             *calibration_lines(cal, rule, target), "",
             f"### Simulation: {args.trials} trials per cell, whole per-item differences of `{target}` between two seeds "
             "of one base build (the seed effect kept), resampled, a known effect added", "",
             "| min_effect | items | " + " | ".join(f"effect {e:+.2f}" for e in EFFECTS) + " |",
             "|---|---|" + "---|" * len(EFFECTS)]
    for me in min_effects:
        for n in sizes:
            cells = []
            for e in EFFECTS:
                rate = sim[(me, n, e)]
                lo, hi = wilson(rate, args.trials)
                cells.append(f"{rate:.1%} [{lo:.1%}, {hi:.1%}]")
            tag = " (chosen)" if me == cal["min_effect"] else " (configured)" if me == rule.min_effect else ""
            lines.append(f"| {me:g}{tag} | {n}{' (evaluated)' if n == n_eval else ''} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: promotion rate [95% Wilson interval]. Effect 0 = false promotion (goal <= 5%); other effects = "
              f"power. Plot: `docs/{PLOT.name}`.", ""]
    if sweep:
        lines += ["### Decoding: the same adapters with each `serving.decoding.frequency_penalty` (configured: "
                  f"{loaded.config.serving.decoding.frequency_penalty:g})", "", *sweep, ""]
    if better_rows:
        lines += [f"### A real improvement: the recipe vs `{args.reference_recipe}` (base build {b0})", "",
                  "| candidate | reference | promoted (all rules) | target: mean diff | interval |", "|---|---|---|---|---|",
                  *better_rows, ""]
    if repro_rows:
        lines += ["### Reproducibility: the same config, seed and code trained again", "",
                  "| run | adapter max abs diff vs run 1 | final val loss (run 1) | all metrics equal |", "|---|---|---|---|"]
        for r in repro_rows:
            lines.append(f"| {r['repeat']} | {r['adapter_max_abs_diff']:.3g} | {r['val_loss']} ({r['first_val_loss']}) | "
                         f"{'yes' if r['metrics_equal'] else 'NO'} |")
        lines += ["", f"The same adapter evaluated twice from scratch: per-item scores "
                  f"{'identical' if eval_twice else 'DIFFER'}.", ""]
    lines.append(f"Wall time {time.time() - t_start:.0f} s.")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("gate", "The default recipe's margin and the gate's error rates",
                       "make bench-gate" + (f" ARGS=\"{' '.join(argv if argv is not None else sys.argv[1:])}\""
                                            if (argv if argv is not None else sys.argv[1:]) else ""), body)
        _log_mlflow(loaded, body, png, cal, passed, len(verdicts), min(xml), sim, sizes, n_eval)
    return 0


def _log_mlflow(loaded, body, png, cal, passed, runs, min_xml, sim, sizes, n_eval) -> None:
    import mlflow

    from workspace.tracking import stage_run

    with stage_run(loaded, "bench-gate"):
        mlflow.log_metrics({"bench_gate/recipe_passed": passed, "bench_gate/recipe_runs": runs,
                            "bench_gate/min_xml_valid": min_xml, "bench_gate/seed_sd": cal["sd"],
                            "bench_gate/min_effect": cal["min_effect"],
                            "bench_gate/null_promoted": sum(p["promoted"] for p in cal["pairs"]),
                            "bench_gate/null_pairs": len(cal["pairs"])})
        for (me, n, e), rate in sim.items():
            if n == n_eval:
                mlflow.log_metric(f"bench_gate/sim_me{me:g}_e{e:.2f}", rate)
        mlflow.log_text(body, "bench_gate/report.md")
        mlflow.log_artifact(str(png), "bench_gate")

