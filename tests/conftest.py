"""Shared fixtures: the offline environment for every test, and a throwaway MLflow store."""
from __future__ import annotations

import pytest

from workspace import offline

offline.apply()


@pytest.fixture
def tmp_tracking(tmp_path):
    """Overrides that point MLflow at a database and artifact root inside tmp_path."""
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts",
            "tracking.experiment=test-exp"]
