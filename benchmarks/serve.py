"""`make bench-serve`: the serving load benchmark of models:/<name>@champion, vLLM (its promoted configuration)
against a baseline on the same weights (`transformers serve`, the adapter merged), step by step: every
concurrency in `serving.bench.concurrency` x every prompt length in `serving.bench.prompt_tokens`, alternating the
two servers. Results: a table, docs/BENCHMARKS.md (section serve), plots and an MLflow child run of the model
version's run (metrics `serve/<step>/<metric>` and `baseline/<step>/<metric>`), the SLO verdict of
`gate.slo`, and vLLM's /metrics cross-checked against the client.

    .venv/bin/python -m llmops bench serve [--set serving.bench.concurrency=[1,5]] [--set serving.bench.baseline=none]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from serving.bench import (BenchError, StepResult, TransformersServer, as_dict, build_prompts, clamp_prompt,
                           merged_model, plot, run_step, slo_rules, workload_texts, write_dataset)
from serving.registry import PromotionError
from serving.serve import champion_model_name, champion_server
from workspace.endpoint import EndpointError
from workspace.vllm_server import ServerError, VllmServer, free_port
from benchmarks.report import update_section
from workspace.config import ConfigError, LoadedConfig, SloConfig, add_cli_args, load_config
from workspace.device import resolve_dtype, serving_device
from workspace.locks import LockBusy
from workspace.paths import CACHE, ROOT, resolve

DOCS = ROOT / "docs"
from workspace.tracking import configure, run_tags


def _fmt(v: float, nd: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{nd}f}"


def run_bench(loaded: LoadedConfig, console: Console, doc: Path | None = None, work_root: Path | None = None) -> dict:
    """The whole benchmark; `doc` is the BENCHMARKS file to update (default docs/BENCHMARKS.md), `work_root` where
    prompts, results, logs and the merged weights go (default .cache/bench-serve)."""
    cfg = loaded.config
    b = cfg.serving.bench
    mlflow = configure(loaded)
    root = work_root or CACHE / "bench-serve"
    work = root / time.strftime("%Y%m%d-%H%M%S")
    server, info = champion_server(loaded, port=free_port(cfg.serving.host), dest=root / "champion")
    base = server.model
    adapter = str(Path(info["folder"]) / "adapter") if info["lora_names"] else None
    model_name = champion_model_name(info)
    texts = workload_texts(resolve(cfg.data.test_source.path) if cfg.data.test_source else None, resolve(cfg.rag.corpus))
    lengths = sorted({clamp_prompt(p, b.output_tokens, cfg.serving.max_model_len) for p in b.prompt_tokens})
    datasets = {}
    for plen in lengths:
        n = max(b.requests_per_step or 0, max(b.concurrency) * 2, 5)
        prompts, _ = build_prompts(base, texts[0], texts[1], plen, n)
        datasets[plen] = write_dataset(work / f"prompts-p{plen}.jsonl", prompts, b.output_tokens)

    baseline = vllm_merged = None
    if b.baseline == "transformers" or b.vllm_merged:
        console.print("[bench] merging the champion's adapter (baseline and vLLM-without-LoRA serve the merged weights) ...")
        merged = merged_model(base, adapter, root / f"merged-v{info['version']}")
        if b.baseline == "transformers":
            baseline = TransformersServer(merged, free_port(cfg.serving.host), work / "transformers-serve.log",
                                          device=serving_device(cfg.serving.engine),
                                          dtype=resolve_dtype(serving_device(cfg.serving.engine), "auto"))
        if b.vllm_merged and adapter:
            vllm_merged = VllmServer(merged, cfg.serving, port=free_port(cfg.serving.host), log_path=work / "vllm-merged.log",
                                     served_model_name="merged")
    results: list[StepResult] = []
    t0 = time.monotonic()
    console.print(f"[bench] starting vLLM (champion v{info['version']}) and the baseline ...")
    server.start()
    try:
        if baseline:
            baseline.start()
        if vllm_merged:
            vllm_merged.start()
        steps = [(plen, c) for plen in lengths for c in sorted(b.concurrency)]
        for i, (plen, c) in enumerate(steps, 1):
            n = b.requests_per_step or max(5, 2 * c)
            targets = [("vllm", server.endpoint(model_name), f"http://{server.host}:{server.port}/metrics")]
            if vllm_merged:
                targets.append(("vllm-merged", vllm_merged.endpoint("merged"),
                                f"http://{vllm_merged.host}:{vllm_merged.port}/metrics"))
            if baseline:
                targets.append(("transformers", baseline.endpoint(), None))
            for who, endpoint, metrics_url in targets:  # alternate the servers step by step
                console.print(f"[bench] step {i}/{len(steps)} {who}: concurrency {c}, ~{plen} prompt tokens, {n} requests")
                r = run_step(server=who, endpoint=endpoint, tokenizer=base, dataset=datasets[plen],
                             concurrency=c, prompt_tokens=plen, requests=n, output_tokens=b.output_tokens,
                             out_dir=work, timeout=b.step_timeout_s, metrics_url=metrics_url)
                results.append(r)
                console.print(f"         TTFT p50 {_fmt(r.ttft_p50_ms)} ms, {_fmt(r.output_tokens_per_s, 1)} out tok/s, "
                              f"{_fmt(r.requests_per_min, 1)} req/min, errors {r.error_rate:.0%}"
                              + (f"  [yellow]cross-check: {r.cross_check}[/]" if r.cross_check and r.cross_check != "no /metrics" else ""))
    finally:
        server.stop()
        if baseline:
            baseline.stop()
        if vllm_merged:
            vllm_merged.stop()
    seconds = round(time.monotonic() - t0, 1)

    # SLO verdict on the step closest to the plan's (concurrency, prompt length)
    slo_step = closest_slo_step(loaded, results)
    slo_rows = slo_rules(slo_step, cfg.gate.slo)

    png = plot(results, work / "serve_bench.png")
    js = work / "serve_bench.json"
    payload = {"champion": info["version"], "run_id": info["run_id"], "registered_model": cfg.tracking.registered_model,
               "model": model_name, "base": base, "seconds": seconds,
               "machine": machine(), "steps": [as_dict(r) for r in results], "slo": slo_rows}
    js.write_text(json.dumps(payload, indent=2, ensure_ascii=False))

    import mlflow as _m

    with _m.start_run(run_name="serve-bench", parent_run_id=info["run_id"], tags=run_tags(loaded, "serve-bench")) as run:
        for r in results:
            prefix = {"vllm": "serve", "vllm-merged": "serve_merged"}.get(r.server, "baseline")
            _m.log_metrics({f"{prefix}/{r.step}/{k}": v for k, v in r.metrics().items()})
        for c, ratio in ratios(results).items():
            _m.log_metrics({f"serve/{c}/{k}": v for k, v in ratio.items()})
        for c, ratio in ratios(results, "vllm-merged").items():
            _m.log_metrics({f"serve_merged/{c}/{k}": v for k, v in ratio.items()})
        _m.log_metric("serve/slo_passed", float(all(x["passed"] for x in slo_rows)))
        _m.log_artifact(str(js), "serve-bench")
        if png:
            _m.log_artifact(str(png), "serve-bench")
    table, md = report(results, slo_rows, slo_step, info, seconds, slo_rules(slo_step, SloConfig()))
    console.print(table)
    if png and doc is None:  # the plot beside the numbers (docs/serve_bench.png)
        import shutil

        shutil.copyfile(png, DOCS / "serve_bench.png")
        md += "\n![latency and throughput against concurrency](serve_bench.png)\n"
    update_section("serve", "Serving load benchmark: vLLM vs transformers serve, SLO, /metrics cross-check",
                   "make bench-serve", md, **({"doc": doc} if doc else {}))
    console.print(f"[bench] {doc or 'docs/BENCHMARKS.md'} (serve) updated; MLflow run {run.info.run_id}; plot {png}")
    return {**payload, "run_id": run.info.run_id, "png": str(png) if png else None}


def closest_slo_step(loaded: LoadedConfig, results: list[StepResult]) -> StepResult:
    """The vLLM step nearest the SLO's (concurrency, prompt length): the one the SLO verdict is read from."""
    cfg = loaded.config
    slo_len = clamp_prompt(cfg.gate.slo.prompt_tokens, cfg.serving.bench.output_tokens, cfg.serving.max_model_len)
    return min((r for r in results if r.server == "vllm"),
               key=lambda r: (abs(r.concurrency - cfg.gate.slo.concurrency), abs(r.prompt_tokens - slo_len)))


def ratios(results: list[StepResult], server: str = "vllm") -> dict[str, dict[str, float]]:
    """`server` / baseline per step: output tokens/s (higher is better) and TTFT p50 (baseline / server)."""
    out = {}
    by = {(r.server, r.step): r for r in results}
    for (who, step), v in by.items():
        t = by.get(("transformers", step))
        if who != server or t is None:
            continue
        ratio = {}
        if t.output_tokens_per_s > 0:
            ratio["ratio_output_tokens_per_s"] = v.output_tokens_per_s / t.output_tokens_per_s
        if v.ttft_p50_ms and not math.isnan(v.ttft_p50_ms) and not math.isnan(t.ttft_p50_ms):
            ratio["ratio_ttft_p50_speedup"] = t.ttft_p50_ms / v.ttft_p50_ms
        out[step] = ratio
    return out


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}"


def report(results: list[StepResult], slo_rows: list[dict], slo_step: StepResult, info: dict, seconds: float,
           plan_rows: list[dict] | None = None):
    cols = ("server", "conc.", "prompt tok", "req", "TTFT p50", "p95", "p99", "TPOT p50", "E2E p50", "out tok/s",
            "req/min", "errors", "vLLM /metrics check")
    t = Table(title=f"serving load benchmark: champion v{info['version']} ({seconds} s)")
    for c in cols:
        t.add_column(c, justify="right")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = {"vllm": 0, "vllm-merged": 1, "transformers": 2}
    for r in sorted(results, key=lambda r: (r.prompt_tokens, r.concurrency, order.get(r.server, 3))):
        check = "-" if not r.server.startswith("vllm") else (r.cross_check or "agrees within 10%")
        row = (r.server, str(r.concurrency), _fmt(r.mean_input_tokens), str(r.requests), _fmt(r.ttft_p50_ms),
               _fmt(r.ttft_p95_ms), _fmt(r.ttft_p99_ms), _fmt(r.tpot_p50_ms, 1), _fmt(r.e2el_p50_ms),
               _fmt(r.output_tokens_per_s, 1), _fmt(r.requests_per_min, 1), f"{r.error_rate:.0%}", check)
        t.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    def key(step: str) -> tuple[int, int]:
        c, p = step[1:].split("_p")
        return int(p), int(c)

    rlines = []
    for who in ("vllm", "vllm-merged"):
        for step, v in sorted(ratios(results, who).items(), key=lambda kv: key(kv[0])):
            rlines.append(f"| {who} | {step} | {v.get('ratio_output_tokens_per_s', float('nan')):.2f}x | "
                          f"{v.get('ratio_ttft_p50_speedup', float('nan')):.2f}x |")

    def slo_md(rows: list[dict]) -> str:
        return "\n".join(f"- {x['name']}: {_fmt(x['value'], 2)} vs {x['threshold']:g} -> {'pass' if x['passed'] else '**FAIL**'} "
                         f"({x['detail']})" for x in rows)

    md = (f"Servers on 127.0.0.1, the load tool (`vllm bench serve`, streamed chat completions, custom prompts: held-out "
          f"screen requests padded with RAG passages) on the same machine. Champion v{info['version']} served by vLLM "
          f"(base + LoRA adapter, its promoted configuration; `vllm-merged`: the same weights merged, no LoRA) vs "
          f"`transformers serve` on the merged weights, alternating step by step; {seconds} s in all. Times in ms.\n\n"
          + "\n".join(lines)
          + "\n\nRatios against the transformers baseline (output tokens/s: higher is better for vLLM; TTFT: baseline/vLLM):\n\n"
          + "| server | step | output tokens/s | TTFT p50 |\n|---|---|---|---|\n" + "\n".join(rlines)
          + "\n\nReading it: `transformers serve` sends an empty `role` chunk before it computes anything and "
          "`vllm bench serve` takes the first chunk as the first token, so the baseline's TTFT is understated (its "
          "end-to-end latency and throughput are not); vLLM's TTFT agrees with its own /metrics."
          + lora_cost(results) + "\n"
          + f"\nSLO of this profile (gate.slo) on step {slo_step.step}:\n" + slo_md(slo_rows) + "\n"
          + ("\nThe service plan's KPIs (the schema defaults: TTFT p50 < 1.5 s at 2k, >= 30 requests/min at 5 "
             "sessions, < 1% errors) on the same step:\n" + slo_md(plan_rows) + "\n" if plan_rows else ""))
    return t, md


def lora_cost(results: list[StepResult]) -> str:
    """What THIS run measured about serving the adapter as a LoRA module vs merged (nothing when not measured)."""
    by = {(r.server, r.step): r for r in results}
    speedups = [by[("vllm-merged", step)].output_tokens_per_s / r.output_tokens_per_s
                for (who, step), r in by.items() if who == "vllm" and ("vllm-merged", step) in by and r.output_tokens_per_s > 0]
    if not speedups:
        return ""
    return (f" In this run the merged weights gave {min(speedups):.1f}-{max(speedups):.1f}x the output tokens/s of the "
            f"same adapter served as a LoRA module on vLLM ({len(speedups)} steps).")


def render_saved(loaded: LoadedConfig, path: Path) -> int:
    """The report of a finished run again (e.g. after a wording change), from its serve_bench.json."""
    data = json.loads(path.read_text())
    fields = set(StepResult.__dataclass_fields__)
    results = [StepResult(**{k: v for k, v in s.items() if k in fields}) for s in data["steps"]]
    slo_step = closest_slo_step(loaded, results)
    _, md = report(results, slo_rules(slo_step, loaded.config.gate.slo), slo_step, {"version": data["champion"]}, data["seconds"],
                   slo_rules(slo_step, SloConfig()))
    md += f"\n(Rendered again from the results of the run in {path.parent.name}, with the current gate.slo.)\n"
    if (DOCS / "serve_bench.png").exists():
        md += "\n![latency and throughput against concurrency](serve_bench.png)\n"
    update_section("serve", "Serving load benchmark: vLLM vs transformers serve, SLO, /metrics cross-check",
                   "make bench-serve", md)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--render", default=None, help="re-render docs/BENCHMARKS.md from a saved serve_bench.json (no run)")
    args = ap.parse_args(argv)
    try:
        if args.render:
            return render_saved(load_config(args.config, args.profile, args.overrides), Path(args.render))
        console = Console()
        run_bench(load_config(args.config, args.profile, args.overrides), console if console.is_terminal else Console(width=200))
    except (ConfigError, PromotionError, ServerError, BenchError, LockBusy, EndpointError) as exc:
        print(f"[error] {exc}", file=sys.stderr)
        return 2
    return 0

