"""`make bench-plan`: the GPU path as far as a CPU machine can take it, timed, into docs/BENCHMARKS.md (section plan):
resolving both CUDA locks for Linux x86-64 / Python 3.11 (uv, no install), `make plan --no-hardware-check` for every
GPU profile (both engines' parsers, one start each), and each profile's training and serving fit per GPU.

    .venv/bin/python -m llmops bench plan
"""
from __future__ import annotations

import time

from finetune.fit import train_fit
from flows.plan import check_with_engines, plan_static
from serving.config import fit_report, model_spec
from workspace import gpu_lock as lock
from benchmarks.report import update_section
from workspace.config import load_config
from workspace.paths import PROFILES


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    checks = [lock.check_lock(v) for v in lock.VARIANTS]
    lock_s = time.perf_counter() - t0
    profiles = sorted(p.stem for p in PROFILES.glob("*.yaml") if load_config(profile=p.stem).config.finetune.device == "cuda")
    t0 = time.perf_counter()
    plans = [plan_static(p, None, [], None) for p in profiles]
    check_with_engines(plans, hardware_check=False)
    plan_s = time.perf_counter() - t0
    rows = []
    for p in plans:
        c = p.loaded.config
        tf = train_fit(p.loaded)
        model = c.base_model.hub_id if c.base_model.source == "hub" else c.base_model.path
        sf = fit_report(model_spec(model), c.serving)
        ds = f"ZeRO-{tf.zero_stage}" if tf.zero_stage else "-"
        rows.append(f"| `{p.profile}` | {c.finetune.num_gpus} x {tf.budget_gib:g} GiB | {ds} | {tf.need_gib:.2f} GiB "
                    f"({'fits' if tf.fits else 'DOES NOT FIT'}) | {sf.need_per_gpu_gib:.2f} of {sf.budget_per_gpu_gib:.2f} GiB "
                    f"({'fits' if sf.fits else 'DOES NOT FIT'}) | {'ok' if p.ok else 'FAIL'} |")
    body = "\n".join([
        f"CUDA locks re-resolved for Linux x86-64 / Python {lock.PYTHON_VERSION} without installing: "
        + ", ".join(f"{r.variant} {r.packages} packages {'ok' if r.ok else 'FAILED'}" for r in checks)
        + f", {lock_s:.1f} s for both (uv from package metadata; `pip install --dry-run` downloads 3-5 GB of wheels).",
        "",
        f"`make plan NO_HW=1` for {len(profiles)} GPU profiles (LLaMA-Factory's and vLLM's parsers, one start each): "
        f"{plan_s:.1f} s.",
        "",
        "| profile | GPUs (budget each) | DeepSpeed | training need per GPU | serving need per GPU | plan |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "The arithmetic behind each number is in `.cache/plan/<profile>/train_fit.txt` and `serve_fit.txt` (formula in "
        "finetune/fit.py and serving/config.py). Estimates on the safe side, not measurements on the cards.",
    ])
    update_section("plan", "GPU path on a CPU machine: lock resolution, make plan, fit per profile",
                   "make bench-plan", body)
    print(body)
    return 0 if all(r.ok for r in checks) and all(p.ok for p in plans) else 1

