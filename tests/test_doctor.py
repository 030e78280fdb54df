"""`make doctor` names a broken environment and the fix (a real check against a missing venv)."""
from __future__ import annotations

import pytest

from workspace import doctor, paths


def test_missing_environment_is_reported_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(paths.VENVS, "train", tmp_path / "no-venv")
    monkeypatch.setitem(doctor.VENVS, "train", tmp_path / "no-venv")
    results = doctor.checks("models/base-tiny", envs=("train",))
    assert len(results) == 1 and not results[0].ok
    assert "setup_env.py train --force" in results[0].fix and "no-venv missing" in results[0].detail


@pytest.mark.slow
def test_engines_answer(monkeypatch):
    results = doctor.checks("models/base-tiny")
    by = {(c.env, c.name): c for c in results}
    assert by[("train", "llamafactory-cli version")].ok and "0.9.5" in by[("train", "llamafactory-cli version")].detail
    assert by[("serve", "vllm launcher --help")].ok
    assert all(c.ok for c in results), [c for c in results if not c.ok]
