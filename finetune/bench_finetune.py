"""Benchmark of the finetune stage on the configured profile (default: QLoRA 4-bit on the embedded base model,
2 CPU cores): wall time, training tokens/s, validation loss of base vs candidate, and the workspace's overhead
against plain `llamafactory-cli train` on the same rendered YAML.

    .venv/bin/python -m finetune.bench_finetune [--set finetune.max_steps=300]      (make bench-finetune)

Target (issue: finetune stage): the stage under 5 minutes on 2 cores. Writes docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from workspace import offline

offline.apply()

from finetune.prepare import prepare_dataset  # noqa: E402
from finetune.finetune_stage import run_finetune  # noqa: E402
from finetune.train import dump_rendered, plain_config  # noqa: E402
from workspace.benchmarks import update_section  # noqa: E402
from workspace.config import add_cli_args, load_from_args  # noqa: E402
from workspace.envrunner import run_in_env  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    loaded = load_from_args(args)
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
        t1 = time.perf_counter()
        run_in_env("train", ["llamafactory-cli", "train", str(plain_yaml)], log_path=work / "plain.log", echo=False,
                   extra_env={"DISABLE_VERSION_CHECK": "1"})
        plain_s = time.perf_counter() - t1

        t0 = time.perf_counter()
        result = run_finetune(loaded, prepared.path, prepared.content_hash, output_root=work / "stage")
        stage_s = time.perf_counter() - t0
        m = result.manifest
        v = m.get("verification") or {}
        train_part = m["stage_wall_s"]
        ft = loaded.config.finetune
        print(f"stage {stage_s:.0f} s (training {train_part:.0f} s, verification {v.get('seconds')} s); plain "
              f"llamafactory-cli {plain_s:.0f} s; tokens/s {m.get('tokens_per_s')}; val loss base "
              f"{v.get('val_loss_base'):.3f} -> candidate {v.get('val_loss_candidate'):.3f}")
        verdict = "meets" if stage_s < 300 else "MISSES"
        example = (v and json.loads((result.output_dir / "verification.json").read_text())["examples"][0]) or {}
        body = (
            f"Profile `{loaded.profile}`: {ft.method} (4-bit nf4) r{ft.lora_rank}/a{ft.lora_alpha}, target {ft.lora_target}, "
            f"{ft.max_steps} steps x batch {ft.batch_size}, cutoff {ft.cutoff_len}, base {m['base_model']} "
            f"({m.get('total_params') or '?'} params, {m.get('trainable_params'):,} trainable).\n\n"
            "| stage wall (train + verify) | training (in stage) | plain `llamafactory-cli train`, same YAML | workspace overhead | training tokens/s | val loss base | val loss candidate | outputs changed | target |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| {stage_s:.0f} s | {train_part:.0f} s | {plain_s:.0f} s | {train_part - plain_s:+.0f} s | {m.get('tokens_per_s')} | "
            f"{v.get('val_loss_base'):.3f} | {v.get('val_loss_candidate'):.3f} | {v.get('outputs_differ')}/{v.get('prompts')} | "
            f"stage < 300 s: {verdict} |\n\n"
            f"Val loss = mean cross-entropy of the answer tokens on the validation split (base model vs base + adapter). "
            f"Example (validation prompt `{example.get('prompt', '')[:60]}`), candidate's first 48 tokens: "
            f"`{example.get('candidate', '')[:160].replace(chr(10), ' ')}`"
        )
        if not args.no_write:
            update_section("finetune", "Finetune stage (QLoRA on the embedded base model)",
                           "make bench-finetune  (python -m finetune.bench_finetune)", body)
        return 0 if stage_s < 300 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
