"""`make gpu-kit`: the wheels that travel to the lent GPU machine (no GPU needed here).

The kit is downloaded once from PyPI (idempotent; about 60 MB) and checked as the machine would meet it: within the
64 MiB one device call carries with the working tree, one version per package, every requirement of every wheel met
by the kit or the machine's listed packages (or missing from the CPU lock too, named), installable for Python 3.12.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # downloads the kit from PyPI once (about 60 MB)

from workspace import gpu_kit
from workspace.gpu_kit import KIT, TRAVEL_LIMIT, build, check, lock, read_lock

ROOT = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).parent / "uv"
LF_WAIVED = {"av", "gradio", "hf-transfer", "modelscope", "sse-starlette"}  # LLaMA-Factory's web UI and media


@pytest.fixture(scope="module")
def kit() -> Path:
    build()
    return KIT


def test_the_kit_travels_and_meets_its_own_requirements(kit):
    rep = check()
    assert rep.ok, "\n".join(rep.problems)
    assert rep.kit_bytes + rep.tree_bytes <= TRAVEL_LIMIT
    assert {re.search(r" -> ([A-Za-z0-9._-]+)", w).group(1) for w in rep.waived} == LF_WAIVED
    assert all(w.startswith("train: llamafactory -> ") for w in rep.waived)
    for site in ("train", "workspace"):
        names = [p.name.split("-")[0].lower() for p in (kit / site).glob("*.whl")]
        assert len(names) == len(set(names)), f"{site}: a package in two versions"
    # what the cuda_tiny path needs is there, in the CPU envs' versions
    pins = {(e.site, e.name): e.version for e in read_lock()}
    assert pins[("train", "llamafactory")] == "0.9.5" and pins[("train", "transformers")] == "5.6.0"
    assert ("train", "bitsandbytes") in pins and ("workspace", "lm-eval") in pins and ("workspace", "deepeval") in pins
    assert ("workspace", "mlflow-skinny") in pins and ("workspace", "xgrammar") in pins
    assert not any(name == "vllm" for _, name in pins), "vLLM cannot travel (its wheel alone is over the limit)"


def test_the_cuts_keep_what_runs(kit):
    bnb = next((kit / "train").glob("bitsandbytes-*.whl"))
    with zipfile.ZipFile(bnb) as zf:
        libs = sorted(Path(n).name for n in zf.namelist() if "libbitsandbytes_" in n)
        record = zf.read(next(n for n in zf.namelist() if n.endswith("RECORD"))).decode()
    assert libs == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    assert "cuda128" not in record and "libbitsandbytes_cuda130.so" in record
    lm = next((kit / "workspace").glob("lm_eval-*.whl"))
    with zipfile.ZipFile(lm) as zf:
        names = zf.namelist()
    assert "lm_eval/tasks/__init__.py" in names
    assert not any(n.startswith("lm_eval/tasks/kobest/") or n.startswith("lm_eval/tasks/mmlu/") for n in names)


def test_each_site_installs_for_the_machines_python(kit, tmp_path):
    """uv installs each site for CPython 3.12 manylinux x86-64 as pip does there (no index, no dependencies)."""
    for site in ("train", "workspace"):
        subprocess.run([str(UV), "pip", "install", "--quiet", "--no-config", "--target", str(tmp_path / site),
                        "--python-version", "3.12", "--python-platform", "x86_64-manylinux_2_28", "--no-deps",
                        "--no-index", *map(str, sorted((kit / site).glob("*.whl")))], check=True)
    assert (tmp_path / "train" / "bitsandbytes" / "libbitsandbytes_cuda130.so").exists()
    assert (tmp_path / "workspace" / "deepeval").is_dir()


def test_the_cut_lm_eval_runs_the_workspaces_kobest_tasks(kit, tmp_path):
    """The cut lm-eval (imported here in place of the env's own) still finds the KoBEST task YAMLs of configs/tasks."""
    lm = next((kit / "workspace").glob("lm_eval-*.whl"))
    subprocess.run([str(UV), "pip", "install", "--quiet", "--no-config", "--target", str(tmp_path), "--no-deps",
                    "--no-index", str(lm)], check=True)
    code = ("import lm_eval; from lm_eval.tasks import TaskManager; assert lm_eval.__file__.startswith(%r); "
            "print(sorted(t for t in TaskManager(include_path='configs/tasks').all_tasks if t.startswith('kobest_')))"
            % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    for task in ("kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic"):
        assert task in out.stdout


def test_the_lock_is_the_closure_of_its_in_file(kit, tmp_path):
    """Re-closing requirements/gpu-kit.in over the CPU locks gives the committed lock (a changed .in, CPU lock or
    machine list without `make gpu-kit LOCK=1` fails here)."""
    fresh = lock(tmp_path / "gpu-kit.lock")
    assert [e.line() for e in fresh] == [e.line() for e in read_lock()]


def test_the_check_names_what_would_break_the_install(kit, tmp_path):
    bad = tmp_path / "kit"
    shutil.copytree(kit / "train", bad / "train")
    shutil.copytree(kit / "workspace", bad / "workspace")
    core = next((bad / "workspace").glob("pydantic_core-*.whl"))
    core.unlink()  # pydantic pins pydantic-core exactly: the machine does not have it
    click = next((bad / "train").glob("click-*.whl"), None) or next((bad / "workspace").glob("click-*.whl"))
    shutil.copyfile(click, click.with_name(click.name.replace(click.name.split("-")[1], "8.0.0")))
    rep = check(bad)
    text = "\n".join(rep.problems)
    assert "pydantic requires pydantic-core" in text and "neither the kit nor the machine" in text
    assert "pydantic-core==" in text and "missing" in text
    assert "click in 2 versions" in text and "click==8.0.0 is not in requirements/gpu-kit.lock" in text


def test_a_machine_assumption_needs_its_reason(tmp_path, monkeypatch):
    bad = tmp_path / "gpu-kit.in"
    bad.write_text("[workspace]\ndeepeval\n[machine]\ngrpcio\n")
    monkeypatch.setattr(gpu_kit, "IN", bad)
    with pytest.raises(gpu_kit.KitError, match=r"gpu-kit.in:4: \[machine\] grpcio needs its reason"):
        gpu_kit.read_in(bad)
    bad.write_text("[workspace]\ndeepeval\n[machine]\nnot-there  # because\n")
    with pytest.raises(gpu_kit.KitError, match="not-there is not in requirements/gpu-machine.txt"):
        gpu_kit.load_machine()
