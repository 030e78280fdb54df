"""KoBEST through lm-evaluation-harness, with the task YAMLs of configs/tasks/.

Two scorers give the same numbers on the same model: `hf` (in-process, base model plus an optional peft adapter)
and `vllm` (lm-eval's `local-completions` against a vLLM server, the adapter served as a LoRA module), so what is
evaluated is what will be served. Called by eval/evaluate.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from workspace.config.evaluation import EvalConfig
from workspace.device import resolve_dtype, torch_device
from workspace.endpoint import Endpoint, EndpointError
from workspace.paths import CONFIGS, resolve

TASK_DIR = CONFIGS / "tasks"
SCHEMA = {
    "kobest_boolq": {"paragraph": str, "question": str, "label": int},
    "kobest_copa": {"premise": str, "question": str, "alternative_1": str, "alternative_2": str, "label": int},
    "kobest_wic": {"word": str, "context_1": str, "context_2": str, "label": int},
    "kobest_hellaswag": {"context": str, "ending_1": str, "ending_2": str, "ending_3": str, "ending_4": str, "label": int},
    "kobest_sentineg": {"sentence": str, "label": int},
}
N_LABELS = {"kobest_boolq": 2, "kobest_copa": 2, "kobest_wic": 2, "kobest_hellaswag": 4, "kobest_sentineg": 2}


class EvalError(RuntimeError):
    """An evaluation input or engine problem; the message names the task, file or endpoint."""


def local_files(task: str, kobest_dir: Path) -> dict[str, Path]:
    short = task.removeprefix("kobest_")
    files = {"test": kobest_dir / short / "test.jsonl"}
    if (kobest_dir / short / "train.jsonl").exists():
        files["train"] = kobest_dir / short / "train.jsonl"
    return files


def validate_task_file(task: str, path: Path) -> int:
    """Exactly skt/kobest_v1's fields and types, labels in range. Returns the row count."""
    if not path.exists():
        raise EvalError(f"{task}: data file {path} not found. Set eval.kobest_dir to a folder with "
                        f"<task>/test.jsonl files in skt/kobest_v1's schema (the shipped ones are in data/raw/kobest)")
    schema = SCHEMA[task]
    n = 0
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalError(f"{task}: {path}:{no}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{task}: {path}:{no}: expected an object")
            missing = [k for k in schema if k not in row]
            extra = [k for k in row if k not in schema]
            if missing or extra:
                raise EvalError(f"{task}: {path}:{no}: wrong schema (missing {missing or '-'}, unexpected {extra or '-'}); "
                                f"expected exactly {list(schema)}")
            for key, typ in schema.items():
                if not isinstance(row[key], typ) or (typ is str and not row[key].strip()):
                    raise EvalError(f"{task}: {path}:{no}: field '{key}' must be a non-empty {typ.__name__}")
            if not 0 <= row["label"] < N_LABELS[task]:
                raise EvalError(f"{task}: {path}:{no}: label {row['label']} out of range 0..{N_LABELS[task] - 1}")
            n += 1
    if n == 0:
        raise EvalError(f"{task}: {path} is empty: an empty task would score nothing")
    return n


def task_configs(cfg: EvalConfig, hub_enabled: bool) -> list[dict]:
    """The task dicts handed to lm-eval: the YAMLs of configs/tasks, with the data source from config."""
    from lm_eval.tasks._yaml_loader import load_yaml

    out = []
    for task in cfg.kobest_tasks:
        path = TASK_DIR / f"{task}.yaml"
        if not path.exists():
            raise EvalError(f"{task}: no task file {path}")
        tc = load_yaml(path)
        tc.pop("tag", None)
        if cfg.kobest_source == "local":
            files = local_files(task, resolve(cfg.kobest_dir))
            for split, f in files.items():
                validate_task_file(task, f)
            tc["dataset_path"] = "json"
            tc.pop("dataset_name", None)
            tc["dataset_kwargs"] = {"data_files": {k: str(v) for k, v in files.items()}}
            if "train" not in files:
                tc.pop("training_split", None)
        elif not hub_enabled:
            raise EvalError("eval.kobest_source is 'hub' but hub.enabled is false")
        out.append(tc)
    return out


@dataclass
class KobestResult:
    metrics: dict[str, float]  # "kobest_boolq/acc" -> value
    items: list[dict]  # one row per item: task, id, prompt, choices, target, pred, acc
    seconds: float
    n_items: int


def _model_spec(backend: str, base: str, adapter: Optional[str], endpoint: Optional[Endpoint],
                cfg: EvalConfig) -> tuple[str, dict]:
    if backend == "hf":
        # eval.device / eval.dtype (auto: float32 on the CPU, bf16 or fp16 on a GPU; workspace/device.py)
        args = {"pretrained": base, "dtype": resolve_dtype(cfg.device, cfg.dtype), "device": torch_device(cfg.device),
                "trust_remote_code": False}
        if adapter:
            args["peft"] = adapter
        return "hf", args
    if endpoint is None:
        raise EvalError("backend 'vllm' needs a running endpoint (workspace.vllm_server)")
    try:
        endpoint.models()  # a refused key fails here with the variable named, not as lm-eval's retries
        return "local-completions", endpoint.lm_eval_args(tokenizer=base)
    except EndpointError as exc:
        raise EvalError(f"KoBEST through {endpoint.base_url}: {exc}") from None


def run_kobest(cfg: EvalConfig, base: str, adapter: Optional[str], *, backend: str = "hf", hub_enabled: bool = False,
               endpoint: Optional[Endpoint] = None, batch_size: int = 16) -> KobestResult:
    """Score the configured KoBEST tasks. Raises EvalError naming the task/file/endpoint on failure."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = task_configs(cfg, hub_enabled)
    model, model_args = _model_spec(backend, base, adapter, endpoint, cfg)
    t0 = time.time()
    try:
        # the tasks are whole configs (task_configs): lm-eval's own ~14k task YAMLs are not indexed, which its default
        # TaskManager does on every call (about 10-24 s of parsing per evaluation on 2 cores)
        manager = TaskManager(include_defaults=False, metadata=dict(model_args))
        res = lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            task_manager=manager,
            # vllm backend: up to batch_size prompts per HTTP request, num_concurrent requests in flight
            batch_size=batch_size, log_samples=True, random_seed=0, numpy_random_seed=0,
            torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0, confirm_run_unsafe_code=False,
        )
    except Exception as exc:  # noqa: BLE001 - lm-eval raises many kinds; name what was being scored
        where = endpoint.base_url if endpoint else (adapter or base)
        raise EvalError(f"KoBEST scoring with backend {backend!r} failed for {where}: {type(exc).__name__}: {exc}") from exc
    seconds = time.time() - t0
    metrics: dict[str, float] = {}
    for task, values in res["results"].items():
        for key, value in values.items():
            if not isinstance(value, (int, float)) or "_stderr" in key or key in ("alias", "sample_len"):
                continue
            name = key.split(",")[0]
            metrics[f"{task}/{'f1_macro' if name == 'f1' else name}"] = float(value)
    items = []
    for task, samples in res.get("samples", {}).items():
        for s in samples:
            lls = [r[0] for r in s["filtered_resps"]] if s.get("filtered_resps") else []
            items.append({
                "task": task, "id": f"{task}:{s['doc_id']}", "prompt": s["arguments"][0][0] if s.get("arguments") else "",
                "target": s.get("target"), "pred": int(max(range(len(lls)), key=lambda i: lls[i])) if lls else None,
                "loglikelihoods": [round(float(x), 5) for x in lls], "acc": float(s.get("acc", 0.0)),
            })
    return KobestResult(metrics, items, seconds, len(items))
