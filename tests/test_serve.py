"""`make serve` end to end on CPU: a version promoted into a (temporary) MLflow registry is fetched by alias and
served by vLLM with its promoted configuration; the openai client gets a chat completion, a streamed one, the
adapter by model name, and /metrics is exposed. Plus the start-up failures that must name their cause."""
from __future__ import annotations


import time
from pathlib import Path

import httpx
import pytest

from serving.serve import champion_server
from workspace.vllm_server import ServerError, VllmServer, content_path, free_port
from workspace.config import load_config
from workspace.paths import resolve

pytestmark = pytest.mark.slow  # launches LLaMA-Factory or vLLM

BASE = str(resolve(load_config().config.base_model.path))


@pytest.fixture(scope="module")
def served(tmp_path_factory, promote_random_adapter):
    tmp = tmp_path_factory.mktemp("serve")
    overrides = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/artifacts",
                 "tracking.registered_model=serve-test", "serving.max_model_len=1024"]
    loaded = load_config(overrides=overrides)
    promote_random_adapter(loaded, tmp, "serve-test", BASE)
    server, info = champion_server(loaded, port=free_port(), dest=tmp / "champion")
    server.start(timeout=400)
    info["overrides"] = overrides
    yield server, info
    server.stop()


def test_champion_answers_through_the_openai_client(served):
    from openai import OpenAI

    server, info = served
    assert info["version"] == "1" and info["lora_names"] == ["screen-xml"]
    client = OpenAI(base_url=server.base_url, api_key="EMPTY")
    ids = {m.id for m in client.models.list().data}
    assert {"screen-xml-base", "screen-xml"} <= ids  # (the gateway test may have loaded serve-test-v1 into it)
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


def _vllm_metric(server, name: str) -> float:
    text = httpx.get(f"http://{server.host}:{server.port}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_gateway_in_front_of_vllm(served, tmp_path):
    """The gateway on the real server: the champion is loaded into the running vLLM at run time under its version's
    name and answers exactly what vLLM answers directly with the served decoding (the stop and grammar the gateway
    adds); the context limit is vLLM's own 400; a client that leaves
    mid-stream makes vLLM abort the request (nothing keeps generating)."""
    import json
    import socket

    from openai import OpenAI

    from serving.gateway.app import create_app
    from serving.gateway.db import GatewayDb
    from upstream_double import ServeApp

    server, info = served
    loaded = load_config(overrides=[*info["overrides"], f"serving.gateway.database_url=sqlite:///{tmp_path}/gw.db"])
    token = GatewayDb(f"sqlite:///{tmp_path}/gw.db").create_token("t", "admin")
    msgs = [{"role": "user", "content": "회원 목록 화면을 생성해주세요. 필드: 이름, 이메일"}]
    # what the gateway adds to a request that sets none of it: serving.decoding's stop strings and grammar
    served = loaded.config.serving.decoding.request_defaults()
    assert "structured_outputs" in served and "stop" in served
    direct = OpenAI(base_url=server.base_url, api_key="EMPTY").chat.completions.create(
        model="screen-xml", messages=msgs, max_tokens=16, temperature=0, extra_body=served).choices[0].message.content
    with ServeApp(create_app(loaded, upstreams=[server.base_url])) as gw:
        client = OpenAI(base_url=f"{gw.url}/v1", api_key=token)
        whole = client.chat.completions.create(model="champion", messages=msgs, max_tokens=16, temperature=0)
        assert whole.choices[0].message.content == direct  # serve-test v1, loaded as serve-test-v1 at run time
        assert "serve-test-v1" in {m.id for m in OpenAI(base_url=server.base_url, api_key="EMPTY").models.list().data}
        chunks = list(client.chat.completions.create(model="champion", messages=msgs, max_tokens=16, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct
        long = [{"role": "user", "content": "회원 " * 2000}]
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, timeout=60,
                       json={"model": "champion", "messages": long, "max_tokens": 8})
        assert r.status_code == 400 and "context length" in r.json()["error"]["message"].lower(), r.text
        generated = _vllm_metric(server, "vllm:generation_tokens_total")
        # unconstrained (a grammar that is complete allows nothing but the end, which ignore_eos forbids)
        body = json.dumps({"model": "champion", "messages": msgs, "max_tokens": 900, "stream": True, "stop": [],
                           "response_format": {"type": "text"}, "ignore_eos": True, "temperature": 0}).encode()
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(4096)
        s.close()
        time.sleep(2.0)
        after = _vllm_metric(server, "vllm:generation_tokens_total")
        time.sleep(1.5)
        assert _vllm_metric(server, "vllm:num_requests_running") == 0
        assert _vllm_metric(server, "vllm:generation_tokens_total") == after  # stopped, not running to 900 tokens
        assert after - generated < 900
        rows = httpx.get(f"{gw.url}/admin/usage", headers={"Authorization": f"Bearer {token}"}).json()["data"]
        assert [r["status"] for r in rows] == [200, 200, 400, 499] and rows[0]["version"] == "1"


def test_merged_mode_promotes_and_serves_the_merged_weights(tmp_path, random_adapter):
    """serving.adapter_mode merged, the fast path: the promote stage (vLLM's parser included) registers the merged
    weights beside the adapter with a serving config that serves them as a plain model; `make serve`'s champion
    server is configured under the plain and the versioned name with no LoRA, and evaluation through vLLM scores
    the merged copy."""
    import json
    import shutil

    import yaml

    from eval.evaluate import served_merged
    from serving.bench import merged_model
    from serving.promote_stage import PROMOTE, PromoteInputs
    from serving.registry import champion_info
    from workspace.model_ref import ModelRef
    from workspace.tracking import configure

    overrides = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts",
                 "tracking.registered_model=merged-test", "serving.max_model_len=1024", "serving.adapter_mode=merged"]
    loaded = load_config(overrides=overrides)
    configure(loaded)
    run = tmp_path / "run"
    shutil.copytree(random_adapter, run)
    merged = merged_model(BASE, str(run), tmp_path / "merged")
    (run / "manifest.json").write_text(json.dumps({"run_key": "m1", "dataset_hash": "d", "git_commit": "c",
                                                   "merged_model": merged}))
    for name in ("gate.json", "gate.md", "report.md"):
        (tmp_path / name).write_text("{}" if name.endswith("json") else "#")
    out = PROMOTE.run(loaded, PromoteInputs(passed=True, adapter=str(run), run_key="m1", gate_json=str(tmp_path / "gate.json"),
                                            gate_md=str(tmp_path / "gate.md"), report_md=str(tmp_path / "report.md")))
    assert out.version == "1" and champion_info("merged-test")["tags"]["adapter_mode"] == "merged"
    assert served_merged(loaded, ModelRef("candidate", BASE, str(run))) == merged
    assert served_merged(load_config(overrides=[*overrides[:-1], "serving.adapter_mode=lora"]),
                         ModelRef("candidate", BASE, str(run))) is None

    server, info = champion_server(loaded, port=free_port(), dest=tmp_path / "champion")
    folder = tmp_path / "champion"
    conf = yaml.safe_load(next(folder.rglob("serving.yaml")).read_text())
    assert conf["model"] == "merged" and "lora-modules" not in conf and "enable-lora" not in conf
    assert (Path(info["folder"]) / "merged" / "config.json").exists() and info["adapter_mode"] == "merged"
    resolved = yaml.safe_load(next(folder.rglob("serving.resolved.yaml")).read_text())
    # the merged weights through a path named by their content (vLLM's compile cache is keyed on the path)
    assert Path(resolved["model"]).resolve() == (Path(info["folder"]) / "merged").resolve()
    assert resolved["model"] == content_path(Path(info["folder"]) / "merged") != str(Path(info["folder"]) / "merged")
    assert resolved["served-model-name"] == ["screen-xml", "merged-test-v1"]  # plain and versioned (the gateway's)
    assert server.extra_env == {} and "--max-loras" not in server.argv()
    # served for real by the pipeline's serve check (tests/test_pipeline.py, the cpu_smoke profile is merged)


def test_prometheus_scrapes_the_vllm_server_and_the_gateway(served, tmp_path):
    """make monitoring's scrape configuration against a real vLLM and the gateway in front of it: both targets up,
    vLLM's own series and the gateway's recording rules read back through Prometheus's HTTP API."""
    from serving.gateway.app import create_app
    from serving.gateway.db import GatewayDb
    from serving.monitoring import GATEWAY_TOKEN, SERVE_KEY, write
    from test_monitoring import prometheus, target_health, until
    from upstream_double import ServeApp

    server, info = served
    port = free_port()
    loaded = load_config(overrides=[*info["overrides"], f"serving.gateway.database_url=sqlite:///{tmp_path}/gw.db",
                                    f"serving.port={server.port}", f"serving.gateway.port={port}"])

    folder = tmp_path / "monitoring"
    write(loaded, folder, loaded.config.gate.slo)
    (folder / GATEWAY_TOKEN).write_text(GatewayDb(f"sqlite:///{tmp_path}/gw.db").create_token("prom", "admin") + "\n")
    (folder / SERVE_KEY).write_text("no-key-set-here\n")  # this vLLM runs without a key: the header is ignored
    token = (folder / GATEWAY_TOKEN).read_text().strip()
    msgs = [{"role": "user", "content": "회원 목록 화면"}]

    def drive():
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                       json={"model": "champion", "messages": msgs, "max_tokens": 4, "stream": True}, timeout=60)
        assert r.status_code == 200, r.text

    with ServeApp(create_app(loaded, upstreams=[server.base_url]), port=port):
        with prometheus(folder, tmp_path) as query:
            exprs = ['up{job="vllm"}', 'up{job="gateway"}', "vllm:generation_tokens_total",
                     "gateway:requests_per_minute:rate5m"]
            seen = until(query, exprs, drive, timeout=90)
            assert set(seen) == set(exprs), (seen, (tmp_path / "prometheus.log").read_text()[-2000:])
            health = target_health(query)
            assert health["vllm"] == "up" and health["gateway"] == "up", health
