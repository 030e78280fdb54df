"""The one command line (llmops/cli.py): every make target runs `python -m llmops <command>`, which applies the
guard and the offline environment once; the modules it dispatches to carry no command prelude of their own."""
from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys

import pytest

from llmops.cli import BENCHMARKS, COMMANDS
from workspace import offline
from workspace.paths import ROOT


def _llmops(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmops", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=offline.subprocess_env())


def test_the_commands_are_listed_and_a_typo_is_named():
    listed = _llmops("--help")
    assert listed.returncode == 0 and all(name in listed.stdout for name in COMMANDS) and "bench <name>" in listed.stdout
    assert _llmops().returncode == 2  # no command: the list, and a usage error
    typo = _llmops("pipline")
    assert typo.returncode == 2 and "unknown command 'pipline' (did you mean 'pipeline'?)" in typo.stderr
    bench = _llmops("bench", "servr")
    assert bench.returncode == 2 and "unknown benchmark 'servr'" in bench.stderr and "team-host" in bench.stderr


def test_a_command_hands_its_options_to_the_modules_own_parser():
    shown = _llmops("prepare", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: llmops prepare") and "--force" in shown.stdout
    bad = _llmops("bench", "pii", "--no-such-option")
    assert bad.returncode == 2 and "llmops bench pii: error: unrecognized arguments: --no-such-option" in bad.stderr


@pytest.mark.parametrize("module", sorted({c.module for c in COMMANDS.values()} |
                                          {f"benchmarks.{b.replace('-', '_')}" for b in BENCHMARKS}))
def test_every_command_module_has_a_main_that_takes_argv(module):
    main = importlib.import_module(module).main
    assert list(inspect.signature(main).parameters) == ["argv"], module


def test_no_module_carries_its_own_command_prelude():
    """The guard, the offline settings and `make prefect-up`'s server are applied by llmops/cli.py, before the module
    is imported: no module repeats them (which needed imports after code: `noqa: E402`) or runs as a command itself
    (except those that run in an engine's environment or as the guard)."""
    engine_entries = {"benchmarks/gpu_fit.py", "finetune/lf_train.py", "finetune/verify_adapter.py",  # train env
                      "serving/validate_vllm_config.py", "workspace/vllm_launcher.py",  # serve env
                      "workspace/guard.py", "workspace/setup_env.py"}  # the guard; setup, before .venv exists
    for pkg in ("flows", "benchmarks", "eval", "finetune", "serving", "rag", "workspace", "llmops"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            text = path.read_text(encoding="utf-8")
            assert "noqa: E402" not in text, rel
            if rel not in engine_entries and rel != "llmops/__main__.py":
                assert 'if __name__ == "__main__"' not in text, f"{rel}: run it as `python -m llmops ...`"
            assert not re.search(r"^offline\.apply\(\)", text, re.M) or rel == "llmops/cli.py", rel


def test_every_make_target_runs_the_one_command_line():
    modules = re.findall(r"\$\(PY\) -m (\S+)", (ROOT / "Makefile").read_text())
    assert modules and set(modules) == {"llmops", "pytest"}, sorted(set(modules))
