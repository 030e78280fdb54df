"""One `evaluate(model, suites)` for base, candidate and champion alike, on identical items.

Suites: `kobest` (lm-evaluation-harness, eval/kobest.py) and `custom` (greedy generations on the held-out test
split scored by DeepEval metrics, eval/metrics.py, plus the LLM judge when configured). Writes per-item results
(JSONL), aggregate metrics named `eval/<suite>/<task>/<metric>`, generation speed, and is cached by (the model
reference's fingerprint, task data hash, task config hash, eval config, backend). `compare_report` writes the
Markdown report and the comparison plot. Called by eval/evaluate_stage.py and eval/gate_stage.py; tests call it
directly.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from workspace.config.load import LoadedConfig
from workspace.config.pipeline import adapter_mode
from workspace.device import require_cuda, resolve_dtype
from workspace.endpoint import Endpoint
from workspace.fsutil import swap_in
from workspace.model_ref import ModelRef, adapter_rank
from workspace.paths import CONFIGS, resolve

from eval.kobest import EvalError, local_files, run_kobest

EVAL_VERSION = "1"
SUITES = ("kobest", "custom")
SCORER_MODULES = ("evaluate.py", "kobest.py", "generate.py", "metrics.py", "judge.py")


@dataclass
class EvalResult:
    model: ModelRef
    metrics: dict[str, float]
    items_path: Path
    out_dir: Path
    cached: bool
    info: dict = field(default_factory=dict)


def _files_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.name).encode())
        h.update(hashlib.sha256(p.read_bytes()).digest() if p.exists() else b"missing")
    return h.hexdigest()[:16]


def served_merged(loaded: LoadedConfig, model: ModelRef) -> Optional[str]:
    """The merged model to score through vLLM when serving.adapter_mode resolves to merged and the finetune run
    made one (its manifest's merged_model): evaluation through vLLM scores what will be served."""
    if not model.adapter or adapter_mode(loaded.config)[0] != "merged":
        return None
    manifest = Path(model.adapter) / "manifest.json"
    merged = json.loads(manifest.read_text()).get("merged_model") if manifest.exists() else None
    if not merged:  # a registered version: its folder holds merged/ beside adapter/
        sibling = Path(model.adapter).parent / "merged"
        merged = str(sibling) if (sibling / "config.json").exists() else None
    return merged if merged and (Path(merged) / "config.json").exists() else None


def scoring_hash() -> str:
    """The task files and the code that computes a score (not the stages): part of every evaluation's key, and of
    the gate's, which decides on those scores."""
    scorer_code = [Path(__file__).with_name(n) for n in SCORER_MODULES]
    return _files_hash([p for p in (CONFIGS / "tasks").glob("*") if p.is_file()] + scorer_code)


def cache_key(loaded: LoadedConfig, model: ModelRef, suites: tuple[str, ...], test_file: Optional[Path], backend: str,
              sampling: dict) -> str:
    cfg = loaded.config.eval
    data = []
    if "kobest" in suites and cfg.kobest_source == "local":
        for task in cfg.kobest_tasks:
            data += list(local_files(task, resolve(cfg.kobest_dir)).values())
    if "custom" in suites and test_file:
        data.append(Path(test_file))
    parts = {"model": model.fingerprint(), "data": _files_hash(data), "tasks": scoring_hash(),
             "eval": cfg.model_dump(mode="json"), "suites": sorted(suites), "backend": backend, "version": EVAL_VERSION}
    if sampling:  # generations decode as served (keys without it are unchanged)
        parts["decoding"] = sampling
    if backend == "vllm" and served_merged(loaded, model):
        parts["served"] = "merged"  # merged weights score (slightly) differently from the LoRA module
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _custom_suite(loaded: LoadedConfig, model: ModelRef, test_file: Path, backend: str, endpoint: Optional[Endpoint],
                  partial: Path, sampling: dict, progress=None) -> tuple[dict[str, float], list[dict], dict]:
    from deepeval.test_case import LLMTestCase

    from eval.generate import generate_hf, generate_openai, load_items
    from eval.judge import JudgeUnavailable, check_judge, judge_metric, score_with_judge
    from eval.metrics import build_metrics

    cfg = loaded.config.eval
    items = load_items(test_file, cfg.custom_limit)
    if not items:
        raise EvalError(f"custom suite: {test_file} has no items")
    try:
        if backend == "hf":
            gens = generate_hf(model.base, model.adapter, items, cfg.max_new_tokens, device=cfg.device,
                               dtype=resolve_dtype(cfg.device, cfg.dtype), progress=progress, sampling=sampling)
        else:
            gens = generate_openai(endpoint, items, cfg.max_new_tokens, progress=progress, sampling=sampling)
    except Exception as exc:  # noqa: BLE001 - name the model/endpoint that failed
        where = endpoint.base_url if endpoint else f"{model.base} (adapter {model.adapter or '-'})"
        raise EvalError(f"custom suite: generation with {where} failed: {type(exc).__name__}: {exc}") from exc
    metrics = build_metrics(cfg.custom_metrics)
    task = cfg.custom_task_name
    rows, sums = [], {m.name: 0.0 for m in metrics}
    cases = []
    for item, output in zip(items, gens.outputs):
        case = LLMTestCase(input=item["messages"][-1]["content"], actual_output=output, expected_output=item["reference"])
        scores, reasons = {}, {}
        for m in metrics:
            scores[m.name] = m.measure(case)
            reasons[m.name] = m.reason
            sums[m.name] += scores[m.name]
        cases.append(case)
        rows.append({"suite": "custom", "task": task, "id": item["id"], "prompt": item["messages"][-1]["content"],
                     "output": output, "reference": item["reference"], "scores": scores, "reasons": reasons})
    # keep what is computed so far: a judge failure below must not lose the generations
    with open(partial / "custom_items.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    try:
        judge, judge_skip = check_judge(cfg.judge)
        if judge:
            geval = judge_metric(judge, cfg.judge)
            sums["judge"] = 0.0
            for row, case in zip(rows, cases):
                row["scores"]["judge"], row["reasons"]["judge"] = score_with_judge(geval, case)
                sums["judge"] += row["scores"]["judge"]
    except JudgeUnavailable as exc:
        raise EvalError(f"{exc}. Results computed so far are kept in {partial}") from exc
    agg = {f"custom/{task}/{name}": total / len(rows) for name, total in sums.items()}
    agg[f"custom/{task}/gen_tokens_per_s"] = gens.tokens_per_s
    info = {"custom_items": len(rows), "gen_seconds": round(gens.seconds, 2), "gen_tokens": gens.output_tokens,
            "judge": judge_skip,
            "thresholds": {s.name: {"threshold": s.threshold, "greater_is_better": s.greater_is_better}
                           for s in cfg.custom_metrics}}
    return agg, rows, info


def evaluate(loaded: LoadedConfig, model: ModelRef, suites: tuple[str, ...] = SUITES, *, sampling: dict,
             out_root: Path, test_file: Optional[Path] = None, backend: Optional[str] = None,
             endpoint: Optional[Endpoint] = None, engine: Optional[dict] = None, console=None) -> EvalResult:
    """Evaluate one model into `out_root`/<model>-<key>/ (a finished one there under any label is reused).
    `sampling`: what the served model decodes with (serving.decoding.non_default(), which the caller passes), so
    that what is evaluated is what is served. With backend 'vllm' and no endpoint, a vLLM server is started for the
    duration (base model + the adapter as a LoRA module) with `engine`, the serving settings (the caller passes
    them: flows/segments.as_served), and stopped afterwards."""
    cfg = loaded.config.eval
    backend = backend or cfg.backend
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise EvalError(f"unknown suite(s) {unknown}; known: {', '.join(SUITES)}")
    if "custom" in suites and (test_file is None or not Path(test_file).exists()):
        raise EvalError(f"custom suite needs the prepared test split; {test_file} not found (run `make prepare`)")
    key = cache_key(loaded, model, suites, test_file, backend, sampling)
    out_dir = Path(out_root) / f"{model.name}-{key}"
    if not (out_dir / "metrics.json").exists():  # the same model, data and settings scored under another label
        out_dir = next((p for p in sorted(out_dir.parent.glob(f"*-{key}")) if (p / "metrics.json").exists()), out_dir)
    if (out_dir / "metrics.json").exists():
        saved = json.loads((out_dir / "metrics.json").read_text())
        return EvalResult(model, saved["metrics"], out_dir / "items.jsonl", out_dir, cached=True, info=saved["info"])
    if backend == "vllm" and endpoint is None and engine is None:
        raise EvalError("the vllm backend without an endpoint starts vLLM with the serving settings: pass engine= "
                        "(flows/segments.as_served gives them), or an endpoint")
    need = ([("eval.device", "cuda")] if backend == "hf" and cfg.device == "cuda" else []) + \
        ([("serving.engine", "vllm")] if backend == "vllm" and endpoint is None and engine.get("engine") == "vllm"
         else [])
    require_cuda(loaded, (), what=f"evaluation ({backend} backend)", need=need)

    server = None
    if backend == "vllm" and endpoint is None:
        from workspace.vllm_server import VllmServer

        merged = served_merged(loaded, model)
        name = f"{model.name}-lora" if model.adapter and not merged else "base"
        loras = {name: model.adapter} if model.adapter and not merged else {}
        info_mode = "merged" if merged else ("lora" if loras else "base")
        server = VllmServer(merged or model.base, engine, lora_modules=loras,
                            max_lora_rank=max(adapter_rank(model.adapter), 8) if loras else 8, served_model_name="base",
                            hub_enabled=loaded.config.hub.enabled,
                            log_path=Path(out_root) / f"vllm-{model.name}.log")
        server.start()
        endpoint = server.endpoint(name, concurrency=cfg.concurrency)
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    info: dict = {"backend": backend, "model": model.name, "base": model.base, "adapter": model.adapter,
                  "fingerprint": model.fingerprint(), "cache_key": key}
    if server is not None:
        info["served_as"] = info_mode  # what vLLM ran: the adapter merged, as a LoRA module, or the plain base
    try:
        with open(partial / "items.jsonl", "w", encoding="utf-8") as items_fh:
            if "kobest" in suites:
                kb = run_kobest(cfg, model.base, model.adapter, backend=backend, hub_enabled=loaded.config.hub.enabled,
                                endpoint=endpoint)
                for k, v in kb.metrics.items():
                    task, metric = k.split("/", 1)
                    metrics[f"kobest/{task.removeprefix('kobest_')}/{metric}"] = v
                metrics["kobest/all/items_per_s"] = kb.n_items / kb.seconds if kb.seconds else 0.0
                info.update({"kobest_items": kb.n_items, "kobest_seconds": round(kb.seconds, 2)})
                for it in kb.items:
                    items_fh.write(json.dumps({"suite": "kobest", **it}, ensure_ascii=False) + "\n")
                items_fh.flush()
                (partial / "kobest_metrics.json").write_text(json.dumps(kb.metrics, indent=2))
            if "custom" in suites:
                t0 = time.time()
                agg, rows, cinfo = _custom_suite(loaded, model, Path(test_file), backend, endpoint, partial, sampling)
                metrics.update(agg)
                metrics[f"custom/{cfg.custom_task_name}/items_per_s"] = len(rows) / (time.time() - t0)
                info.update(cinfo)
                for row in rows:
                    items_fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                (partial / "custom_items.jsonl").unlink(missing_ok=True)  # now part of items.jsonl
    finally:
        if server:
            server.stop()
    metrics = {f"eval/{k}": v for k, v in metrics.items()}
    (partial / "metrics.json").write_text(json.dumps({"metrics": metrics, "info": info}, indent=2, ensure_ascii=False))
    # complete results appear at once and replace older ones whole (a kill midway leaves the old folder intact);
    # a failure leaves the .partial folder to inspect
    swap_in(partial, out_dir)
    return EvalResult(model, metrics, out_dir / "items.jsonl", out_dir, cached=False, info=info)


def log_eval(result: EvalResult) -> None:
    """Metrics, the per-item table and the files, into the active MLflow run."""
    import mlflow

    mlflow.log_params({"eval.model": result.model.name, "eval.base": result.model.base,
                       "eval.adapter": result.model.adapter or "", "eval.backend": result.info.get("backend"),
                       "eval.cache_key": result.info.get("cache_key")})
    mlflow.log_metrics(result.metrics)
    mlflow.set_tag("judge", str(result.info.get("judge", "n/a"))[:250])
    rows = [json.loads(line) for line in result.items_path.read_text(encoding="utf-8").splitlines()]
    table = {"suite": [], "task": [], "id": [], "prompt": [], "output": [], "reference": [], "score": []}
    for r in rows:
        table["suite"].append(r["suite"])
        table["task"].append(r["task"])
        table["id"].append(r["id"])
        table["prompt"].append(r.get("prompt", "")[:500])
        table["output"].append(str(r.get("output", r.get("pred")))[:1000])
        table["reference"].append(str(r.get("reference", r.get("target")))[:1000])
        table["score"].append(json.dumps(r.get("scores", {"acc": r.get("acc")})))
    mlflow.log_table(table, artifact_file="eval/items_table.json")
    mlflow.log_artifact(str(result.out_dir / "metrics.json"), "eval")
    mlflow.log_artifact(str(result.items_path), "eval")


def compare_report(results: list[EvalResult], out_dir: Path) -> tuple[Path, Optional[Path]]:
    """Markdown table of every metric per model (+ delta when two), and a grouped bar plot (PNG)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [r.model.name for r in results]
    keys = sorted({k for r in results for k in r.metrics if not k.endswith("_per_s")})
    lines = [f"# Evaluation report: {' vs '.join(names)}", ""]
    for r in results:
        lines.append(f"- **{r.model.name}**: base `{r.model.base}`, adapter `{r.model.adapter or '-'}`, backend "
                     f"{r.info.get('backend')}, judge: {r.info.get('judge', 'n/a')}")
    lines += ["", "| metric | " + " | ".join(names) + (" | delta |" if len(results) == 2 else " |"),
              "|---|" + "---|" * len(names) + ("---|" if len(results) == 2 else "")]
    for k in keys:
        vals = [r.metrics.get(k) for r in results]
        row = f"| {k} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
        if len(results) == 2 and None not in vals:
            row += f" | {vals[1] - vals[0]:+.3f}"
        lines.append(row + " |")
    speed = sorted({k for r in results for k in r.metrics if k.endswith("_per_s")})
    if speed:
        lines += ["", "| speed | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k in speed:
            lines.append(f"| {k} | " + " | ".join(f"{r.metrics.get(k, 0):.1f}" for r in results) + " |")
    md = out_dir / "report.md"
    png = out_dir / "comparison.png" if len(results) >= 2 else None
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.6), 4.5))
        x = np.arange(len(keys))
        width = 0.8 / len(results)
        for i, r in enumerate(results):
            ax.bar(x + i * width, [r.metrics.get(k, 0) for k in keys], width, label=r.model.name)
        ax.set_xticks(x + width * (len(results) - 1) / 2)
        ax.set_xticklabels([k.removeprefix("eval/") for k in keys], rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title("Evaluation: " + " vs ".join(names))
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
        lines += ["", f"![comparison]({png.name})"]
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md, png
