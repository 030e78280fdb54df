"""The finetune stage end to end, under the stage contract (workspace/stage.py): train (or resume, or skip) ->
verify the adapter -> loss curve -> optional merge -> manifest, with a progress bar in the terminal and the
trainer's numbers as live MLflow metrics. The cache key is the run key (finetune/train.py: everything that
changes the adapter); the output folder is named by it, so a finished run is found again without Prefect.

Wired by flows/finetune.py and flows/pipeline.py; tests call `run_finetune` directly.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from finetune.train import (
    MANIFEST, METHOD_REPORT, RENDERED, TRAIN_LOG, TRAINER_LOG, FinetuneError, FinetuneResult, finished_run, loss_curve_png,
    merge_adapter, plain_config, render_llamafactory_config, run_key, train, verify_adapter, write_manifest,
)
from workspace.config.load import LoadedConfig
from workspace.config.pipeline import adapter_mode
from workspace.model_ref import ModelNotFound
from workspace.stage import Stage, StageData
from workspace.tracking import stage_run


def _metric_logger(progress: Progress, task_id, mlflow_run_id: str | None):
    client = None
    if mlflow_run_id:
        import mlflow

        client = mlflow.MlflowClient()

    def on_entry(entry: dict) -> None:
        step = int(entry.get("current_steps", 0))
        total = int(entry.get("total_steps", 0)) or None
        shown = {}
        if entry.get("loss") is not None:
            shown["loss"] = f"{entry['loss']:.3f}"
        if entry.get("lr") is not None:
            shown["lr"] = f"{entry['lr']:.2e}"
        progress.update(task_id, completed=step, total=total, **shown)
        if client is None:
            return
        metrics = {"train/loss": entry.get("loss"), "train/learning_rate": entry.get("lr"),
                   "train/epoch": entry.get("epoch"), "train/eval_loss": entry.get("eval_loss"),
                   "train/tokens_per_s": entry.get("throughput"), "train/tokens_seen": entry.get("total_tokens")}
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(mlflow_run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None])

    return on_entry


def run_finetune(loaded: LoadedConfig, dataset_dir: Path, dataset_hash: str, *, mlflow_run_id: str | None = None,
                 output_root: Path | None = None, console: Console | None = None, force: bool = False) -> FinetuneResult:
    console = console or Console()
    ft = loaded.config.finetune
    mode, reason = adapter_mode(loaded.config)
    # a merged copy for serving.adapter_mode merged (the served fast path) or finetune.merge; not a training input
    wants_merge = ft.method != "full" and (ft.merge or mode == "merged")
    if mode == "merged" and ft.method != "full":
        console.print(f"[finetune] serving mode merged ({reason}): the adapter will also be merged onto the base")
    with Progress(TextColumn("[finetune] step {task.completed}/{task.total}"), BarColumn(),
                  TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}"), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as progress:
        task_id = progress.add_task("train", total=ft.max_steps if ft.max_steps > 0 else None, loss="-", lr="-")
        result = train(loaded, dataset_dir, dataset_hash, on_entry=_metric_logger(progress, task_id, mlflow_run_id),
                       timeout=ft.timeout_s, output_root=output_root, force=force)
    if result.skipped:
        console.print(f"[finetune] cache hit: {result.output_dir} holds a finished run with the same inputs")
        if wants_merge and not result.manifest.get("merged_model"):
            console.print("[finetune] merging the cached adapter onto the full-precision base (llamafactory-cli export) ...")
            write_manifest(result, {"merged_model": str(merge_adapter(loaded, result))})
        return result
    val = Path(dataset_dir) / "val.jsonl"
    verification = {}
    if val.exists() and ft.method != "full":
        console.print("[finetune] verifying the adapter (loads with peft, changes greedy outputs, validation loss) ...")
        verification = verify_adapter(loaded, result.adapter_dir, val, result.output_dir / "verification.json",
                                      prompts=ft.verify_prompts)
    loss_curve_png(result.output_dir, result.output_dir / "loss_curve.png")
    extra = {"verification": {k: v for k, v in verification.items() if k != "examples"}}
    if wants_merge:
        console.print("[finetune] merging the adapter onto the full-precision base (llamafactory-cli export) ...")
        extra["merged_model"] = str(merge_adapter(loaded, result))
    write_manifest(result, extra)
    return result


def log_finetune(result: FinetuneResult, loaded: LoadedConfig) -> None:
    """Params (the rendered LLaMA-Factory config), summary metrics and the artifacts of a finished stage."""
    import mlflow

    out = result.output_dir
    m = result.manifest
    rendered = render_llamafactory_config(loaded, Path(m["dataset_dir"]), out)
    mlflow.log_params({f"lf.{k}": v for k, v in plain_config(rendered).items() if k not in ("output_dir", "dataset_dir")})
    mlflow.log_params({"finetune.run_key": m["run_key"], "base_model": m["base_model"],
                       "base_model_revision": m["base_model_revision"], "dataset_hash": m["dataset_hash"]})
    mlflow.set_tags({"adapter_dir": str(out), "cache": "hit" if result.skipped else "miss"})
    mc = m.get("method_check") or {}
    if mc:  # what the live model was when training began (finetune/lf_train.py), checked against the config
        mlflow.set_tags({"finetune.method_verified": str(mc.get("verified")).lower(),
                         "finetune.quantized_layer_type": mc.get("quantized_layer_type") or "none"})
        mlflow.log_metrics({"train/quantized_layers": float(mc.get("quantized_layers") or 0),
                            "train/lora_modules": float(mc.get("lora_modules") or 0)})
    v = m.get("verification") or {}
    summary = {"train/final_loss": m.get("final_train_loss"), "train/final_val_loss": m.get("final_val_loss"),
               "train/best_val_loss": m.get("best_val_loss"), "train/trainable_params": m.get("trainable_params"),
               "train/global_step": m.get("global_step"), "train/tokens_per_s_avg": m.get("tokens_per_s"),
               "train/stage_wall_s": m.get("stage_wall_s"), "verify/val_loss_base": v.get("val_loss_base"),
               "train/dpo_reward_accuracy": m.get("dpo_reward_accuracy"), "train/dpo_reward_margin": m.get("dpo_reward_margin"),
               "verify/val_loss_candidate": v.get("val_loss_candidate"),
               "verify/outputs_differ_fraction": v.get("differ_fraction")}
    mlflow.log_metrics({k: float(x) for k, x in summary.items() if x is not None})
    for name in ("manifest.json", RENDERED, METHOD_REPORT, TRAINER_LOG, TRAIN_LOG, "loss_curve.png", "verification.json",
                 "trainer_state.json"):
        if (out / name).exists():
            mlflow.log_artifact(str(out / name), "finetune")
    adapter_files = [p for p in out.iterdir() if p.is_file() and (p.name.startswith("adapter_") or
                     p.name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))]
    for p in adapter_files:
        mlflow.log_artifact(str(p), "adapter")


def summary_table(result: FinetuneResult) -> Table:
    m = result.manifest
    v = m.get("verification") or {}
    t = Table(title=f"finetune: {result.output_dir}" + ("  (cache hit)" if result.skipped else ""))
    t.add_column("item")
    t.add_column("value", justify="right")
    mc = m.get("method_check") or {}
    layers = (f"{mc['quantized_layers']} x {mc['quantized_layer_type']}" if mc.get("quantized_layers")
              else "none (full precision)") if mc else None
    rows = [("stage", m.get("stage")), ("method", m.get("method")), ("quantized layers (seen in training)", layers),
            ("LoRA modules x rank", f"{mc['lora_modules']} x r{mc['lora_rank']}" if mc.get("lora_modules") else None),
            ("steps", m.get("global_step")),
            ("resumed from step", m.get("resumed_from_step")),
            ("trainable params", f"{m['trainable_params']:,}" if m.get("trainable_params") else None),
            ("final train loss", m.get("final_train_loss")), ("best val loss", m.get("best_val_loss")),
            ("DPO reward accuracy / margin", f"{m['dpo_reward_accuracy']:.3f} / {m['dpo_reward_margin']:.3f}"
             if m.get("dpo_reward_accuracy") is not None and m.get("dpo_reward_margin") is not None else None),
            ("val loss base -> candidate", f"{v['val_loss_base']:.3f} -> {v['val_loss_candidate']:.3f}" if v else None),
            ("outputs changed", f"{v.get('outputs_differ')}/{v.get('prompts')}" if v else None),
            ("tokens/s", m.get("tokens_per_s")), ("stage wall s", m.get("stage_wall_s"))]
    for k, val in rows:
        if val is not None:
            t.add_row(k, f"{val:.4f}" if isinstance(val, float) and val < 100 else str(val))
    return t


# ------------------------------------------------------------------------------------------ the contract
class FinetuneInputs(StageData):
    dataset_dir: str
    dataset_hash: str
    force: bool = False  # train from scratch even when a finished run exists (not part of the key)


class FinetuneOutputs(StageData):
    adapter_dir: str
    run_key: str
    manifest: dict
    run_id: str
    skipped: bool


class FinetuneStage(Stage[FinetuneInputs, FinetuneOutputs]):
    name = "finetune"
    Inputs, Outputs = FinetuneInputs, FinetuneOutputs
    error = FinetuneError
    deterministic = (FinetuneError, ModelNotFound)

    def cache_key(self, loaded: LoadedConfig, inputs: FinetuneInputs) -> str:
        return run_key(loaded, inputs.dataset_hash)

    def outputs_present(self, loaded: LoadedConfig, outputs: FinetuneOutputs) -> bool:
        import json

        manifest = Path(outputs.adapter_dir) / MANIFEST
        if not manifest.exists():
            return False
        merged = json.loads(manifest.read_text()).get("merged_model")
        wants = loaded.config.finetune.method != "full" and (loaded.config.finetune.merge or
                                                             adapter_mode(loaded.config)[0] == "merged")
        # the merged copy is made on a cached run when a later config asks for it (no retraining)
        return not wants or bool(merged and (Path(merged) / "config.json").exists())

    def run(self, loaded: LoadedConfig, inputs: FinetuneInputs, console: Console | None = None) -> FinetuneOutputs:
        console = console or Console()
        with stage_run(loaded, "finetune") as run:
            result = run_finetune(loaded, Path(inputs.dataset_dir), inputs.dataset_hash, mlflow_run_id=run.info.run_id,
                                  console=console, force=inputs.force)
            log_finetune(result, loaded)
        console.print(summary_table(result))
        return FinetuneOutputs(adapter_dir=str(result.adapter_dir), run_key=result.manifest["run_key"],
                               manifest=result.manifest, run_id=run.info.run_id, skipped=result.skipped)

    def finished(self, loaded: LoadedConfig, dataset_hash: str) -> FinetuneOutputs:
        """The finished run of this configuration and dataset, without training (`make eval`, `make gate`).
        Raises FinetuneError when there is none."""
        import json

        adapter = finished_run(loaded, dataset_hash)
        if adapter is None:
            raise FinetuneError("no finished finetune run for this config and dataset: run `make finetune` first")
        manifest = json.loads((adapter / MANIFEST).read_text())
        return FinetuneOutputs(adapter_dir=str(adapter), run_key=manifest["run_key"], manifest=manifest, run_id="",
                               skipped=True)


FINETUNE = FinetuneStage()
