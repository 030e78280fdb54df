"""`make serve`, `make gateway` and `make ask` share the workspace's own vLLM key when serving.api_key_env names none:
vLLM on the host never runs open (it would be a bypass of the gateway's tokens, limits and usage log). The key
itself against a real vLLM: tests/test_api_key.py (the same variable mechanism)."""
from __future__ import annotations

import os

from serving.gateway.app import Gateway
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
