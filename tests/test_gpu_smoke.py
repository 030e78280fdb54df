"""`make gpu-smoke DEVICE=cpu`: the GPU run's single command, rehearsed here with the CPU environments.

The same script and steps as on the card (benchmarks/gpu_smoke.sh -> benchmarks.gpu_smoke), on cpu_smoke: the base
build, prepare, QLoRA 4-bit through LLaMA-Factory (bitsandbytes Linear4bit layers on the CPU), the in-process
scorer, the gate, promotion into a file-backed MLflow registry, the champion fetched back and answering, the
agreement step, and the fit measurement's code on a tiny shape. A report even when a step fails: a step that
cannot run is named with its reason.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains cpu_smoke's 40-step QLoRA adapter (cached across runs by its key)

ROOT = Path(__file__).resolve().parents[1]


def _smoke(out: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_smoke.sh", str(out), "cpu", "--work", str(work), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500, env={**os.environ})


def test_the_cpu_rehearsal_runs_every_step_and_reports(tmp_path):
    proc = _smoke(tmp_path / "out", tmp_path / "work")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert list(steps) == ["base", "prepare", "finetune", "evaluate", "gate", "promote", "serve", "fit", "agree"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    for name in steps:
        assert (tmp_path / "out" / f"{name}.log").exists()
    # the model that trained held bitsandbytes 4-bit layers (the finetune stage's own method check)
    assert report["method_check"]["quantization_bit"] == 4
    assert "Linear4bit" in report["method_check"]["quantized_layer_type"]
    # promoted into the file-backed registry under --work, fetched back from it and answering
    assert report["promoted"]["version"] == "1"
    assert (tmp_path / "work" / "mlruns").is_dir()
    assert report["serve"]["answer"].strip()
    # the agreement table compares item by item (CPU against CPU here: identical by construction)
    assert report["agree"]["ok"] and report["agree"]["kobest"]
    assert all(v["differ"] == 0 for v in report["agree"]["kobest"].values())
    # the fit measurement's code ran on the tiny shape, 4-bit on the CPU
    fit = report["fit"][0]
    assert fit["shape"] == "tiny" and fit["linear4bit_layers"] > 0 and fit["tokens_per_s"] > 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| finetune | ok |" in md and "the fit check, measured" in md
    assert "no Prefect" in md


def test_a_failing_step_is_reported_and_what_needs_it_is_skipped_by_name(tmp_path):
    """A step that fails names why; the steps that need it are skipped with the name of the missing one; the report
    is written all the same."""
    proc = _smoke(tmp_path / "out", tmp_path / "work", "--steps", "base,prepare,finetune,evaluate,fit",
                  "--set", "data.test_source.path=data/raw/screens/missing.jsonl")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["base"]["status"] == "ok"
    assert steps["prepare"]["status"] == "failed" and "missing.jsonl" in steps["prepare"]["note"]
    assert "set in --set data.test_source.path" in steps["prepare"]["note"]  # the flag that set it, not the file
    assert steps["finetune"]["status"] == "skipped" and "needs" in steps["finetune"]["note"]
    assert steps["evaluate"]["status"] == "skipped"
    assert steps["fit"]["status"] == "ok"  # independent of the failure
    assert (tmp_path / "out" / "report.md").exists()


def test_a_spent_budget_skips_the_rest_by_name_and_still_reports(tmp_path):
    """On the lent machine the whole call is bounded (--budget-s): a step that would start without 30 s left is
    skipped with the reason, and the report (rewritten after every step) is there."""
    proc = _smoke(tmp_path / "out", tmp_path / "work", "--steps", "base,fit", "--budget-s", "20")
    assert proc.returncode == 0, proc.stdout[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(s["step"], s["status"]) for s in report["steps"]] == [("base", "skipped"), ("fit", "skipped")]
    assert all("--budget-s 20" in s["note"] for s in report["steps"])
