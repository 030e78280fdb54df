"""`make serve`, `make gateway` and `make ask` share the workspace's own vLLM key when serving.api_key_env names none:
vLLM on the host never runs open (it would be a bypass of the gateway's tokens, limits and usage log). The key
itself against a real vLLM: tests/test_api_key.py (the same variable mechanism). `make gateway` runs here as the
command it is, in front of a stand-in vLLM, and is seen sending the key."""
from __future__ import annotations

import os

from serving.gateway.core import Gateway
from workspace.config import load_config
from workspace.endpoint import INTERNAL_KEY_ENV, internal_key_overrides
from workspace.vllm_server import VllmServer


def test_serve_and_gateway_share_a_private_key_when_none_is_configured(tmp_path, monkeypatch):
    monkeypatch.delenv(INTERNAL_KEY_ENV, raising=False)
    key_file = tmp_path / "serve" / "api_key"
    over = internal_key_overrides(None, key_file)
    assert over == [f"serving.api_key_env={INTERNAL_KEY_ENV}"]
    key = os.environ[INTERNAL_KEY_ENV]
    assert key.startswith("llmops-serve-") and len(key) > 40 and key_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in key_file.parent.iterdir()] == ["api_key"]  # no temporary file left behind
    # the other command (another process: its own environment) reads the same key from the same file
    monkeypatch.delenv(INTERNAL_KEY_ENV)
    assert internal_key_overrides(None, key_file) == over and os.environ[INTERNAL_KEY_ENV] == key
    # a key variable of the user's own is kept, and no file is written
    assert internal_key_overrides("MY_VLLM_KEY", tmp_path / "other" / "api_key") == []
    assert not (tmp_path / "other").exists()

    loaded = load_config(overrides=over + [f"serving.gateway.database_url=sqlite:///{tmp_path}/gw.db"])
    server = VllmServer("models/base-tiny", loaded.config.serving, port=18999)
    argv, env = server.command()
    assert env["VLLM_API_KEY"] == key and "workspace.vllm_auth.RequireKey" in " ".join(argv)
    gw = Gateway(loaded, upstreams=["http://127.0.0.1:18999/v1"])
    assert gw.upstream_headers == {"Authorization": f"Bearer {key}"}


def test_an_empty_key_file_is_named(tmp_path, monkeypatch):
    import pytest

    from workspace.endpoint import EndpointError

    monkeypatch.delenv(INTERNAL_KEY_ENV, raising=False)
    (tmp_path / "api_key").write_text("\n")
    with pytest.raises(EndpointError, match="api_key is empty"):
        internal_key_overrides(None, tmp_path / "api_key")


def test_make_gateway_as_a_command_serves_and_sends_the_shared_key(tmp_path):
    """flows/gateway.py as `make gateway` runs it (a process of its own, stopped by its PID): it starts, answers
    /healthz, serves a chat from the registry's champion and sends the key of CACHE/serve/api_key upstream."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from conftest import make_bundle
    from serving.gateway.db import GatewayDb, database_url
    from serving.registry import promote
    from serving.serve import SERVE_KEY_FILE
    from upstream_double import Upstream
    from workspace.paths import ROOT
    from workspace.processes import free_port
    from workspace.tracking import configure, stage_run

    sets = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts",
            "tracking.registered_model=cmd-test", f"serving.gateway.database_url=sqlite:///{tmp_path}/gw.db",
            "serving.gateway.health_interval_s=0.5"]
    loaded = load_config(overrides=sets)
    configure(loaded)
    with stage_run(loaded, "promote") as run:
        promote("cmd-test", run.info.run_id, make_bundle(tmp_path, "one"), {})
    token = GatewayDb(database_url(loaded)).create_token("cmd", "user")
    port = free_port("127.0.0.1")
    with Upstream() as up:
        argv = [sys.executable, "-m", "llmops", "gateway", "--port", str(port),
                *[a for s in sets + [f"serving.gateway.upstreams=['{up.base_url}']"] for a in ("--set", s)]]
        env = {k: v for k, v in os.environ.items() if k != INTERNAL_KEY_ENV}
        # a session of its own, as a terminal gives a command: Ctrl-C below reaches its whole process group
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
            while True:
                assert proc.poll() is None, f"make gateway exited {proc.returncode}: {proc.stdout.read()}"
                try:
                    if httpx.get(url + "/healthz", timeout=2).json() == {"status": "ok"}:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "make gateway did not answer /healthz within 90 s"
                time.sleep(0.5)
            r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, timeout=30,
                           json={"model": "champion", "messages": [{"role": "user", "content": "화면"}], "max_tokens": 2})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "weights-one-0 weights-one-1"
            assert up.state.authorization[-1] == f"Bearer {SERVE_KEY_FILE.read_text().strip()}"
        finally:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a person stops it: to the command's process group
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    assert proc.returncode == 0, proc.stdout.read()  # stopped by Ctrl-C, cleanly
    import psutil

    left = [p for p in psutil.process_iter(["pid", "cmdline"]) if f"--port {port}" in " ".join(p.info["cmdline"] or [])]
    assert not left, f"make gateway left {left} running"
