"""`make leaderboard`: the configured base model, the models listed in `leaderboard.models` (other bases by path or
hub id) and every registered version (`leaderboard.registered`), evaluated on identical items (the KoBEST tasks of
eval.kobest_tasks and the prepared test split), in one table with confidence intervals (eval/leaderboard.py), plus
serving numbers where `make bench-serve` measured the version. Evaluations are cached per model key (the model's
bytes, the items, the settings), so adding one model evaluates only that one. Writes leaderboard.md/.json/.png under
<data.output_dir>/leaderboard/ and logs them with per-model metrics in an MLflow run `leaderboard`.

    .venv/bin/python -m llmops leaderboard [--profile cpu_smoke]
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from prefect import flow
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from eval.evaluate import evaluate
from eval.leaderboard import Row, scores, write
from finetune.prepare_stage import PREPARE
from flows._cli import run_flow_cli
from flows.segments import as_served, test_file
from flows.runner import StageRunner
from serving.registry import fetch_version_cached, list_versions
from workspace.config import LoadedConfig, load_config
from workspace.locks import workspace_lock
from workspace.model_ref import ModelNotFound, ModelRef, base_model
from workspace.paths import CACHE, resolve
from workspace.tracking import configure, stage_run


def candidates(loaded: LoadedConfig) -> list[tuple[ModelRef, str, str, Optional[str]]]:
    """(model, kind, detail, registry run id) of every model on the board, base first."""
    cfg = loaded.config
    base = base_model(loaded)
    out = [(base, "base", f"configured base model {cfg.base_model.hub_id or cfg.base_model.path}", None)]
    for m in cfg.leaderboard.models:
        if m.path:
            path = resolve(m.path)
            if not (path / "config.json").exists():
                raise ModelNotFound(f"leaderboard.models {m.name!r}: {m.path} has no config.json; fix the path")
            ref = ModelRef(m.name, str(path), adapter=str(resolve(m.adapter)) if m.adapter else None)
        else:
            ref = ModelRef(m.name, m.hub_id, adapter=str(resolve(m.adapter)) if m.adapter else None,  # type: ignore[arg-type]
                           revision=m.revision, hub=True)
        out.append((ref, "listed", m.path or f"hub {m.hub_id}@{m.revision or 'main'}", None))
    if cfg.leaderboard.registered == "none":
        return out
    name = cfg.tracking.registered_model
    for v in list_versions(name):
        if cfg.leaderboard.registered == "aliases" and not v["aliases"]:
            continue
        folder = fetch_version_cached(name, v["version"])
        vbase = v["tags"].get("base_model") or base.base
        ref = ModelRef(f"v{v['version']}", vbase if Path(vbase).exists() or base.hub else base.base,
                       adapter=str(folder / "adapter"), revision=base.revision, hub=base.hub)
        what = f"{name} v{v['version']}" + (f" @{', @'.join(v['aliases'])}" if v["aliases"] else "") + \
            f", {v['tags'].get('finetune_stage', 'sft')}, run {v['tags'].get('finetune_run_key', '?')}"
        out.append((ref, "registered", what, v["run_id"]))
    return out


def serving_numbers(loaded: LoadedConfig, run_id: Optional[str]) -> dict[str, float]:
    """The newest `make bench-serve` of this version (matched by its registry run, not its number: another registry
    has a v1 too), vLLM at the SLO's concurrency, the longest prompt up to its context."""
    if run_id is None:
        return {}
    slo = loaded.config.gate.slo
    for path in sorted((CACHE / "bench-serve").glob("*/serve_bench.json"), reverse=True):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("run_id") != run_id:
            continue
        steps = [s for s in data["steps"] if s["server"] == "vllm" and s["concurrency"] == slo.concurrency
                 and s["prompt_tokens"] <= slo.prompt_tokens]
        if steps:
            s = max(steps, key=lambda s: s["prompt_tokens"])
            return {f"TTFT p50 ms (c{s['concurrency']}, {s['prompt_tokens']} tok)": s["ttft_p50_ms"],
                    "out tok/s": s["output_tokens_per_s"]}
    return {}


@flow(name="leaderboard")
def leaderboard_flow(config: Optional[str] = None, profile: Optional[str] = None, overrides: Optional[list[str]] = None,
                     force: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    console = Console()
    lb = loaded.config.leaderboard
    configure(loaded)
    with workspace_lock("leaderboard"):
        prepared = StageRunner(loaded, console, force).run(PREPARE)
        test = Path(test_file(prepared))
        models = candidates(loaded)
        rows: list[Row] = []
        t0 = time.monotonic()
        with Progress(TextColumn("[leaderboard] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("evaluating", total=len(models))
            for ref, kind, detail, run_id in models:
                progress.update(task, description=f"{ref.name}")
                res = evaluate(loaded, ref, test_file=test, **as_served(loaded))
                rows.append(Row(ref.name, kind, detail, scores(res, lb.confidence, lb.bootstrap_samples,
                                                               seed=loaded.config.project.seed),
                                serving_numbers(loaded, run_id), cached=res.cached))
                progress.advance(task)
        kb = loaded.config.eval
        note = (f"KoBEST {', '.join(t.removeprefix('kobest_') for t in kb.kobest_tasks)}"
                f"{f' ({kb.limit} per task)' if kb.limit else ''} from {kb.kobest_dir}; {kb.custom_limit or 'all'} "
                f"held-out screen requests from {test}")
        out = resolve(loaded.config.data.output_dir) / "leaderboard"
        md, js, png = write(rows, out, lb.confidence, note)
        with stage_run(loaded, "leaderboard") as run:
            import mlflow

            for r in rows:
                mlflow.log_metrics({f"{r.name}/{k}": s.value for k, s in r.scores.items()})
            for p in (md, js, png):
                mlflow.log_artifact(str(p), "leaderboard")
            mlflow.set_tags({"models": ", ".join(r.name for r in rows),
                             "evaluated_now": ", ".join(r.name for r in rows if not r.cached) or "none"})
    console.print(Markdown(md.read_text(encoding="utf-8")))
    console.print(f"[leaderboard] {len(rows)} models ({sum(not r.cached for r in rows)} evaluated now, the rest cached) "
                  f"in {time.monotonic() - t0:.0f} s: {md}, {png}; MLflow run {run.info.run_id}")
    return {"markdown": str(md), "png": str(png), "json": str(js), "run_id": run.info.run_id,
            "models": [r.name for r in rows], "evaluated_now": [r.name for r in rows if not r.cached]}


def main(argv: list[str] | None = None) -> int:
    return run_flow_cli(__doc__, leaderboard_flow, argv=argv)
