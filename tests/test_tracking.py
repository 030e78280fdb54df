"""MLflow tracking: a database store, a parent run with child runs, tags for commit, config hash, profile."""
from __future__ import annotations

from workspace.config import load_config
from workspace.tracking import git_commit, pipeline_run, stage_run, tracking_uri


def test_relative_sqlite_uri_is_anchored_at_the_workspace_root():
    from workspace.paths import ROOT

    uri = tracking_uri(load_config().config.tracking)
    assert uri == f"sqlite:///{ROOT}/mlruns/mlflow.db"


def test_parent_and_child_runs_carry_the_tags(tmp_tracking, tmp_path):
    loaded = load_config(overrides=tmp_tracking)
    import mlflow

    with pipeline_run(loaded) as parent:
        with stage_run(loaded, "prepare") as child:
            mlflow.log_metric("rows", 3)
    client = mlflow.MlflowClient()
    p = client.get_run(parent.info.run_id)
    c = client.get_run(child.info.run_id)
    assert c.data.tags["mlflow.parentRunId"] == p.info.run_id
    for run in (p, c):
        assert run.data.tags["config_hash"] == loaded.hash
        assert run.data.tags["profile"] == "cpu_tiny"
        assert run.data.tags["git_commit"] == git_commit()
    assert c.data.tags["stage"] == "prepare" and c.data.metrics["rows"] == 3
    assert (tmp_path / "mlflow.db").exists()
    exp = client.get_experiment_by_name("test-exp")
    assert exp.artifact_location.startswith("file://") and str(tmp_path / "artifacts") in exp.artifact_location
    assert "config/resolved_config.json" in [a.path for a in client.list_artifacts(p.info.run_id, "config")]


def test_stage_run_without_parent_is_top_level(tmp_tracking):
    loaded = load_config(overrides=tmp_tracking)
    import mlflow

    with stage_run(loaded, "eval") as run:
        pass
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert "mlflow.parentRunId" not in tags and tags["stage"] == "eval"


def test_an_unreachable_tracking_server_is_named_within_seconds(tmp_path):
    """MLflow alone retries an unreachable server for about 4 minutes and then raises without naming the setting."""
    import time

    import pytest

    from workspace.config import load_config
    from workspace.processes import free_port
    from workspace.tracking import TrackingError, configure

    uri = f"http://127.0.0.1:{free_port()}"
    loaded = load_config(overrides=[f"tracking.uri={uri}"])
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=rf"tracking.uri = {uri} \(set in --set tracking.uri={uri}\) cannot be "
                       r"reached: .*Connection refused.*point tracking.uri at a local store"):
        configure(loaded)
    assert time.monotonic() - t0 < 30
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(TrackingError, match=r"tracking.uri = sqlite:///.*a_file/x.db \(set in --set .*cannot be reached"):
        configure(load_config(overrides=[f"tracking.uri=sqlite:///{tmp_path}/a_file/x.db"]))
