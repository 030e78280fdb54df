"""LLaMA-Factory's training entry point with two additions, run in the train environment:

    .venv-train/bin/python -m finetune.lf_train <rendered.yaml> --report <method_report.json>
    .venv-train/bin/python -m finetune.lf_train <rendered.yaml> --check-only [--other-machine]
    torchrun --nproc_per_node 2 -m finetune.lf_train <rendered.yaml> --report ...      (several GPUs)

1. Before anything loads, the YAML goes through LLaMA-Factory's own argument parser (HfArgumentParser over its
   ModelArguments/DataArguments/TrainingArguments/FinetuningArguments: an unknown key is an error), and every value
   of an enum-typed field is checked against the enum. The parser alone accepts any string for an enum field:
   `quantization_method: bitsandbytes` (the enum value is `bnb`) used to pass and silently train unquantized.
   A bad value exits 4 with `INVALID <key>: ...` naming the key and the accepted values.
2. Training is `llamafactory.train.tuner.run_exp` (what `llamafactory-cli train` calls) with one more callback:
   when training begins it inspects the model actually being trained and writes what it found (quantized layer
   types, LoRA modules, their rank, alpha and target names, trainable parameters) to --report, so the stage can
   check that the requested method happened, from the run itself; when training ends, the process's peak memory
   (RSS, and CUDA when present) is added.

The rendered YAML stays a plain LLaMA-Factory config: `llamafactory-cli train <rendered.yaml>` reruns it by hand.
Uses only what the train environment has (llamafactory, transformers, peft, torch, yaml).
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
import typing
from collections import Counter

import yaml

EXIT_INVALID = 4


def _enum_type(tp) -> type[enum.Enum] | None:
    """The Enum class behind a field type (also inside Optional[...]), or None."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    for arg in typing.get_args(tp):
        found = _enum_type(arg)
        if found:
            return found
    return None


def check_args(cfg: dict, hardware: bool = True) -> list[str]:
    """Problems LLaMA-Factory's parser would let through or reject, each naming the key. Empty: valid.
    hardware=False checks a config meant for another machine (a GPU profile on a CPU box): the parser's own
    checks run with bf16/fp16 off, since transformers refuses those where the hardware lacks them."""
    from transformers import HfArgumentParser

    from llamafactory.hparams import parser as lf_parser

    classes = lf_parser._TRAIN_ARGS  # the dataclasses `llamafactory-cli train` parses into
    problems: list[str] = []
    fields = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, hints.get(f.name, f.type))
    unknown = sorted(set(cfg) - set(fields))
    for key in unknown:
        problems.append(f"INVALID {key}: not an argument of LLaMA-Factory's train command")
    for key, value in cfg.items():
        enum_cls = _enum_type(fields.get(key))
        if enum_cls is None or value is None:
            continue
        allowed = [m.value for m in enum_cls]
        if value not in allowed:
            problems.append(f"INVALID {key}: {value!r} is not one of {allowed} ({enum_cls.__name__})")
    if cfg.get("deepspeed"):
        problems += _check_deepspeed(str(cfg["deepspeed"]))
    if problems:
        return problems
    parsed = cfg if hardware else {**cfg, "bf16": False, "fp16": False}
    if not hardware and cfg.get("deepspeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            # TrainingArguments imports DeepSpeed to read the file; the CPU train env has none (train-gpu has):
            # the file's shape was checked above, the rest of the config goes through the parser
            parsed = {k: v for k, v in parsed.items() if k != "deepspeed"}
    try:  # the parser itself: types, and each dataclass's own __post_init__ checks
        HfArgumentParser(classes).parse_dict(parsed, allow_extra_keys=False)
    except (ValueError, TypeError) as exc:
        problems.append(f"INVALID arguments: {exc}")
    return problems


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def model_report(model) -> dict:
    """What is being trained: counted on the live model when training begins."""
    layer_types: Counter = Counter()
    base_types: Counter = Counter()
    ranks, alphas, targets, linear_leaves = set(), set(), set(), set()
    lora_modules = 0
    for name, module in model.named_modules():
        cls = type(module)
        is_lora_part = ".lora_" in name
        if cls.__module__.startswith("bitsandbytes"):
            layer_types[f"bnb.{cls.__name__}"] += 1  # the weights as stored: bnb.Linear4bit = 4-bit
        elif cls.__module__ == "torch.nn.modules.linear" and cls.__name__ == "Linear" and not is_lora_part:
            layer_types["torch.nn.Linear"] += 1  # a full-precision linear layer of the base model (lm_head too)
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "r") and isinstance(module.r, dict):
            lora_modules += 1
            bcls = type(base)
            base_types[f"{bcls.__module__}.{bcls.__name__}"] += 1
            ranks.update(module.r.values())
            alphas.update(getattr(module, "lora_alpha", {}).values())
            targets.add(_leaf(name))
        elif (cls.__module__.startswith("bitsandbytes") or cls.__module__ == "torch.nn.modules.linear") \
                and not is_lora_part and "lm_head" not in name and not name.endswith("base_layer"):
            linear_leaves.add(_leaf(name))  # a linear layer that got no LoRA
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    config = getattr(model, "config", None)
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is not None and not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict()
    return {
        "layer_types": dict(layer_types),
        "lora_modules": lora_modules,
        "lora_base_layer_types": dict(base_types),
        "lora_ranks": sorted(ranks),
        "lora_alphas": sorted(alphas),
        "lora_targets": sorted(targets),
        "unwrapped_linear": sorted(linear_leaves - targets),
        "trainable_params": trainable,
        "total_params": total,
        "quantization_config": {k: str(v) for k, v in (qcfg or {}).items()
                                if k in ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                                         "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")},
    }


def _callback(path: str):
    from transformers import TrainerCallback

    class MethodReport(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None or not state.is_world_process_zero:
                return
            report = model_report(model)
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2)
            os.replace(tmp, path)
            print(f"METHOD_REPORT {json.dumps({k: report[k] for k in ('layer_types', 'lora_modules', 'lora_ranks')})}",
                  flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero or not os.path.exists(path):
                return
            import resource

            import torch

            with open(path, encoding="utf-8") as fh:
                report = json.load(fh)
            report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
            if torch.cuda.is_available():
                report["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2)
            os.replace(tmp, path)

    return MethodReport()


def _check_deepspeed(path: str) -> list[str]:
    """The DeepSpeed JSON exists, parses, and names a ZeRO stage 0-3 (DeepSpeed's own parser runs at launch)."""
    try:
        with open(path, encoding="utf-8") as fh:
            ds = json.load(fh)
    except FileNotFoundError:
        return [f"INVALID deepspeed: {path} does not exist"]
    except ValueError as exc:
        return [f"INVALID deepspeed: {path} is not JSON ({exc})"]
    stage = (ds.get("zero_optimization") or {}).get("stage", 0) if isinstance(ds, dict) else None
    if stage not in (0, 1, 2, 3):
        return [f"INVALID deepspeed: {path} has zero_optimization.stage {stage!r}; use 0, 1, 2 or 3"]
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="+", help="the rendered LLaMA-Factory YAML (several only with --check-only)")
    ap.add_argument("--report", help="write the method report (JSON) here when training begins")
    ap.add_argument("--check-only", action="store_true", help="validate the YAML and exit")
    ap.add_argument("--other-machine", action="store_true",
                    help="with --check-only: the YAML is for another machine; do not check bf16/fp16 against this one")
    args = ap.parse_args(argv)
    if len(args.config) > 1 and not args.check_only:
        ap.error("training takes one config")
    invalid = False
    for path in args.config:
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh) or {}
        problems = check_args(cfg, hardware=not (args.check_only and args.other_machine))
        for p in problems:
            print(f"{p}  [{path}]" if len(args.config) > 1 else p, flush=True)
        invalid = invalid or bool(problems)
        if args.check_only and not problems:
            print(f"VALID {path}", flush=True)
    if invalid:
        return EXIT_INVALID
    if args.check_only:
        return 0
    from llamafactory.train.tuner import run_exp

    run_exp(args=cfg, callbacks=[_callback(args.report)] if args.report else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
