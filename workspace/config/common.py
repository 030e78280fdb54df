"""The workspace-wide sections every stage may read: project, tracking (MLflow), hub (network access)."""
from __future__ import annotations

from workspace.config.base import Strict


class ProjectConfig(Strict):
    name: str = "llmops-workspace"
    seed: int = 42


class TrackingConfig(Strict):
    # relative sqlite paths are resolved against the workspace root, not the CWD
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns/artifacts"  # a path (local store), or a URI; against an http(s) server a path defers to the server
    experiment: str = "screen-xml"
    registered_model: str = "screen-xml-assistant"


class HubConfig(Strict):
    # Offline by design. Set true only where a model/dataset hub is reachable.
    enabled: bool = False
