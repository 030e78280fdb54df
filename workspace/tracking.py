"""MLflow tracking for every stage: the database store, the experiment, a parent run per pipeline run and a
child run per stage, each tagged with the git commit, the config hash and the profile.

Stages call `stage_run(loaded, "finetune")`; flows/pipeline.py wraps them in `pipeline_run(loaded)`.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

from workspace import offline
from workspace.config import ConfigError, LoadedConfig, TrackingConfig
from workspace.paths import ROOT, resolve


def tracking_uri(cfg: TrackingConfig) -> str:
    """sqlite:///relative/path.db is made absolute against the workspace root (not the CWD)."""
    uri = cfg.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        db = resolve(uri[len(prefix):])
        db.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(db)
    return uri


def artifact_location(cfg: TrackingConfig) -> Optional[str]:
    """Where a new experiment keeps its artifacts. Against a tracking server (http/https) a plain path would make
    each client write to its own disk: None leaves it to the server (`mlflow server --serve-artifacts` proxies them
    to its --artifacts-destination); a URI (s3://, mlflow-artifacts:/, file://) is used as given."""
    root = cfg.artifact_root
    if "://" in root or root.startswith("mlflow-artifacts:"):
        return root
    if cfg.uri.startswith(("http://", "https://")):
        return None
    path = resolve(root)
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def git_commit() -> str:
    """HEAD's sha, with '+dirty' when the tree has uncommitted changes; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(loaded: LoadedConfig, stage: str | None = None) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "config_hash": loaded.hash,
        "profile": loaded.profile or "",
        "config_sources": " | ".join(loaded.sources),
    }
    if stage:
        tags["stage"] = stage
    flow_run = prefect_flow_run()
    if flow_run:
        tags["prefect_flow_run_id"] = flow_run["id"]
        tags["prefect_flow_run_name"] = flow_run["name"]
        if flow_run.get("deployment"):
            tags["prefect_deployment"] = flow_run["deployment"]
    return tags


def prefect_flow_run() -> dict | None:
    """The Prefect flow run this code runs in (the pipeline's when a stage runs as one of its tasks), or None."""
    if "prefect" not in sys.modules:  # not inside a flow; do not import prefect for nothing
        return None
    try:
        from prefect.context import FlowRunContext
        from prefect.runtime import deployment

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            return None
        run = ctx.flow_run
        return {"id": str(run.id), "name": str(run.name), "deployment": deployment.name or ""}
    except Exception:  # noqa: BLE001 - tagging must never break a run
        return None


class TrackingError(ConfigError):
    """The tracking store cannot be reached or opened; the message names tracking.uri, where it was set, and the fix."""


# MLflow retries an unreachable server 7 times with exponential backoff (about 4 minutes) before it says anything;
# a workspace run asks a few times and then names the setting. A user's own value of these variables wins.
HTTP_RETRIES, HTTP_TIMEOUT_S = "2", "30"


def _unreachable(loaded: LoadedConfig, uri: str, why: str) -> TrackingError:
    return TrackingError(f"tracking.uri = {uri} (set in {loaded.origin('tracking.uri')}) cannot be reached: {why}. "
                         "Start the MLflow server there (`make ui` serves the local store), or point tracking.uri at "
                         "a local store (the default is sqlite:///mlruns/mlflow.db)")


def check_reachable(loaded: LoadedConfig, uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking server answers within `timeout` seconds, or TrackingError."""
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise _unreachable(loaded, uri, f"{type(exc).__name__}: {exc}") from None


def configure(loaded: LoadedConfig):
    """Point MLflow at the configured store and experiment (creating it with its artifact root). Returns mlflow.
    Raises TrackingError (naming tracking.uri) within seconds when the store cannot be reached."""
    import os

    offline.apply(loaded.config.hub.enabled)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
    import mlflow

    cfg = loaded.config.tracking
    uri = tracking_uri(cfg)
    check_reachable(loaded, uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
    except Exception as exc:  # noqa: BLE001 - MlflowException, SQLAlchemy's OperationalError, ...: all name the store
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise _unreachable(loaded, cfg.uri, first) from None
    if experiment is None:
        try:
            mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg))
        except mlflow.exceptions.MlflowException:
            pass  # created concurrently by another process
    mlflow.set_experiment(cfg.experiment)
    return mlflow


_PARENT: list[str] = []  # the pipeline parent run id(s) of this process, innermost last


@contextlib.contextmanager
def pipeline_run(loaded: LoadedConfig, name: str | None = None) -> Iterator:
    """The parent run of one pipeline run; stage runs started inside it become its children (also when a stage
    runs on another thread, where MLflow's active-run stack is not visible)."""
    mlflow = configure(loaded)
    with mlflow.start_run(run_name=name or f"pipeline-{loaded.hash[:8]}", tags=run_tags(loaded, "pipeline")) as run:
        mlflow.log_dict(loaded.config.model_dump(mode="json"), "config/resolved_config.json")
        _PARENT.append(run.info.run_id)
        try:
            yield run
        finally:
            _PARENT.pop()


@contextlib.contextmanager
def stage_run(loaded: LoadedConfig, stage: str, name: str | None = None) -> Iterator:
    """A child run when a parent (pipeline) run is active, a top-level run otherwise."""
    mlflow = configure(loaded)
    parent = mlflow.active_run()
    if parent is None and _PARENT:
        ctx = mlflow.start_run(run_name=name or stage, parent_run_id=_PARENT[-1], tags=run_tags(loaded, stage))
    else:
        ctx = mlflow.start_run(run_name=name or stage, nested=parent is not None, tags=run_tags(loaded, stage))
    with ctx as run:
        if parent is None and not _PARENT:
            mlflow.log_dict(loaded.config.model_dump(mode="json"), "config/resolved_config.json")
        yield run


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)
