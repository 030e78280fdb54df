"""Benchmark of the finetune stage on the configured profile (default: QLoRA 4-bit on the embedded base model,
2 CPU cores), with the other LoRA method beside it (QLoRA <-> LoRA): wall time, training tokens/s, peak memory of
the training process, validation losses, the quantized layers the trained model really held, and the workspace's
overhead against plain `llamafactory-cli train` on the same rendered YAML.

    .venv/bin/python -m llmops bench finetune [--set finetune.max_steps=300]      (make bench-finetune)

Target (issue: finetune stage): the stage under 5 minutes on 2 cores. Writes docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from finetune.prepare import prepare_dataset
from finetune.finetune_stage import run_finetune
from finetune.train import dump_rendered, plain_config
from benchmarks.report import update_section
from workspace.config import add_cli_args, load_config, load_from_args
from workspace.envrunner import run_in_env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-plain", action="store_true", help="skip plain llamafactory-cli (the overhead measurement)")
    args = ap.parse_args(argv)
    loaded = load_from_args(args)
    ft0 = loaded.config.finetune
    prepared = prepare_dataset(loaded)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-", dir=Path.cwd() / "models"))
    try:
        # 1) plain `llamafactory-cli train` on the YAML the stage renders (run first: the stage must not profit
        #    from warm caches), 2) the stage itself, from scratch, into another folder
        from finetune.train import render_llamafactory_config

        plain_dir = work / "plain"
        cfg = plain_config(render_llamafactory_config(loaded, prepared.path, plain_dir))
        plain_yaml = work / "plain.yaml"
        plain_yaml.write_text(dump_rendered(cfg, f"llamafactory-cli train {plain_yaml}"), encoding="utf-8")
        plain_s = None
        if not args.no_plain:
            t1 = time.perf_counter()
            run_in_env("train", ["llamafactory-cli", "train", str(plain_yaml)], log_path=work / "plain.log", echo=False,
                       extra_env={"DISABLE_VERSION_CHECK": "1"})
            plain_s = time.perf_counter() - t1

        rows, results = [], {}
        methods = [ft0.method] + (["lora"] if ft0.method == "qlora" else ["qlora"] if ft0.method == "lora" else [])
        for method in methods:  # the profile's method first (it is the one with a target), then the other one
            over = [f"finetune.method={method}", "finetune.quantization_bit=" + ("4" if method == "qlora" else "null")]
            lm = load_config(args.config, profile=args.profile, overrides=list(args.overrides) + over)
            t0 = time.perf_counter()
            result = run_finetune(lm, prepared.path, prepared.content_hash, output_root=work / f"stage-{method}")
            stage_s = time.perf_counter() - t0
            m = result.manifest
            v = m.get("verification") or {}
            mc = m.get("method_check") or {}
            results[method] = (result, stage_s)
            rows.append(f"| {method}{' (profile)' if method == ft0.method else ''} | "
                        f"{(str(mc.get('quantized_layers')) + ' x ' + mc['quantized_layer_type']) if mc.get('quantized_layers') else 'none'} | "
                        f"{stage_s:.0f} s | {m['stage_wall_s']:.0f} s | {m.get('tokens_per_s')} | {mc.get('peak_rss_mb')} MB | "
                        f"{m.get('final_val_loss'):.3f} | {v.get('val_loss_base'):.3f} | {v.get('val_loss_candidate'):.3f} | "
                        f"{v.get('outputs_differ')}/{v.get('prompts')} |")
            print(f"{method}: stage {stage_s:.0f} s (training {m['stage_wall_s']:.0f} s), tokens/s {m.get('tokens_per_s')}, "
                  f"peak RSS {mc.get('peak_rss_mb')} MB, quantized layers {mc.get('quantized_layers')}", flush=True)
        result, stage_s = results[ft0.method]
        m = result.manifest
        v = m.get("verification") or {}
        train_part = m["stage_wall_s"]
        verdict = "meets" if stage_s < 300 else "MISSES"
        example = (v and json.loads((result.output_dir / "verification.json").read_text())["examples"][0]) or {}
        body = (
            f"Profile `{loaded.profile}`: r{ft0.lora_rank}/a{ft0.lora_alpha}, target {ft0.lora_target}, {ft0.max_steps} "
            f"steps x batch {ft0.batch_size}, cutoff {ft0.cutoff_len}, base {m['base_model']} "
            f"({m.get('total_params') or '?'} params as loaded, {m.get('trainable_params'):,} trainable). Each method trained "
            "from scratch by the stage; `quantized layers` is what the model being trained held when training began "
            "(finetune/lf_train.py), not what was asked.\n\n"
            "| method | quantized layers (seen in training) | stage wall (train + verify) | training | training tokens/s | "
            "peak RSS (training process) | final val loss (trainer) | val loss base | val loss candidate | outputs changed |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            + (f"Workspace overhead on the profile's method: plain `llamafactory-cli train` on the same YAML {plain_s:.0f} s vs "
               f"{train_part:.0f} s of training in the stage ({train_part - plain_s:+.0f} s). " if plain_s is not None else
               "(Run with --no-plain: the overhead against plain `llamafactory-cli train` was not measured this time.) ")
            + f"Target: the stage under 5 minutes: {stage_s:.0f} s, {verdict}.\n\n"
            f"Val loss base/candidate = mean cross-entropy of the answer tokens on the validation split, computed by "
            f"finetune/verify_adapter.py on the full-precision base with and without the adapter. Example (validation "
            f"prompt `{example.get('prompt', '')[:60]}`), candidate's first 48 tokens: "
            f"`{example.get('candidate', '')[:160].replace(chr(10), ' ')}`"
        )
        if not args.no_write:
            update_section("finetune", "Finetune stage: QLoRA 4-bit beside LoRA on the embedded base model",
                           "make bench-finetune  (python -m llmops bench finetune)", body)
        return 0 if stage_s < 300 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

