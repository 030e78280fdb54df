"""The gate's error rates, measured (make bench-gate):

    .venv/bin/python -m flows.bench_gate [--seeds 42,43,44] [--reference-recipe finetune.max_steps=100]
                                         [--trials 500] [--repeats 3] [--no-write]

1. Real training noise. The configured recipe is trained with each seed, and a second recipe (the reference
   recipe: by default the same with 100 instead of 300 steps) with the same seeds; every run is evaluated on the
   same items (finetune and evaluation are cached by their keys: a rerun trains nothing new).
   - the real null: every seed of the recipe gated against every other seed as if it were the champion (the full
     configured rule set, `eval.gate.decide`): how many are promoted;
   - a real improvement: every seed of the recipe gated against every seed of the reference recipe;
   - the seed-to-seed spread of each candidate metric (what `min_effect` and the target metric are chosen from);
   - the same recipe and seeds with the other LoRA method (qlora <-> lora), side by side.
2. Simulation from the real per-item scores. The per-item differences of the target metric between two seeds of
   the same recipe (centred: the true effect is exactly 0, the item-level disagreement is real) are resampled to
   n items, a known effect is added, and the improvement rule decides; `--trials` trials per (effect, n), for the
   evaluated item count and 0.5x and 2x of it, with the configured `min_effect` and with 0 (item noise only).
   False promotion = the rate at effect 0; power = the rate at each effect.
3. Reproducibility: the recipe's first seed trained `--repeats` times in all (fresh folders) and each adapter
   compared tensor by tensor and evaluated afresh; one adapter evaluated twice from scratch.

Writes docs/BENCHMARKS.md (section gate), docs/gate_power.png, and a `bench-gate` MLflow run with both.
Lives in flows/ because it wires stages (prepare, finetune, evaluate, gate).
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workspace import offline

offline.apply()

from eval.evaluate import EvalResult, evaluate  # noqa: E402
from eval.gate import decide, improvement_result, item_scores, paired_scores  # noqa: E402
from finetune.finetune_stage import run_finetune  # noqa: E402
from finetune.prepare import prepare_dataset  # noqa: E402
from workspace.benchmarks import update_section  # noqa: E402
from workspace.config import GateRule, LoadedConfig, add_cli_args, load_config, load_from_args  # noqa: E402
from workspace.model_ref import base_model  # noqa: E402
from workspace.paths import ROOT  # noqa: E402

SPREAD_METRICS = ["custom/screens/field_f1", "custom/screens/char_ngram_f1", "custom/screens/xml_valid",
                  "custom/screens/xml_structure"]
EFFECTS = [0.0, 0.02, 0.05, 0.10]
PLOT = ROOT / "docs" / "gate_power.png"


@dataclass
class Trial:
    recipe: str
    seed: int
    adapter: Path
    manifest: dict
    result: EvalResult


def _loaded(args, overrides: list[str]) -> LoadedConfig:
    return load_config(args.config, profile=args.profile, overrides=list(args.overrides) + overrides)


def train_and_evaluate(args, recipe: str, overrides: list[str], seed: int, test: Path, prepared, *,
                       output_root: Path | None = None, eval_root: Path | None = None) -> Trial:
    loaded = _loaded(args, overrides + [f"project.seed={seed}"])
    t0 = time.time()
    run = run_finetune(loaded, prepared.path, prepared.content_hash, output_root=output_root)
    print(f"[bench-gate] {recipe} seed {seed}: {'cached' if run.skipped else 'trained'} {run.output_dir.name} "
          f"({time.time() - t0:.0f} s)", flush=True)
    ref = base_model(loaded).with_adapter(f"{recipe}-s{seed}", str(run.output_dir))
    res = evaluate(loaded, ref, test_file=test, backend="hf", out_root=eval_root)
    return Trial(recipe, seed, run.output_dir, run.manifest, res)


def gate_pair(loaded: LoadedConfig, cand: Trial, ref: Trial):
    return decide(loaded.config.gate, cand.result.metrics, ref.result.metrics, cand.result.items_path,
                  ref.result.items_path, cand.manifest.get("verification") or {}, f"{ref.recipe} seed {ref.seed}")


def improvement_rule(loaded: LoadedConfig) -> GateRule:
    rules = [r for r in loaded.config.gate.rules if r.kind == "improvement"]
    if not rules:
        raise SystemExit("bench-gate: the configured gate has no improvement rule to measure")
    return rules[0]


def simulate(loaded: LoadedConfig, rule: GateRule, pools: list[np.ndarray], sizes: list[int], effects: list[float],
             trials: int, min_effects: list[float], seed: int = 0) -> dict:
    """Promotion rate per (min_effect, n, effect) of the improvement rule on resampled real differences."""
    cfg = loaded.config.gate
    rng = np.random.default_rng(seed)
    centred = [p - p.mean() for p in pools]
    out: dict = {}
    total = len(min_effects) * len(sizes) * len(effects)
    done = 0
    for me in min_effects:
        r = rule.model_copy(update={"min_effect": me})
        for n in sizes:
            for eff in effects:
                promoted = 0
                for t in range(trials):
                    pool = centred[rng.integers(len(centred))]
                    d = rng.choice(pool, size=n, replace=True) + eff
                    promoted += improvement_result(r, rule.metric, d, np.zeros(n), cfg, seed=t).passed
                out[(me, n, eff)] = promoted / trials
                done += 1
                print(f"[bench-gate] simulation {done}/{total}: min_effect {me}, n {n}, effect {eff:+.2f}: "
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
        ax.set_xlabel("true effect on the target metric")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--reference-recipe", default="finetune.max_steps=100",
                    help="space-separated overrides of the weaker recipe the real improvement is measured against")
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3, help="trainings of the first seed for reproducibility (0: skip)")
    ap.add_argument("--no-other-method", action="store_true",
                    help="skip training the recipe's seeds with the other LoRA method (qlora <-> lora)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    loaded = load_from_args(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    ref_overrides = args.reference_recipe.split()
    rule = improvement_rule(loaded)
    target = rule.metric
    prepared = prepare_dataset(loaded)
    test = prepared.path / "test.jsonl"
    t_start = time.time()

    # 1. real training noise
    recipe = [train_and_evaluate(args, "recipe", [], s, test, prepared) for s in seeds]
    weaker = [train_and_evaluate(args, "reference-recipe", ref_overrides, s, test, prepared) for s in seeds]
    method = loaded.config.finetune.method
    other = {"lora": "qlora", "qlora": "lora"}.get(method)
    other_runs = []
    if other and not args.no_other_method:  # the same recipe and seeds with the other LoRA method (cached by key)
        over = [f"finetune.method={other}", "finetune.quantization_bit=" + ("4" if other == "qlora" else "null")]
        other_runs = [train_and_evaluate(args, "recipe", over, s, test, prepared) for s in seeds]
    null = [(c, r, gate_pair(loaded, c, r)) for c, r in itertools.permutations(recipe, 2)]
    better = [(c, r, gate_pair(loaded, c, r)) for c, r in itertools.product(recipe, weaker)]

    def imp(d):
        return next(x for x in d.rules if x.kind == "improvement")

    def worst_upper(d) -> str:  # no_regression: the largest one-sided 95% upper bound of reference - candidate
        bounds = [-x.ci_low for x in d.rules if x.kind == "no_regression" and x.ci_low is not None]
        return f"{max(bounds):+.3f}" if bounds else "-"

    def row(c_name, r_name, d) -> str:
        i = imp(d)
        est = "-" if i.estimate is None else f"{i.estimate:+.4f}"
        without = "-" if i.ci_low is None else ("would pass" if i.ci_low > 0 else "fails too")
        return (f"| {c_name} | {r_name} | {'**yes**' if d.passed else 'no'} | {'pass' if i.passed else 'fail'} | {without} | "
                f"{est} | {i.interval()} | {worst_upper(d)} | {d.decided_by[:100]} |")

    spread = {}
    for m in SPREAD_METRICS:
        vals = [t.result.metrics.get(f"eval/{m}") for t in recipe]
        wvals = [t.result.metrics.get(f"eval/{m}") for t in weaker]
        if None in vals or None in wvals:
            continue
        pair = [a - b for a, b in itertools.permutations(vals, 2)]
        spread[m] = {"values": vals, "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                     "max_pair": float(max(abs(p) for p in pair)) if pair else 0.0,
                     "weaker": wvals, "gain": float(np.mean(vals) - np.mean(wvals))}

    # 2. simulation from the real per-item differences between seeds
    pools = [np.subtract(*paired_scores(item_scores(a.result.items_path, target), item_scores(b.result.items_path, target)))
             for a, b in itertools.combinations(recipe, 2)]
    n_eval = len(pools[0])
    sizes = [max(1, n_eval // 2), n_eval, 2 * n_eval]
    min_effects = sorted({0.0, rule.min_effect})
    sim = simulate(loaded, rule, pools, sizes, EFFECTS, args.trials, min_effects)
    png = plot_power(sim, sizes, EFFECTS, min_effects, PLOT if not args.no_write else Path(tempfile.mkdtemp()) / "p.png")

    # 3. reproducibility
    repro_rows, eval_twice = [], None
    work = Path(tempfile.mkdtemp(prefix="bench-gate-", dir=ROOT / "models"))
    try:
        if args.repeats > 1:
            first = recipe[0]
            for i in range(1, args.repeats):
                again = train_and_evaluate(args, f"repeat{i}", [], first.seed, test, prepared,
                                           output_root=work / f"repeat{i}", eval_root=work / f"eval{i}")
                quality = {k for k in first.result.metrics if "per_s" not in k}  # speeds vary, scores must not
                repro_rows.append({
                    "repeat": i + 1, "adapter_max_abs_diff": adapter_max_diff(first.adapter, again.adapter),
                    "val_loss": again.manifest.get("final_val_loss"), "first_val_loss": first.manifest.get("final_val_loss"),
                    "target": again.result.metrics.get(target), "first_target": first.result.metrics.get(target),
                    "metrics_equal": all(again.result.metrics.get(k) == first.result.metrics[k] for k in quality),
                })
            fresh = evaluate(_loaded(args, [f"project.seed={first.seed}"]),
                             base_model(loaded).with_adapter("again", str(first.adapter)), test_file=test,
                             backend="hf", out_root=work / "eval-again")
            eval_twice = _items(fresh) == _items(first.result)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # report
    HEAD = ("| candidate | reference | promoted (all rules) | improvement rule | the same rule with min_effect 0 | "
            "target: mean diff | interval | KoBEST: worst 95% upper bound of reference - candidate | decided by |")
    SEP = "|---|---|---|---|---|---|---|---|---|"
    promoted_null = sum(d.passed for _, _, d in null)
    promoted_better = sum(d.passed for _, _, d in better)
    lines = [f"Configured gate: {len(loaded.config.gate.rules)} rules; target metric `{target}`, improvement rule "
             f"min_effect {rule.min_effect}, confidence {rule.confidence}, gate.min_items {loaded.config.gate.min_items}, "
             f"{loaded.config.gate.bootstrap_samples} bootstrap resamples; {n_eval} evaluated items on the target. "
             f"Recipe = the configured profile `{loaded.profile}`; reference recipe = `{args.reference_recipe}`; seeds {seeds}.",
             "", "### Real training noise: seeds of one recipe gated against each other (the real null)", "",
             HEAD, SEP]
    for c, r, d in null:
        lines.append(row(f"seed {c.seed}", f"seed {r.seed}", d))
    lines += ["", f"Promoted: **{promoted_null} of {len(null)}** seed-only candidates.", "",
              "### A real improvement: the recipe vs the reference recipe, every seed against every seed", "",
              HEAD, SEP]
    for c, r, d in better:
        lines.append(row(f"recipe seed {c.seed}", f"reference recipe seed {r.seed}", d))
    lines += ["", f"Promoted: **{promoted_better} of {len(better)}**.", "",
              "### Seed-to-seed spread of the candidate metrics (what the target metric and min_effect are chosen from)", "",
              "| metric | recipe, per seed | SD over seeds | largest seed-pair difference | 2·√2·SD | reference recipe, per seed | recipe gain | gain / (2·√2·SD) |",
              "|---|---|---|---|---|---|---|---|"]
    for m, s in spread.items():
        bar = 2 * np.sqrt(2) * s["sd"]  # two standard deviations of the difference between two seeds' means
        ratio = s["gain"] / bar if bar else float("inf")
        lines.append(f"| {m} | {', '.join(f'{v:.3f}' for v in s['values'])} | {s['sd']:.3f} | {s['max_pair']:.3f} | "
                     f"{bar:.3f} | {', '.join(f'{v:.3f}' for v in s['weaker'])} | {s['gain']:+.3f} | {ratio:.1f} |")
    lines += ["", "2·√2·SD: a difference between two seeds of the same recipe exceeds it about 2.5% of the time if seed "
              f"effects are normal; with {len(seeds)} seeds the SD itself is a rough estimate."]
    if other_runs:
        lines += ["", f"### The same recipe and seeds, {method} vs {other}", "",
                  "| seed | method | quantized layers (seen in training) | training s | final val loss | xml_valid | "
                  "field_f1 | char_ngram_f1 |", "|---|---|---|---|---|---|---|---|"]
        for t in sorted(recipe + other_runs, key=lambda t: (t.seed, t.manifest.get("method"))):
            mc, mm = t.manifest.get("method_check") or {}, t.result.metrics
            layers = f"{mc['quantized_layers']} x {mc['quantized_layer_type']}" if mc.get("quantized_layers") else "none"
            lines.append(f"| {t.seed} | {t.manifest.get('method')} | {layers} | {t.manifest.get('stage_wall_s')} | "
                         f"{t.manifest.get('final_val_loss'):.3f} | {mm['eval/custom/screens/xml_valid']:.2f} | "
                         f"{mm['eval/custom/screens/field_f1']:.3f} | {mm['eval/custom/screens/char_ngram_f1']:.3f} |")
        lines.append("(training s: the training process's wall time when the run was made, on a machine that may "
                     "have been busy; docs/BENCHMARKS.md, finetune, times both methods alone.)")
    lines += ["", f"### Simulation: {args.trials} trials per cell, real per-item differences of `{target}` between "
              "seeds (centred), a known effect added", "",
              "| min_effect | items | " + " | ".join(f"effect {e:+.2f}" for e in EFFECTS) + " |",
              "|---|---|" + "---|" * len(EFFECTS)]
    for me in min_effects:
        for n in sizes:
            cells = []
            for e in EFFECTS:
                rate = sim[(me, n, e)]
                lo, hi = wilson(rate, args.trials)
                cells.append(f"{rate:.1%} [{lo:.1%}, {hi:.1%}]")
            lines.append(f"| {me:g} | {n}{' (evaluated)' if n == n_eval else ''} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: promotion rate [95% Wilson interval]. Effect 0 = false promotion (goal <= 5%); other effects = "
              f"power. Plot: `docs/{PLOT.name}`.", ""]
    if repro_rows:
        lines += ["### Reproducibility: the same config, seed and code trained again", "",
                  "| run | adapter max abs diff vs run 1 | final val loss (run 1) | target (run 1) | all metrics equal |",
                  "|---|---|---|---|---|"]
        for r in repro_rows:
            lines.append(f"| {r['repeat']} | {r['adapter_max_abs_diff']:.3g} | {r['val_loss']} ({r['first_val_loss']}) | "
                         f"{r['target']:.4f} ({r['first_target']:.4f}) | {'yes' if r['metrics_equal'] else 'NO'} |")
        lines += ["", f"The same adapter evaluated twice from scratch: per-item scores "
                  f"{'identical' if eval_twice else 'DIFFER'}.", ""]
    lines.append(f"Wall time {time.time() - t_start:.0f} s.")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("gate", "Gate error rates: real seeds, simulation, reproducibility",
                       "make bench-gate  (python -m flows.bench_gate)", body)
        _log_mlflow(loaded, body, png, promoted_null, len(null), promoted_better, len(better), sim, sizes, n_eval)
    return 0


def _log_mlflow(loaded, body, png, pn, nn, pb, nb, sim, sizes, n_eval) -> None:
    import mlflow

    from workspace.tracking import stage_run

    with stage_run(loaded, "bench-gate"):
        mlflow.log_metrics({"bench_gate/null_promoted": pn, "bench_gate/null_trials": nn,
                            "bench_gate/improvement_promoted": pb, "bench_gate/improvement_trials": nb})
        for (me, n, e), rate in sim.items():
            if n == n_eval:
                mlflow.log_metric(f"bench_gate/sim_me{me:g}_e{e:.2f}", rate)
        mlflow.log_text(body, "bench_gate/report.md")
        mlflow.log_artifact(str(png), "bench_gate")


if __name__ == "__main__":
    raise SystemExit(main())
