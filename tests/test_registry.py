"""Promotion in the MLflow registry (a real SQLite-backed store): first promotion, champion/previous aliases,
atomicity under a failure injected after each step, rollback, and errors that name the cause."""
from __future__ import annotations

import pytest

from serving.registry import (
    CANDIDATE, CHAMPION, PREVIOUS, PromotionError, alias_version, fetch_champion, promote, rollback,
)
from conftest import make_bundle
from workspace.config import load_config
from workspace.tracking import configure, stage_run

NAME = "screen-xml-test"


@pytest.fixture
def loaded(tmp_tracking):
    loaded = load_config(overrides=tmp_tracking)
    configure(loaded)  # before any registry call: MLflow's default store would be ./mlflow.db in the CWD
    return loaded


def do_promote(loaded, tmp_path, tag, hook=lambda step: None):
    with stage_run(loaded, "promote") as run:
        return promote(NAME, run.info.run_id, make_bundle(tmp_path, tag), {"dataset_hash": tag}, _after_step=hook)


def test_first_then_second_promotion_and_rollback(loaded, tmp_path):
    with pytest.raises(PromotionError, match="has no champion yet"):
        fetch_champion(NAME)
    p1 = do_promote(loaded, tmp_path, "one")
    assert p1.previous is None and alias_version(NAME, CHAMPION) == p1.version == "1"
    assert alias_version(NAME, PREVIOUS) is None
    p2 = do_promote(loaded, tmp_path, "two")
    assert alias_version(NAME, CHAMPION) == "2" and alias_version(NAME, PREVIOUS) == "1"
    assert alias_version(NAME, CANDIDATE) == "2"
    info, path = fetch_champion(NAME, tmp_path / "dl")
    assert info["version"] == "2" and (path / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights-two"
    assert (path / "serving.yaml").exists() and info["tags"]["dataset_hash"] == "two"
    assert rollback(NAME) == ("2", "1")
    assert alias_version(NAME, CHAMPION) == "1" and alias_version(NAME, PREVIOUS) == "2"


@pytest.mark.parametrize("step", ["artifacts", "version", "candidate", "verify", "previous"])
def test_a_failure_between_steps_leaves_the_champion_unchanged(loaded, tmp_path, step):
    do_promote(loaded, tmp_path, "base")

    def boom(s):
        if s == step:
            raise RuntimeError(f"injected failure after {s}")

    with pytest.raises(RuntimeError, match="injected failure"):
        do_promote(loaded, tmp_path, "broken", boom)
    assert alias_version(NAME, CHAMPION) == "1"
    info, path = fetch_champion(NAME, tmp_path / "dl")
    assert (path / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights-base"


def test_incomplete_bundle_and_rollback_without_previous(loaded, tmp_path):
    with stage_run(loaded, "promote") as run:
        (tmp_path / "empty").mkdir()
        with pytest.raises(PromotionError, match=r"lacks \['manifest.json', 'gate.json', 'serving.yaml'\]"):
            promote(NAME, run.info.run_id, tmp_path / "empty", {})
    with pytest.raises(PromotionError, match="has no champion"):
        rollback(NAME)
    do_promote(loaded, tmp_path, "only")
    with pytest.raises(PromotionError, match="no 'previous' version"):
        rollback(NAME)


def test_alias_to_a_deleted_version_is_named(loaded, tmp_path):
    import mlflow

    do_promote(loaded, tmp_path, "gone")
    mlflow.MlflowClient().delete_model_version(NAME, "1")
    with pytest.raises(PromotionError, match="no champion"):
        fetch_champion(NAME)


def test_an_alias_that_moves_during_a_fetch_cannot_change_the_files(loaded, tmp_path, monkeypatch):
    """@champion is resolved once; the files come from models:/<name>/<version>, so the version reported is the
    version whose files were fetched even when a promotion moves the alias in between."""
    import mlflow

    import serving.registry as registry

    do_promote(loaded, tmp_path, "one")
    do_promote(loaded, tmp_path, "two")
    mlflow.MlflowClient().set_registered_model_alias(NAME, CHAMPION, "1")
    resolve = registry.champion_info

    def resolve_then_move(name):
        info = resolve(name)
        mlflow.MlflowClient().set_registered_model_alias(name, CHAMPION, "2")  # a promotion lands right now
        return info

    monkeypatch.setattr(registry, "champion_info", resolve_then_move)
    info, path = fetch_champion(NAME, tmp_path / "dl")
    assert info["version"] == "1" and alias_version(NAME, CHAMPION) == "2"
    assert (path / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights-one"


@pytest.mark.slow
def test_the_registry_path_with_postgresql_as_mlflow_backend_store(postgres_server, tmp_path):
    """What a team runs: MLflow's backend store on PostgreSQL (psycopg 3), the same register, alias, fetch by version
    and rollback path as on SQLite."""
    from conftest import postgres_database
    from serving.registry import fetch_version

    url = postgres_database(postgres_server)
    loaded = load_config(overrides=[f"tracking.uri={url}", f"tracking.artifact_root={tmp_path}/artifacts"])
    configure(loaded)
    try:
        do_promote(loaded, tmp_path, "one")
        do_promote(loaded, tmp_path, "two")
        assert alias_version(NAME, CHAMPION) == "2" and alias_version(NAME, PREVIOUS) == "1"
        folder = fetch_version(NAME, "1", tmp_path / "v1")
        assert (folder / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights-one"
        assert rollback(NAME) == ("2", "1") and alias_version(NAME, CHAMPION) == "1"
    finally:
        configure(load_config(overrides=[f"tracking.uri=sqlite:///{tmp_path}/after.db"]))  # leave no PG store current
