"""The whole job as one Prefect flow (`make pipeline`): prepare -> finetune -> evaluate -> gate -> promote ->
rag index -> serve check, inside one MLflow parent run with a child run per stage.

    .venv/bin/python -m flows.pipeline [--profile cpu_tiny] [--set finetune.lora_rank=16] [--force] [--no-serve-check]

Every stage is a Prefect task cached on the content hashes of what it depends on (data, the config sections it
reads, its code, the upstream results), with its result persisted under .prefect/storage: an unchanged rerun
reports every stage as cached and costs seconds; a changed config reruns only the stages that depend on it
(`finetune.lora_rank` reruns finetune onwards, `rag.top_k` only the rag stage). A cached result whose outputs
are gone (an adapter deleted, the champion rolled back, the Qdrant folder removed) is recomputed. A failed stage
leaves the earlier ones cached, so a rerun resumes from it. The pipeline holds the workspace lock: a second run
started meanwhile waits for it (or refuses with --lock-timeout), naming the holder.

Exit codes: 0 done, 2 an error (named), 3 the gate refused the candidate.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from workspace import offline

offline.apply()

from flows.deploy import use_local_server_if_up  # noqa: E402

_API = use_local_server_if_up()  # a server from `make prefect-up`: runs show in its UI; else a temporary local API

from prefect import flow, task  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from eval.evaluate import SUITES, EvalError, ModelRef, cache_key as eval_cache_key  # noqa: E402
from eval.gate import GateError  # noqa: E402
from eval.judge import JudgeUnavailable  # noqa: E402
from finetune.prepare import PrepareError, TokenCounter, content_hash, tokenizer_path  # noqa: E402
from finetune.train import FinetuneError, base_model_ref, finished_run, run_key  # noqa: E402
from flows.evaluate import run_evaluate  # noqa: E402
from flows.finetune import finetune_task  # noqa: E402
from flows.prepare import prepare_task  # noqa: E402
from flows.promote import GateFailed, run_gate, run_promote  # noqa: E402
from flows.rag import run_rag  # noqa: E402
from rag.index import RagError  # noqa: E402
from serving.config import FitError  # noqa: E402
from serving.registry import PromotionError, champion_info  # noqa: E402
from serving.serve import smoke_test  # noqa: E402
from serving.vllm_server import ServerError  # noqa: E402
from workspace.config import ConfigError, LoadedConfig, add_cli_args, load_config  # noqa: E402
from workspace.locks import LockBusy, workspace_lock  # noqa: E402
from workspace.paths import CACHE, ROOT, resolve  # noqa: E402
from workspace.tracking import configure, pipeline_run, stage_run  # noqa: E402

KNOWN_ERRORS = (ConfigError, PrepareError, FinetuneError, EvalError, GateError, FitError, PromotionError, RagError,
                ServerError, LockBusy, JudgeUnavailable)
MLFLOW_UI = "http://127.0.0.1:5000"  # `make ui`


# ----------------------------------------------------------------------------------------------- cache keys
def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_hash(*relative: str) -> str:
    """Hash of the Python files under the given workspace-relative folders or files."""
    h = hashlib.sha256()
    for rel in relative:
        path = ROOT / rel
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "missing"


# --------------------------------------------------------------------------------------------------- tasks
def _transient(task, task_run, state) -> bool:
    """Retry only what may pass a second time (a server blip), never a named, deterministic refusal."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (GateFailed, ConfigError, PrepareError, FinetuneError, EvalError, GateError, FitError,
                                RagError, LockBusy, JudgeUnavailable))


# Results are JSON (readable under .prefect/storage); keys are passed per call with `with_options`.
_TASK = dict(persist_result=True, result_serializer="json")
_RETRY = dict(retry_condition_fn=_transient, retry_delay_seconds=5)


@task(name="prepare", **_TASK)
def prepare_stage(loaded: LoadedConfig, force: bool) -> dict:
    return prepare_task.fn(loaded, force)


@task(name="finetune", **_TASK)
def finetune_stage(loaded: LoadedConfig, dataset_dir: str, dataset_hash: str, force: bool) -> dict:
    out = finetune_task.fn(loaded, dataset_dir, dataset_hash, force)
    return {**out, "adapter_dir": str(out["adapter_dir"])}


@task(name="evaluate", **_TASK)
def evaluate_stage(loaded: LoadedConfig) -> dict:
    return run_evaluate(loaded)


@task(name="gate", **_TASK)
def gate_stage(loaded: LoadedConfig) -> dict:
    return run_gate(loaded)


@task(name="promote", retries=1, **_RETRY, **_TASK)  # a remote MLflow server can blip
def promote_stage(loaded: LoadedConfig, gate: dict) -> dict:
    return run_promote(loaded, gate)


@task(name="rag-index", retries=2, **_RETRY, **_TASK)  # Qdrant may be a server
def rag_stage(loaded: LoadedConfig) -> dict:
    return run_rag(loaded)


@task(name="serve-check", retries=1, **_RETRY, **_TASK)  # starts and queries a vLLM server
def serve_stage(loaded: LoadedConfig, prompt: str) -> dict:
    import mlflow

    with stage_run(loaded, "serve-check") as run:
        out = smoke_test(loaded, prompt, dest=CACHE / "pipeline-serve-check")
        mlflow.log_metrics({"serve/check_latency_s": out["latency_s"], "serve/check_completion_tokens": out["completion_tokens"],
                            "serve/startup_s": out["startup_s"]})
        mlflow.log_dict(out, "serve/check.json")
        mlflow.set_tag("champion_version", out["version"])
    return {**out, "run_id": run.info.run_id}


# ------------------------------------------------------------------------------------------------ the flow
@dataclass
class StageRecord:
    name: str
    status: str = "pending"  # ran | cached | failed | skipped
    seconds: float = 0.0
    key: str = ""
    result: dict = field(default_factory=dict)
    error: str = ""


class StageRunner:
    """Runs one cached task per stage, printing a line when it starts and ends (cache hits shown as such)."""

    def __init__(self, console: Console, force: bool):
        self.console, self.force = console, force
        self.records: dict[str, StageRecord] = {}

    def run(self, name: str, fn, key: str, valid: bool, *args) -> dict:
        rec = self.records.setdefault(name, StageRecord(name, key=key))
        refresh = self.force or not valid
        self.console.print(f"[bold]▶ {name}[/] [dim](key {key}{'; recompute' if refresh else ''})[/]")
        t0 = time.monotonic()
        state = fn.with_options(cache_key_fn=lambda *_: f"{name}-{key}", refresh_cache=refresh,
                                task_run_name=f"{name}-{key[:8]}")(*args, return_state=True)
        rec.seconds = round(time.monotonic() - t0, 1)
        if state.is_failed() or state.is_crashed() or state.is_cancelled():
            rec.status = "failed"
            try:
                state.result(raise_on_failure=True)
            except BaseException as exc:  # noqa: BLE001 - re-raised after recording
                rec.error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                if isinstance(exc, GateFailed):
                    rec.result = exc.result
                self.console.print(f"[red]✗ {name} failed after {rec.seconds} s:[/] {rec.error}")
                raise
            raise RuntimeError(f"stage {name} ended in state {state.name}")
        rec.result = state.result()
        rec.status = "cached" if state.name == "Cached" else "ran"
        label = "[cyan]cached[/]" if rec.status == "cached" else "[green]done[/]"
        self.console.print(f"[bold]■ {name}[/] {label} in {rec.seconds} s")
        return rec.result

    def skip(self, name: str, why: str) -> None:
        self.records[name] = StageRecord(name, status="skipped", error=why)
        self.console.print(f"[bold]- {name}[/] [yellow]skipped[/]: {why}")


def _prepare_key(loaded: LoadedConfig) -> tuple[str, bool]:
    """The processed folder's own name (content hash of data, data config, tokenizer, code) and whether it exists."""
    digest = content_hash(loaded, TokenCounter(tokenizer_path(loaded)).fingerprint)
    return digest, (resolve(loaded.config.data.output_dir) / digest / "stats.json").exists()


@flow(name="pipeline")
def pipeline_flow(config: Optional[str] = None, profile: Optional[str] = None, overrides: Optional[list[str]] = None,
                  force: bool = False, serve_check: bool = True, lock_timeout: Optional[float] = None) -> dict:
    loaded = load_config(config, profile, overrides or [])
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough for the run links
        console = Console(width=160)
    runner = StageRunner(console, force)
    t0 = time.monotonic()
    with workspace_lock("pipeline", lock_timeout):
        mlflow = configure(loaded)
        with pipeline_run(loaded) as parent:
            console.print(f"[bold]pipeline[/] profile {loaded.profile}, config {loaded.hash[:12]}, MLflow run "
                          f"{_run_url(mlflow, parent.info.run_id)}")
            failure: Optional[BaseException] = None
            try:
                _stages(loaded, runner, serve_check)
            except BaseException as exc:  # noqa: BLE001 - the summary is written either way
                failure = exc
            total = round(time.monotonic() - t0, 1)
            summary = _summarise(loaded, runner, mlflow, parent.info.run_id, total, failure)
            console.print(summary["table"])
            _log_parent(loaded, mlflow, runner, summary, total)
            if failure is not None:
                raise failure
    return summary["json"]


def _stages(loaded: LoadedConfig, runner: StageRunner, serve_check: bool) -> None:
    cfg = loaded.config
    # prepare: the processed folder is named by its content hash (data + data config + tokenizer + code)
    digest, done = _prepare_key(loaded)
    prepared = runner.run("prepare", prepare_stage, digest, done, loaded, False)

    # finetune: the run key covers the finetune config, the seed, the dataset and the base model
    rk = run_key(loaded, prepared["content_hash"])
    adapter = finished_run(loaded, prepared["content_hash"])
    runner.run("finetune", finetune_stage, _digest(rk, code_hash("finetune/train.py", "finetune/stage.py")),
               adapter is not None, loaded, prepared["path"], prepared["content_hash"], False)
    adapter = finished_run(loaded, prepared["content_hash"])

    # evaluate: base and candidate on identical items (the eval caches' own keys) + RAG answer quality
    base, _ = base_model_ref(loaded)
    test = Path(prepared["path"]) / "test.jsonl"
    eval_root = resolve(cfg.data.output_dir) / "evals"
    keys = {m.name: eval_cache_key(loaded, m, SUITES, test, cfg.eval.backend)
            for m in (ModelRef("base", base), ModelRef("candidate", base, str(adapter)))}
    rag_inputs = [cfg.rag.model_dump(mode="json"), _file_sha(resolve(cfg.rag.corpus)), _file_sha(resolve(cfg.rag.qa_set))]
    runner.run("evaluate", evaluate_stage, _digest(keys, rag_inputs if cfg.rag.enabled else None, code_hash("rag")),
               all((eval_root / f"{n}-{k}" / "metrics.json").exists() for n, k in keys.items()), loaded)

    # gate + promote: valid while the registry's champion is this candidate (a rollback recomputes both)
    configure(loaded)
    champ = champion_info(cfg.tracking.registered_model)
    promoted = bool(champ and champ["tags"].get("finetune_run_key") == rk)
    # rag_min_hit_at_5 is the rag stage's floor; the SLOs matter only when the gate requires them
    gate_cfg = cfg.gate.model_dump(mode="json", exclude={"rag_min_hit_at_5"} | (set() if cfg.gate.slo.required else {"slo"}))
    gate_key = _digest(rk, gate_cfg, cfg.eval.model_dump(mode="json"), code_hash("eval"))
    gate = runner.run("gate", gate_stage, gate_key, promoted, loaded)
    serving_cfg = cfg.serving.model_dump(mode="json", exclude={"bench"})  # load-benchmark settings change no server
    runner.run("promote", promote_stage, _digest(gate_key, serving_cfg,
                                                 cfg.tracking.registered_model, code_hash("serving")),
               promoted, loaded, gate)

    # rag: the collection is named by corpus + embedder + chunking; indexing is incremental anyway
    if cfg.rag.enabled:
        q = cfg.rag.qdrant
        present = q.location == "server" or (q.location == "local" and resolve(q.path).exists())
        runner.run("rag", rag_stage, _digest(rag_inputs, cfg.gate.rag_min_hit_at_5, code_hash("rag")), present, loaded)
    else:
        runner.skip("rag", "rag.enabled is false")

    # serve check: the champion starts with its promoted configuration and answers
    if serve_check:
        champ = champion_info(cfg.tracking.registered_model)
        prompt = _first_prompt(test)
        runner.run("serve", serve_stage, _digest(champ and (champ["version"], champ["run_id"]), serving_cfg,
                                                 prompt, code_hash("serving")), True, loaded, prompt)
    else:
        runner.skip("serve", "--no-serve-check")


def _first_prompt(test: Path) -> str:
    for line in test.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            return next(m["content"] for m in row["messages"] if m["role"] == "user")
    return "회원 목록 화면을 생성해주세요. 필드: 이름, 이메일"


# ------------------------------------------------------------------------------------------------ summary
def _run_url(mlflow, run_id: Optional[str]) -> str:
    if not run_id:
        return "-"
    try:
        exp = mlflow.get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001
        return run_id
    return f"{MLFLOW_UI}/#/experiments/{exp}/runs/{run_id}"


def _summarise(loaded: LoadedConfig, runner: StageRunner, mlflow, parent_id: str, total: float,
               failure: Optional[BaseException]) -> dict:
    r = {name: rec.result for name, rec in runner.records.items()}
    rows: list[tuple[str, str, str, str]] = []  # stage, status, what, mlflow run

    def status(name: str) -> str:
        rec = runner.records.get(name)
        if rec is None:
            return "not run"
        return {"ran": f"done {rec.seconds} s", "cached": f"cached {rec.seconds} s", "failed": f"FAILED {rec.seconds} s",
                "skipped": "skipped"}[rec.status]

    p = r.get("prepare") or {}
    rows.append(("prepare", status("prepare"), ", ".join(f"{k} {v}" for k, v in (p.get("rows") or {}).items())
                 + (f"; {p.get('rows_rejected')} rejected" if p else ""), p.get("run_id", "")))
    f = r.get("finetune") or {}
    m = f.get("manifest") or {}
    rows.append(("finetune", status("finetune"),
                 f"{m.get('method', '-')} r{m.get('lora_rank', '-')}, {m.get('global_step', '-')} steps in "
                 f"{m.get('train_runtime_s', 0):.0f} s; train loss {m.get('final_train_loss', float('nan')):.3f}, "
                 f"val loss {m.get('final_val_loss', float('nan')):.3f}" if m else "-", f.get("run_id", "")))
    e = r.get("evaluate") or {}
    rows.append(("evaluate", status("evaluate"), f"report {e['report']}" if e else "-", e.get("run_id", "")))
    g = r.get("gate") or {}
    if runner.records.get("gate") and runner.records["gate"].status == "failed":
        g = runner.records["gate"].result or g
    gate_text = "-"
    if g:
        gate_text = ("PASS" if g.get("passed") else "FAIL") + f" vs {g.get('reference')}: {g.get('decided_by', '')}"
    rows.append(("gate", status("gate"), gate_text, g.get("run_id", "")))
    pr = r.get("promote") or {}
    rows.append(("promote", status("promote"),
                 f"{pr.get('registered_model')} v{pr.get('version')} @champion" + (f" (previous v{pr['previous']})" if pr.get("previous") else "")
                 if pr else "-", pr.get("run_id", "")))
    rg = r.get("rag") or {}
    rm = rg.get("metrics") or {}
    rows.append(("rag", status("rag"), f"{rg.get('collection')}: {rg.get('chunks')} chunks, hybrid hit@5 "
                 f"{rm.get('rag/hybrid/hit_at_5', float('nan')):.2f}" if rg else (runner.records.get('rag') or StageRecord('rag')).error or "-",
                 rg.get("run_id", "")))
    s = r.get("serve") or {}
    rows.append(("serve", status("serve"), f"champion v{s['version']} answered {s['completion_tokens']} tokens in "
                 f"{s['latency_s']:.2f} s ({s['model']})" if s else (runner.records.get('serve') or StageRecord('serve')).error or "-",
                 s.get("run_id", "")))

    ok = failure is None
    title = (f"pipeline {'done' if ok else 'FAILED'} in {total} s — profile {loaded.profile}, config {loaded.hash[:12]}")
    table = Table(title=title, title_justify="left")
    for col in ("stage", "status", "result", "MLflow run id"):
        table.add_column(col, overflow="fold")
    for stage, st, what, run_id in rows:
        table.add_row(stage, st, what, run_id or "-")

    # candidate vs reference (champion, or base), key metrics
    cand = g.get("candidate_metrics") or (e.get("metrics") or {}).get("candidate") or {}
    ref = g.get("reference_metrics") or (e.get("metrics") or {}).get("base") or {}
    ref_name = g.get("reference") if g.get("reference_metrics") else "base"
    metrics = Table(title=f"candidate vs {ref_name}", title_justify="left")
    for col in ("metric", ref_name or "reference", "candidate"):
        metrics.add_column(col, justify="right" if col != "metric" else "left")
    keys = [k for k in sorted(cand) if (k.startswith("eval/custom/") or k.endswith("/acc")) and not k.endswith("_per_s")]
    for k in keys:
        metrics.add_row(k.removeprefix("eval/"), f"{ref.get(k, float('nan')):.3f}", f"{cand[k]:.3f}")

    cfg = loaded.config
    endpoint = (f"`make serve` -> http://{cfg.serving.host}:{cfg.serving.port}/v1, model '{cfg.serving.served_model_name}'"
                if pr or s else "-")
    footer = Table.grid(padding=(0, 2))
    parent_url = _run_url(mlflow, parent_id)
    footer.add_row("parent run", f"{parent_url}   (`make ui` first; a stage: same URL with its run id)")
    footer.add_row("endpoint", endpoint)
    if failure is not None:
        footer.add_row("error", str(failure).splitlines()[0][:300] if str(failure) else type(failure).__name__)
    from rich.console import Group

    js = {"ok": ok, "seconds": total, "profile": loaded.profile, "config_hash": loaded.hash, "parent_run_id": parent_id,
          "stages": {n: {"status": rec.status, "seconds": rec.seconds, "key": rec.key, "error": rec.error}
                     for n, rec in runner.records.items()},
          "results": r, "error": str(failure) if failure else None}
    return {"table": Group(table, metrics if keys else "", footer), "json": js, "rows": rows,
            "metric_rows": [(k, ref.get(k), cand[k]) for k in keys], "ref_name": ref_name}


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, tuple)) else str(v)
    return out


def _log_parent(loaded: LoadedConfig, mlflow, runner: StageRunner, summary: dict, total: float) -> None:
    """Params, key metrics, the gate table and the reports on the parent run: two pipeline runs compare side by
    side in the MLflow UI whichever stages were cached."""
    js = summary["json"]
    r = js["results"]
    mlflow.log_params({k: v[:6000] for k, v in _flatten(loaded.config.model_dump(mode="json")).items()})
    metrics: dict[str, float] = {"pipeline/seconds": total}
    for name, rec in runner.records.items():
        metrics[f"pipeline/{name}_seconds"] = rec.seconds
        mlflow.set_tag(f"stage.{name}", rec.status)
    p = r.get("prepare") or {}
    for split, n in (p.get("rows") or {}).items():
        metrics[f"data/rows_{split}"] = n
    m = (r.get("finetune") or {}).get("manifest") or {}
    for k, name in (("final_train_loss", "train/final_loss"), ("final_val_loss", "train/final_val_loss"),
                    ("train_runtime_s", "train/runtime_s"), ("tokens_per_s", "train/tokens_per_s")):
        if isinstance(m.get(k), (int, float)):
            metrics[name] = m[k]
    e = r.get("evaluate") or {}
    metrics.update({k: v for k, v in ((e.get("metrics") or {}).get("candidate") or {}).items()})
    metrics.update({f"base/{k}": v for k, v in ((e.get("metrics") or {}).get("base") or {}).items()})
    metrics.update(e.get("rag_answer_metrics") or {})
    g = r.get("gate") or (runner.records.get("gate").result if runner.records.get("gate") else {}) or {}
    if "passed" in g:
        metrics["gate/passed"] = float(bool(g["passed"]))
    pr = r.get("promote") or {}
    if pr.get("version"):
        metrics["registry/version"] = float(pr["version"])
        mlflow.set_tag("registered_version", f"{pr['registered_model']} v{pr['version']} @champion")
    metrics.update({k: v for k, v in ((r.get("rag") or {}).get("metrics") or {}).items() if "/hit_at_5" in k or "/mrr" in k})
    s = r.get("serve") or {}
    if s:
        metrics["serve/check_latency_s"] = s["latency_s"]
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v})
    for key in ("gate_md", "gate_json", "report_md", "report_png"):
        if g.get(key) and Path(g[key]).exists():
            mlflow.log_artifact(g[key], "gate")
    for key in ("report", "report_png"):
        if e.get(key) and Path(e[key]).exists():
            mlflow.log_artifact(e[key], "evaluate")
    mlflow.log_dict(js, "pipeline/summary.json")
    # the summary as the run's description in the MLflow UI
    lines = ["| stage | status | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c.replace('|', '/')} |" for a, b, c, _ in summary["rows"]]
    if summary["metric_rows"]:
        lines += ["", f"| metric | {summary['ref_name']} | candidate |", "|---|---|---|"]
        lines += [f"| {k} | {'-' if a is None else f'{a:.3f}'} | {b:.3f} |" for k, a, b in summary["metric_rows"]]
    mlflow.set_tag("mlflow.note.content", "\n".join(lines))


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--force", action="store_true", help="recompute every stage (the stages' own caches still apply)")
    ap.add_argument("--no-serve-check", action="store_true", help="skip the last stage (serving the champion once)")
    ap.add_argument("--lock-timeout", type=float, default=None,
                    help="seconds to wait for another run holding the workspace (default: wait; 0: refuse at once)")
    args = ap.parse_args(argv)
    try:
        pipeline_flow(config=args.config, profile=args.profile, overrides=list(args.overrides), force=args.force,
                      serve_check=not args.no_serve_check, lock_timeout=args.lock_timeout)
    except GateFailed as exc:
        print(f"\n[gate] {exc}", file=sys.stderr)
        return 3
    except KNOWN_ERRORS as exc:
        print(f"\n[error] {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
