"""Benchmark of the prepare stage: 100,000 generated alpaca rows (with a sprinkle of PII, duplicates and bad
rows) through validation, cleaning, masking, token counting, dedup, split and the atomic write.

    .venv/bin/python -m llmops bench prepare [--rows 100000]      (make bench-prepare)

Target (issue: dataset preparation): under 60 s on the 2-core machine. Writes docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

from datagen.screens import generate
from finetune.prepare import prepare_dataset
from benchmarks.report import update_section
from workspace.config import load_config


def write_rows(path: Path, n: int, seed: int = 0) -> dict:
    base, _ = generate(n_train=2000, n_test=0, seed=seed)
    rng = random.Random(seed)
    kinds = {"good": 0, "pii": 0, "duplicate": 0, "bad": 0}
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            row = dict(base[i % len(base)])
            row["instruction"] = f"{row['instruction']} (요청 {i})"
            r = rng.random()
            if r < 0.01:
                row["input"] += f" 담당자 연락처 010-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}"
                kinds["pii"] += 1
            elif r < 0.02 and i:
                row["instruction"] = f"{base[(i - 1) % len(base)]['instruction']} (요청 {i - 1})"
                row["output"] = base[(i - 1) % len(base)]["output"]
                row["input"] = base[(i - 1) % len(base)]["input"]
                kinds["duplicate"] += 1
            elif r < 0.025:
                row["output"] = ""
                kinds["bad"] += 1
            else:
                kinds["good"] += 1
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return kinds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        src = work / "rows.jsonl"
        kinds = write_rows(src, args.rows)
        size_mb = src.stat().st_size / 1e6
        loaded = load_config(overrides=[f"data.sources=[{{path: '{src}', format: alpaca}}]", "data.test_source=null",
                                        f"data.output_dir={work / 'out'}", "data.test_ratio=0.05"])
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        result = prepare_dataset(loaded)
        seconds = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        s = result.stats
        print(f"prepare: {args.rows} rows ({size_mb:.0f} MB) in {seconds:.1f} s, peak RSS {rss:.0f} MB; "
              f"splits {s['splits']}, rejected {s['rows_rejected']}, duplicates {s['duplicates_exact'] + s['duplicates_normalized']}, "
              f"pii {s['pii_masked']}")
        verdict = "meets" if seconds < 60 else "MISSES"
        body = (
            "| rows | input | wall time | rows/s | peak RSS | rejected | duplicates | PII masked | target |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| {args.rows:,} | {size_mb:.0f} MB jsonl | {seconds:.1f} s | {args.rows / seconds:,.0f} | {rss:.0f} MB | "
            f"{s['rows_rejected']:,} | {s['duplicates_exact'] + s['duplicates_normalized']:,} | "
            f"{sum(s['pii_masked'].values()):,} | < 60 s: {verdict} |\n\n"
            f"Generated mix: {kinds}. Includes tokenizer loading, token counting with the base model tokenizer, "
            f"the length histogram and the atomic write (peak RSS of the whole process, before the run {rss0 / 1024:.0f} MB)."
        )
        if not args.no_write:
            update_section("prepare", "Dataset preparation throughput", f"make bench-prepare  (python -m llmops bench prepare --rows {args.rows})", body)
        return 0 if seconds < 60 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

