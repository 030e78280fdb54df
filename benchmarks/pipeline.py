"""`make bench-pipeline`: the pipeline's own time on the profile, from nothing and then cached.

Runs `python -m llmops pipeline` twice, as a fresh clone would after `make setup` (environments and base model
present): the MLflow store, processed data, adapters, Qdrant folder and Prefect results all start empty (in a
temporary folder, so the workspace's own state is untouched). Writes the per-stage seconds of both runs to
docs/BENCHMARKS.md (section pipeline). Targets (issue: pipeline): first run < 15 min, second < 10% of the first.

    .venv/bin/python -m llmops bench pipeline [--profile cpu_smoke]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workspace import offline
from benchmarks.report import update_section
from workspace.config import add_cli_args
from workspace.paths import ROOT


def cached_sentence(summary: dict) -> str:
    """What the second run's stage records say, not what we hope they say."""
    stages = summary["stages"]
    ran = [n for n, st in stages.items() if st["status"] not in ("cached", "skipped")]
    if not ran:
        return "every stage of the second run was cached (or skipped)."
    listed = ", ".join(f"{n} ({stages[n]['status']})" for n in ran)
    return f"in the second run these stages were NOT cached: {listed}."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    iso = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/artifacts",
           f"data.output_dir={tmp}/processed", f"finetune.output_dir={tmp}/adapters", f"rag.qdrant.path={tmp}/qdrant"]
    argv = [sys.executable, "-m", "llmops", "pipeline", "--config", args.config or "configs/pipeline.yaml",
            *(["--profile", args.profile] if args.profile else []), *[a for o in list(args.overrides) + iso for a in ("--set", o)]]
    env = offline.subprocess_env(extra={"PREFECT_HOME": str(tmp / "prefect"), "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "storage")})
    runs = []
    try:
        for label in ("first (empty state)", "second (unchanged)"):
            print(f"[bench-pipeline] {label}: {' '.join(argv[2:4])} ...", flush=True)
            t0 = time.monotonic()
            proc = subprocess.run(argv, cwd=ROOT, env=env)
            seconds = time.monotonic() - t0
            if proc.returncode != 0:
                print(f"[error] the pipeline failed (exit {proc.returncode}) on the {label} run", file=sys.stderr)
                return 2
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
            parent = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'pipeline'",
                                        order_by=["start_time DESC"], max_results=1, output_format="list")[0]
            summary = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/pipeline/summary.json")
            runs.append((label, seconds, summary))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stages = list(runs[0][2]["stages"])
    lines = ["| run | process wall s | flow s | " + " | ".join(stages) + " |", "|---|---|---|" + "---|" * len(stages)]
    for label, seconds, s in runs:
        cells = [f"{s['stages'][n]['status']} {s['stages'][n]['seconds']}" for n in stages]
        lines.append(f"| {label} | {seconds:.0f} | {s['seconds']:.0f} | " + " | ".join(cells) + " |")
    ratio = runs[1][1] / runs[0][1]
    body = ("The pipeline alone (environments and base model already built: `make setup` is measured in its own "
            "section), from an empty MLflow store, processed-data folder, adapters folder, Qdrant folder and Prefect "
            f"result storage, then again unchanged. Profile: {runs[0][2]['profile']}.\n\n" + "\n".join(lines)
            + f"\n\nFirst run {runs[0][1] / 60:.1f} min (target < 15 min); second run {runs[1][1]:.0f} s = "
            f"{ratio:.1%} of the first (target < 10%); " + cached_sentence(runs[1][2]) + "\n")
    update_section("pipeline", "Pipeline: end to end, then cached", "make bench-pipeline", body)
    print(body)
    print(json.dumps({"first_s": round(runs[0][1], 1), "second_s": round(runs[1][1], 1), "ratio": round(ratio, 4)}))
    return 0

