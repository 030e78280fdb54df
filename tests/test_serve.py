"""`make serve` end to end on CPU: a version promoted into a (temporary) MLflow registry is fetched by alias and
served by vLLM with its promoted configuration; the openai client gets a chat completion, a streamed one, the
adapter by model name, and /metrics is exposed. Plus the start-up failures that must name their cause."""
from __future__ import annotations


import httpx
import pytest

from serving.serve import champion_server
from workspace.vllm_server import ServerError, VllmServer, free_port
from workspace.config import load_config
from workspace.paths import resolve

pytestmark = pytest.mark.slow  # launches LLaMA-Factory or vLLM

BASE = str(resolve(load_config().config.base_model.path))


@pytest.fixture(scope="module")
def served(tmp_path_factory, promote_random_adapter):
    tmp = tmp_path_factory.mktemp("serve")
    loaded = load_config(overrides=[f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/artifacts",
                                    "tracking.registered_model=serve-test", "serving.max_model_len=1024"])
    promote_random_adapter(loaded, tmp, "serve-test", BASE)
    server, info = champion_server(loaded, port=free_port(), dest=tmp / "champion")
    server.start(timeout=400)
    yield server, info
    server.stop()


def test_champion_answers_through_the_openai_client(served):
    from openai import OpenAI

    server, info = served
    assert info["version"] == "1" and info["lora_names"] == ["screen-xml"]
    client = OpenAI(base_url=server.base_url, api_key="EMPTY")
    ids = {m.id for m in client.models.list().data}
    assert ids == {"screen-xml-base", "screen-xml"}
    msgs = [{"role": "user", "content": "회원 목록 화면을 생성해주세요. 필드: 이름, 이메일"}]
    with_adapter = client.chat.completions.create(model="screen-xml", messages=msgs, max_tokens=16, temperature=0)
    base = client.chat.completions.create(model="screen-xml-base", messages=msgs, max_tokens=16, temperature=0)
    assert with_adapter.choices[0].message.content and with_adapter.usage.completion_tokens > 0
    assert with_adapter.choices[0].message.content != base.choices[0].message.content  # the adapter is applied
    chunks = list(client.chat.completions.create(model="screen-xml", messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and streamed == with_adapter.choices[0].message.content
    metrics = httpx.get(f"http://{server.host}:{server.port}/metrics").text
    assert "vllm:time_to_first_token_seconds" in metrics and "vllm:e2e_request_latency_seconds" in metrics


def test_port_in_use_is_named(served):
    server, _ = served
    other = VllmServer(BASE, load_config().config.serving, port=server.port)
    with pytest.raises(ServerError, match=f"port {server.port} on 127.0.0.1 is in use"):
        other.start(timeout=30)


def test_server_dying_during_startup_is_named(tmp_path):
    cfg = load_config().config.serving
    bad = VllmServer(str(tmp_path / "no-such-model"), cfg, log_path=tmp_path / "vllm.log")
    with pytest.raises(ServerError, match=r"vLLM exited with code .* before it was ready; log: .*vllm.log"):
        bad.start(timeout=300)
    assert bad.proc is None or bad.proc.poll() is not None
