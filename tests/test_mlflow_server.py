"""The registry path through a real MLflow tracking server (`mlflow server --serve-artifacts` on 127.0.0.1, started
here and stopped by its PID): what a team runs on its own servers. Register, aliases, fetch by alias and by
version, rollback; artifacts travel through the server's proxy, not the client's disk."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

import pytest

from conftest import make_bundle
from serving.registry import CHAMPION, PREVIOUS, alias_version, fetch_champion, fetch_version, promote, rollback
from workspace.config import load_config
from workspace.paths import VENVS
from workspace.processes import free_port
from workspace.tracking import configure, stage_run

NAME = "screen-xml-server-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port("127.0.0.1")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(VENVS["workspace"] / "bin" / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--serve-artifacts", "--artifacts-destination", str(root / "served-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the server and its uvicorn workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow  # starts `mlflow server` (about 10-30 s)
def test_registry_path_through_a_tracking_server(server, tmp_path):
    url, root = server
    # the default artifact_root is a local path: against a server it must defer to the server's artifact store
    loaded = load_config(overrides=[f"tracking.uri={url}", "tracking.experiment=server-exp"])
    mlflow = configure(loaded)
    exp = mlflow.get_experiment_by_name("server-exp")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    versions = []
    for tag in ("one", "two"):
        with stage_run(loaded, "promote") as run:
            versions.append(promote(NAME, run.info.run_id, make_bundle(tmp_path, tag), {"dataset_hash": tag}).version)
    assert versions == ["1", "2"]
    assert alias_version(NAME, CHAMPION) == "2" and alias_version(NAME, PREVIOUS) == "1"
    info, path = fetch_champion(NAME, tmp_path / "dl-champion")
    assert info["version"] == "2" and (path / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights-two"
    old = fetch_version(NAME, "1", tmp_path / "dl-v1")
    assert (old / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights-one"
    assert rollback(NAME) == ("2", "1")
    assert alias_version(NAME, CHAMPION) == "1" and alias_version(NAME, PREVIOUS) == "2"
    # the files went through the server: they are in its --artifacts-destination, not under the workspace
    served = list((root / "served-artifacts").rglob("adapter_model.safetensors"))
    assert len(served) >= 2, served
