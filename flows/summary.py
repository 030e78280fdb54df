"""The pipeline's summary: the table printed at the end (also on failure) and what goes on the MLflow parent run
(params = the flattened config, the candidate's metrics, the gate table, the reports, stage tags, the summary as
the run's description), so two pipeline runs compare side by side in the MLflow UI whichever stages were cached.
Called by flows/pipeline.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rich.console import Group
from rich.table import Table

from flows.runner import StageRecord, StageRunner
from serving.slo_stage import SloOutputs, slo_rows
from workspace.config import LoadedConfig

MLFLOW_UI = "http://127.0.0.1:5000"  # `make ui`


def run_url(mlflow, run_id: Optional[str]) -> str:
    if not run_id:
        return "-"
    try:
        exp = mlflow.get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001
        return run_id
    return f"{MLFLOW_UI}/#/experiments/{exp}/runs/{run_id}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def summarise(loaded: LoadedConfig, runner: StageRunner, mlflow, parent_id: str, total: float,
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
                 f"{m.get('stage', 'sft')} {m.get('method', '-')} r{m.get('lora_rank', '-')}, {m.get('global_step', '-')} "
                 f"steps in {m.get('train_runtime_s') or 0:.0f} s; train loss {_num(m.get('final_train_loss'))}, "
                 + (f"val loss {_num(m.get('final_val_loss'))}" if m.get("stage", "sft") == "sft" else
                    f"DPO reward accuracy {_num(m.get('dpo_reward_accuracy'))}") if m else "-", f.get("run_id", "")))
    rg = r.get("rag") or {}
    rm = rg.get("metrics") or {}
    rows.append(("rag", status("rag"), f"{rg.get('collection')}: {rg.get('chunks')} chunks, hybrid hit@5 "
                 f"{rm.get('rag/hybrid/hit_at_5', float('nan')):.2f}" if rg else (runner.records.get('rag') or StageRecord('rag')).error or "-",
                 rg.get("run_id", "")))
    e = r.get("evaluate") or {}
    rows.append(("evaluate", status("evaluate"), f"report {e['report']}" if e else "-", e.get("run_id", "")))
    so = r.get("slo") or {}
    slo_now = slo_rows(SloOutputs(**so), loaded.config.gate.slo) if so else []  # this run's thresholds
    rows.append(("slo", status("slo"), (f"{so['step']}: " + ", ".join(f"{x['name']} {'pass' if x['passed'] else 'FAIL'}"
                                                                      for x in slo_now))
                 if so else (runner.records.get('slo') or StageRecord('slo')).error or "-", so.get("run_id", "")))
    g = r.get("gate") or {}
    if runner.records.get("gate") and runner.records["gate"].status == "failed":
        g = runner.records["gate"].result or g
    gate_text = "-"
    if g:
        gate_text = ("PASS" if g.get("passed") else "FAIL") + f" vs {g.get('reference')}: {g.get('decided_by', '')}"
    rows.append(("gate", status("gate"), gate_text, g.get("run_id", "")))
    pr = r.get("promote") or {}
    rows.append(("promote", status("promote"),
                 f"{pr.get('registered_model')} v{pr.get('version')} @{pr.get('alias', 'champion')}"
                 + (f" ({'champion' if pr.get('alias') == 'candidate' else 'previous'} v{pr['previous']})" if pr.get("previous") else "")
                 if pr else "-", pr.get("run_id", "")))
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
    parent_url = run_url(mlflow, parent_id)
    footer.add_row("parent run", f"{parent_url}   (`make ui` first; a stage: same URL with its run id)")
    footer.add_row("endpoint", endpoint)
    if failure is not None:
        footer.add_row("error", str(failure).splitlines()[0][:300] if str(failure) else type(failure).__name__)
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


def run_summarised(loaded: LoadedConfig, runner: StageRunner, mlflow, parent_id: str, t0: float, console,
                   work) -> dict:
    """Run `work()` inside a parent run; the summary table and the parent run's records are written whether it
    failed or not, then a failure is raised again. Returns the summary."""
    import time

    failure: Optional[BaseException] = None
    try:
        work()
    except BaseException as exc:  # noqa: BLE001 - the summary is written either way
        failure = exc
    total = round(time.monotonic() - t0, 1)
    summary = summarise(loaded, runner, mlflow, parent_id, total, failure)
    console.print(summary["table"])
    log_parent(loaded, mlflow, runner, summary, total)
    if failure is not None:
        raise failure
    return summary


def log_parent(loaded: LoadedConfig, mlflow, runner: StageRunner, summary: dict, total: float) -> None:
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
                    ("train_runtime_s", "train/runtime_s"), ("tokens_per_s", "train/tokens_per_s"),
                    ("dpo_reward_accuracy", "train/dpo_reward_accuracy"), ("dpo_reward_margin", "train/dpo_reward_margin")):
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


