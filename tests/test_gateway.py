"""The gateway (serving/gateway/) over real HTTP (uvicorn on 127.0.0.1), a real MLflow registry (SQLite, versions
promoted by serving/registry.py) and a real SQLite database; the replicas behind it are stand-ins
(tests/upstream_double.py) whose answers name the adapter they loaded, so each test sees which version answered.
The same gateway in front of real vLLM: tests/test_serve.py."""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from conftest import make_bundle
from serving.gateway.app import create_app
from serving.gateway.db import GatewayDb, database_url
from serving.registry import promote, rollback
from upstream_double import ServeApp, Upstream
from workspace.config import load_config
from workspace.tracking import configure, stage_run

NAME = "gw-test"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Versions 1 ("one") and 2 ("two") of NAME: champion v2, previous v1, candidate v2."""
    tmp = tmp_path_factory.mktemp("gw")
    base = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/artifacts",
            f"tracking.registered_model={NAME}", f"serving.gateway.database_url=sqlite:///{tmp}/gw.db",
            "serving.gateway.registry_refresh_s=0.2", "serving.gateway.health_interval_s=0.2"]
    loaded = load_config(overrides=base)
    configure(loaded)
    for tag in ("one", "two"):
        with stage_run(loaded, "promote") as run:
            promote(NAME, run.info.run_id, make_bundle(tmp, tag), {})
    db = GatewayDb(database_url(loaded))
    return {"tmp": tmp, "overrides": base, "loaded": loaded, "db": db,
            "admin": db.create_token("root", "admin"), "user": db.create_token("alice", "user"),
            "other": db.create_token("bob", "user")}


def gateway(registry, *upstreams, **settings):
    """The gateway app with serving.gateway.<key>=<value> overrides, in front of `upstreams`."""
    sets = [f"serving.gateway.{k}={v}" for k, v in settings.items()]
    loaded = load_config(overrides=registry["overrides"] + sets)
    return ServeApp(create_app(loaded, upstreams=[u.base_url for u in upstreams]))


def restore_aliases():
    """Back to champion v2, previous v1, candidate v2, and long enough for every gateway to re-read them."""
    client = MlflowClient()
    for alias, version in (("champion", "2"), ("previous", "1"), ("candidate", "2")):
        client.set_registered_model_alias(NAME, alias, version)
    time.sleep(0.5)


def auth(token):
    return {"Authorization": f"Bearer {token}"}


HTTP = httpx.Client()  # one client: a new one per call costs ~40 ms (its TLS context)


def chat(url, token, model="champion", content="회원 목록 화면", **kw):
    return HTTP.post(f"{url}/v1/chat/completions", headers=auth(token), timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **kw})


@pytest.fixture(scope="module")
def served(registry):
    with Upstream() as up, gateway(registry, up, requests_per_min=1000) as gw:
        yield gw, up


def test_openai_client_streams_and_answers_through_the_gateway(served, registry):
    from openai import OpenAI

    gw, _ = served
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=registry["user"])
    assert {m.id for m in client.models.list().data} == {"champion", "candidate", "previous"}
    whole = client.chat.completions.create(model="champion", messages=[{"role": "user", "content": "안녕"}], max_tokens=3)
    assert whole.choices[0].message.content == "weights-two-0 weights-two-1 weights-two-2"  # v2 is champion
    assert whole.model == "champion" and whole.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(model="previous", messages=[{"role": "user", "content": "안녕"}],
                                                 max_tokens=3, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "weights-one-0 weights-one-1 weights-one-2"
    assert len([c for c in chunks if c.choices]) == 3  # token by token, not one block
    by_version = client.chat.completions.create(model=f"{NAME}@1", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert by_version.choices[0].message.content == "weights-one-0"


def test_the_served_stop_strings_reach_every_request_that_sets_none(registry):
    """serving.decoding.stop has no server-side default in vLLM: the gateway adds it, kept in the output, to every
    chat and arena request that sets no `stop` of its own (the evaluation decodes with the same); a request's own
    `stop` is passed on as it is (OpenAI's rule: the stop string is left out). The grammar likewise."""
    loaded = load_config(overrides=registry["overrides"] + ['serving.decoding.stop=["two-1"]'])
    with Upstream() as up, ServeApp(create_app(loaded, upstreams=[up.base_url])) as gw:
        r = chat(gw.url, registry["user"], max_tokens=5)
        assert r.json()["choices"][0]["message"]["content"] == "weights-two-0 weights-two-1"
        sent = up.state.requests[-1]
        assert sent["stop"] == ["two-1"] and sent["include_stop_str_in_output"] is True
        r = chat(gw.url, registry["user"], max_tokens=5, stop=["two-3"])
        assert r.json()["choices"][0]["message"]["content"] == "weights-two-0 weights-two-1 weights-two-2 weights-"
        assert "include_stop_str_in_output" not in up.state.requests[-1]
        r = chat(gw.url, registry["user"], max_tokens=5, stream=True)
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                       for line in r.text.splitlines() if line.startswith("data: {") and '"choices": [{' in line)
        assert text == "weights-two-0 weights-two-1"
        r = HTTP.post(f"{gw.url}/v1/arena", headers=auth(registry["user"]), timeout=30,
                      json={"messages": [{"role": "user", "content": "주문 화면"}], "models": ["champion", "previous"]})
        assert r.status_code == 200, r.text
        assert [b["stop"] for b in up.state.requests[-2:]] == [["two-1"], ["two-1"]]
        # the grammar (serving.decoding.grammar) the same way: on every request, in vLLM's structured_outputs, unless
        # the request constrains its own output
        grammar = {"grammar": loaded.config.serving.decoding.grammar_text}
        assert grammar["grammar"] and len(up.state.requests) == 5
        assert all(b["structured_outputs"] == grammar for b in up.state.requests)
        chat(gw.url, registry["user"], max_tokens=5, response_format={"type": "text"})
        assert "structured_outputs" not in up.state.requests[-1] and up.state.requests[-1]["stop"] == ["two-1"]


def test_the_arena_candidate_is_hidden_from_user_tokens_by_every_name(registry):
    """A version the arena compares and no other alias serves is neither listed for a user token nor served to it by
    alias, name@N, name@alias or vN (a voter could unblind every match); an admin token and the arena still reach it."""
    client = MlflowClient()
    client.set_registered_model_alias(NAME, "candidate", "1")
    client.delete_registered_model_alias(NAME, "previous")
    try:
        with Upstream() as up, gateway(registry, up, requests_per_min=1000) as gw:
            time.sleep(0.6)  # the gateway re-reads the aliases every 0.2 s

            def listed(token):
                return {m["id"] for m in HTTP.get(f"{gw.url}/v1/models", headers=auth(token)).json()["data"]}

            assert listed(registry["user"]) == {"champion"}
            assert listed(registry["admin"]) == {"champion", "candidate"}
            for name in ("candidate", f"{NAME}@1", f"{NAME}@candidate", "v1"):
                r = chat(gw.url, registry["user"], model=name)
                assert r.status_code == 403 and r.json()["error"]["code"] == "model_hidden", (name, r.text)
            assert chat(gw.url, registry["user"], model="champion").status_code == 200
            r = chat(gw.url, registry["admin"], model="candidate")
            assert r.json()["choices"][0]["message"]["content"].startswith("weights-one-0")
            r = HTTP.post(f"{gw.url}/v1/arena", headers=auth(registry["user"]), timeout=30,
                          json={"messages": [{"role": "user", "content": "주문 화면"}]})
            assert r.status_code == 200, r.text
            assert sorted(b["model"] for b in up.state.requests[-2:]) == [f"{NAME}-v1", f"{NAME}-v2"]
    finally:
        restore_aliases()


def test_auth_none_wrong_and_user_on_admin_endpoints(served, registry):
    gw, _ = served
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and "make token" in r.json()["error"]["message"]
    assert chat(gw.url, "llmops-wrong").status_code == 401
    for path in ("/admin/usage", "/admin/usage.csv", "/admin/tokens", "/metrics"):
        r = httpx.get(gw.url + path, headers=auth(registry["user"]))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", path
        assert httpx.get(gw.url + path, headers=auth(registry["admin"])).status_code == 200, path
    assert httpx.get(f"{gw.url}/healthz").json()["status"] == "ok"
    # tokens are stored as digests: the database file does not contain the token itself
    raw = b"".join(f.read_bytes() for f in registry["tmp"].glob("gw.db*"))  # the database and its WAL
    assert registry["user"].encode() not in raw and b"alice" in raw


def test_make_token_prints_a_working_token_once(served, registry, capsys):
    from flows.gateway import main

    gw, _ = served
    assert main(["--set", registry["overrides"][3], "--token", "carol", "--role", "user"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("llmops-") and chat(gw.url, token).status_code == 200
    assert main(["--set", registry["overrides"][3], "--token", "carol"]) == 2  # a second token of that name is refused
    assert "exists already" in capsys.readouterr().err
    r = httpx.delete(f"{gw.url}/admin/tokens/carol", headers=auth(registry["admin"]))
    assert r.json()["revoked"] is True
    assert chat(gw.url, token).status_code == 401


def test_a_since_that_is_not_a_date_is_a_400_naming_it(served, registry):
    gw, _ = served
    for path in ("/admin/usage", "/admin/usage.csv", "/admin/feedback", "/admin/arena"):
        r = httpx.get(f"{gw.url}{path}", params={"since": "last tuesday"}, headers=auth(registry["admin"]))
        assert r.status_code == 400, path
        assert r.json()["error"]["code"] == "invalid_since" and "'last tuesday' is not an ISO date" in r.json()["error"]["message"]


def test_usage_rows_masked_and_exported_as_csv(served, registry):
    gw, _ = served
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
    token = registry["db"].create_token("dave", "user")  # a token of its own: only these two rows are dave's
    assert chat(gw.url, token, content="제 번호는 010-1234-5678, 메일 kim@example.com 입니다").status_code == 200
    assert chat(gw.url, token, model="previous", stream=True).status_code == 200
    rows = httpx.get(f"{gw.url}/admin/usage", params={"token": "dave", "since": since},
                     headers=auth(registry["admin"])).json()["data"]
    assert [(r["alias"], r["version"], r["stream"], r["status"]) for r in rows] == [
        ("champion", "2", False, 200), ("previous", "1", True, 200)]
    first, streamed = rows
    assert first["prompt"] == "제 번호는 <PHONE>, 메일 <EMAIL> 입니다" and first["request_id"].startswith("chatcmpl-gw-")
    assert first["input_tokens"] > 0 and first["output_tokens"] == 3 and first["latency_ms"] > 0
    assert streamed["ttft_ms"] is not None and 0 < streamed["ttft_ms"] <= streamed["latency_ms"]
    text = httpx.get(f"{gw.url}/admin/usage.csv", params={"token": "dave", "since": since}, headers=auth(registry["admin"])).text
    table = list(csv.DictReader(io.StringIO(text)))
    assert [r["request_id"] for r in table] == [r["request_id"] for r in rows] and "010-1234" not in text
    assert {"token_name", "alias", "version", "input_tokens", "output_tokens", "ttft_ms", "latency_ms",
            "status"} <= set(table[0])
    conn = sqlite3.connect(registry["tmp"] / "gw.db")  # nothing unmasked anywhere in the database
    assert not [r for r in conn.execute("select prompt from usage") if r[0] and "010-1234-5678" in r[0]]


def test_every_stored_text_is_masked_before_it_is_cut(served, registry):
    """Issue 28's leaks, through the gateway: written forms the old masker missed, the upstream's error text (vLLM
    echoes the request), a model name holding an e-mail, a conversation title longer than its cut, and a CSV cell
    that a spreadsheet would run as a formula."""
    gw, _ = served
    token = registry["db"].create_token("erin", "user")
    h = auth(token)
    forms = "카드 4111 1111 1111 1111 12/25, 전화 (+82) 10 9876 5432, 메일 kim＠naver.com, 번호 ０１０-２２２２-３３３３"
    assert chat(gw.url, token, content=forms).status_code == 200
    echoed = chat(gw.url, token, content="주민번호 900101-1234567 확인", temperature=5)
    assert echoed.status_code == 400 and "<RRN>" not in echoed.text  # the client gets the upstream's own words back
    assert chat(gw.url, token, model="kim@naver.com").status_code == 404
    assert chat(gw.url, token, model="=HYPERLINK(\"http://x\")").status_code == 404
    title = "가" * 75 + " 010-1234-5678 끝"
    conv = httpx.post(f"{gw.url}/v1/conversations", headers=h, json={"title": title}).json()
    assert "010" not in conv["title"] and conv["title"].startswith("가" * 75 + " <PHO") and len(conv["title"]) == 80

    rows = httpx.get(f"{gw.url}/admin/usage", params={"token": "erin"}, headers=auth(registry["admin"])).json()["data"]
    assert rows[0]["prompt"] == "카드 <CARD> 12/25, 전화 <PHONE>, 메일 <EMAIL>, 번호 <PHONE>"
    assert "<RRN>" in rows[1]["error"] and "900101" not in rows[1]["error"]
    assert rows[2]["requested_model"] == "<EMAIL>"
    text = httpx.get(f"{gw.url}/admin/usage.csv", params={"token": "erin"}, headers=auth(registry["admin"])).text
    assert "'=HYPERLINK" in text and not any(line.startswith("=") or ",=" in line for line in text.splitlines())
    conn = sqlite3.connect(registry["tmp"] / "gw.db")
    dump = "\n".join(conn.iterdump())
    for raw in ("4111 1111 1111 1111", "9876 5432", "kim＠naver.com", "kim@naver.com", "900101-1234567", "1234-5678",
                "２２２２"):
        assert raw not in dump, raw


def test_model_names_outside_the_allow_list_never_reach_the_registry_or_the_disk(served, registry):
    """Issue 28: `name@N` was joined into a cache path and created before the fetch (a `../` name made a folder
    outside the project); wrong types gave a plain-text 500. Now: the allow-list (serving.registered_models) first,
    an unknown version of an allowed name leaves no folder, and every bad body is an OpenAI-shaped 4xx."""
    from workspace.paths import CACHE

    gw, _ = served
    versions = CACHE / "gateway" / "versions"
    before = sorted(p.relative_to(CACHE) for p in CACHE.rglob("*")) if CACHE.exists() else []
    outside = Path("/tmp") / f"evil-{time.time_ns()}"
    for model in (f"../../../../../../..{outside}@1", "someone-elses-model@1", f"{NAME}@999", "x@1"):
        r = chat(gw.url, registry["user"], model=model)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (model, r.text)
    assert NAME in chat(gw.url, registry["user"], model="someone-elses-model@1").json()["error"]["message"]
    assert not outside.exists() and not list(Path("/tmp").glob(f"{outside.name}*"))
    after = sorted(p.relative_to(CACHE) for p in CACHE.rglob("*")) if CACHE.exists() else []
    assert not [p for p in set(after) - set(before) if ".part" in str(p) or "evil" in str(p)], set(after) - set(before)
    assert not versions.exists() or not list(versions.glob("*/*.part"))
    bad = {"model as a number": {"model": 5}, "model as a list": {"model": ["champion"]},
           "stream_options as text": {"stream_options": "x", "stream": True},
           "conversation id past 64 bits": {"conversation_id": 10 ** 23}, "conversation id true": {"conversation_id": True}}
    for what, extra in bad.items():
        body = {"model": "champion", "messages": [{"role": "user", "content": "안녕"}], "max_tokens": 2, **extra}
        r = HTTP.post(f"{gw.url}/v1/chat/completions", headers=auth(registry["user"]), json=body, timeout=30)
        assert r.status_code in (400, 404) and set(r.json()["error"]) == {"message", "type", "param", "code"}, (what, r.text)
    r = httpx.get(f"{gw.url}/v1/conversations/{10 ** 23}", headers=auth(registry["user"]))
    assert r.status_code in (404, 422), r.text


def test_a_1mb_prompt_is_refused_413_while_another_request_is_served(served, registry):
    """Issue 28: a 10 MB prompt was stored whole, and a long one held the event loop. Now the body is refused by its
    Content-Length before it is read, a chunked one once the count passes the limit, and the prompt by its length;
    the other token's request sent at the same moment is answered."""
    import threading

    gw, _ = served
    big = {"model": "champion", "max_tokens": 2, "messages": [{"role": "user", "content": "가나다라 " * 200_000}]}
    payload = json.dumps(big, ensure_ascii=False).encode()
    assert len(payload) > 1_000_000
    results = {}

    def send_big():
        results["big"] = HTTP.post(f"{gw.url}/v1/chat/completions", headers={**auth(registry["user"]),
                                   "Content-Type": "application/json"}, content=payload, timeout=60)

    def send_small():
        results["small"] = chat(gw.url, registry["other"])

    threads = [threading.Thread(target=send_big), threading.Thread(target=send_small)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["small"].status_code == 200
    big_r = results["big"]
    assert big_r.status_code == 413 and big_r.json()["error"]["code"] == "request_too_large", big_r.text

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i:i + 64 * 1024]

    r = HTTP.post(f"{gw.url}/v1/chat/completions", headers=auth(registry["user"]), content=chunks(), timeout=60)
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    long_prompt = chat(gw.url, registry["user"], content="가" * 150_000)  # 450 KB: under the body limit, over the prompt's
    assert long_prompt.status_code == 413 and long_prompt.json()["error"]["code"] == "prompt_too_large"
    rows = httpx.get(f"{gw.url}/admin/usage", headers=auth(registry["admin"])).json()["data"]
    assert not [r for r in rows if r["prompt"] and len(r["prompt"]) > 100_000]  # nothing that size was stored


def test_token_names_are_checked_reusable_after_revocation_and_the_database_is_private(served, registry, tmp_path):
    """Issue 28: `{"name": null}` made a token named "None", `<img ...>` and `a/b` were accepted (the latter never
    revocable), a revoked name could never be given out again, and gateway.db was world-readable."""
    import os
    import stat
    import subprocess
    import sys

    from serving.gateway.db import GatewayDbError
    from workspace.paths import ROOT

    gw, _ = served
    admin = auth(registry["admin"])
    for bad in (None, "", "a/b", "<img src=x onerror=alert(1)>", "x" * 65, 7, "-lead"):
        r = httpx.post(f"{gw.url}/admin/tokens", headers=admin, json={"name": bad, "role": "user"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, (bad, r.text)
    db = registry["db"]
    first = db.create_token("frank", "user")
    with pytest.raises(GatewayDbError, match="revoke it first"):
        db.create_token("frank", "user")
    assert db.revoke_token("frank")
    second = db.create_token("frank", "admin")  # the name is free again; the old token stays refused
    assert chat(gw.url, first).status_code == 401 and chat(gw.url, second).status_code == 200
    mode = stat.S_IMODE(os.stat(registry["tmp"] / "gw.db").st_mode)
    assert mode == 0o600, oct(mode)
    # make token REVOKE=NAME, as a command, on a database of its own
    url = f"sqlite:///{tmp_path}/cmd.db"
    run = [sys.executable, "-m", "llmops", "gateway", "--set", f"serving.gateway.database_url={url}"]
    made = subprocess.run(run + ["--token", "gina"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    gone = subprocess.run(run + ["--revoke", "gina"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    again = subprocess.run(run + ["--revoke", "nobody"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and gone.returncode == 0 and "revoked" in gone.stdout, made.stderr + gone.stderr
    assert again.returncode == 2 and "no token named 'nobody'" in again.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "cmd.db").st_mode) == 0o600


def test_tokens_can_expire_and_an_older_database_gains_the_column(served, registry, tmp_path):
    import datetime as dt
    import subprocess
    import sys

    from sqlalchemy import update

    from serving.gateway.db import ApiToken, GatewayDbError
    from workspace.paths import ROOT

    gw, _ = served
    admin = auth(registry["admin"])
    r = httpx.post(f"{gw.url}/admin/tokens", headers=admin, json={"name": "temp", "expires_in": "12h"})
    assert r.status_code == 200, r.text
    temp = r.json()["token"]
    listed = {t["name"]: t for t in httpx.get(f"{gw.url}/admin/tokens", headers=admin).json()["data"]}
    expires = dt.datetime.fromisoformat(listed["temp"]["expires_at"])
    assert dt.timedelta(hours=11, minutes=59) < expires - dt.datetime.fromisoformat(listed["temp"]["created_at"]) \
        <= dt.timedelta(hours=12, seconds=1)
    assert listed["root"]["expires_at"] is None  # no lifetime: until revoked
    assert chat(gw.url, temp).status_code == 200
    db = registry["db"]
    with db.session() as s, s.begin():  # its lifetime runs out
        s.execute(update(ApiToken).where(ApiToken.name == "temp").values(expires_at=dt.datetime(2020, 1, 1)))
    time.sleep(5.1)  # the gateway's auth cache keeps a checked token for 5 s
    r = chat(gw.url, temp)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    for bad in ("0d", "soon", "-3h", 5):
        r = httpx.post(f"{gw.url}/admin/tokens", headers=admin, json={"name": "temp2", "expires_in": bad})
        assert r.status_code == 400 and "lifetime" in r.json()["error"]["message"], bad
    with pytest.raises(GatewayDbError, match="positive"):
        db.create_token("temp3", "user", dt.timedelta(0))
    # make token NAME=... EXPIRES=30d
    url = f"sqlite:///{tmp_path}/cmd.db"
    made = subprocess.run([sys.executable, "-m", "llmops", "gateway", "--set", f"serving.gateway.database_url={url}",
                           "--token", "hana", "--expires", "30d"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and "valid for 30d" in made.stdout, made.stderr
    # a database made before tokens could expire (no expires_at column): opened, it gains the column, old tokens work
    old = tmp_path / "old.db"
    con = sqlite3.connect(old)
    con.execute("CREATE TABLE api_tokens (id INTEGER PRIMARY KEY, name VARCHAR(100) UNIQUE, role VARCHAR(10), "
                "digest VARCHAR(64) UNIQUE, created_at DATETIME, revoked BOOLEAN)")
    import hashlib

    con.execute("INSERT INTO api_tokens VALUES (1, 'olga', 'user', ?, '2026-11-01 00:00:00', 0)",
                (hashlib.sha256(b"llmops-old-token").hexdigest(),))
    con.commit()
    con.close()
    from serving.gateway.db import GatewayDb

    reopened = GatewayDb(f"sqlite:///{old}")
    row = reopened.check_token("llmops-old-token")
    assert row is not None and row.name == "olga" and row.expires_at is None


def test_errors_are_openai_shaped(served, registry):
    gw, up = served
    cases = {
        "empty": (httpx.post(f"{gw.url}/v1/chat/completions", headers=auth(registry["user"]), json={"messages": []}), 400),
        "blank": (chat(gw.url, registry["user"], content="   "), 400),
        "alias": (chat(gw.url, registry["user"], model="nightly"), 404),
        "context": (chat(gw.url, registry["user"], content="말 " * (up.state.max_model_len + 1)), 400),
        "json": (httpx.post(f"{gw.url}/v1/chat/completions", headers=auth(registry["user"]), content=b"{nope"), 400),
    }
    for what, (r, status) in cases.items():
        assert r.status_code == status, (what, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], what
    assert "nightly" in cases["alias"][0].json()["error"]["message"]
    assert "maximum context length" in cases["context"][0].json()["error"]["message"]  # the upstream's own words


def test_upstream_down_or_slow(registry):
    with Upstream() as up, gateway(registry, up, upstream_timeout_s=0.5, retries=0) as gw:
        up.state.token_delay_s = 1.0
        r = chat(gw.url, registry["user"])  # the non-streamed answer needs 3 s: over the 0.5 s timeout
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        up.state.token_delay_s = 0
        time.sleep(0.5)  # the health loop brings the replica back
        assert chat(gw.url, registry["user"]).status_code == 200
        up.stop()
        r = chat(gw.url, registry["user"])
        assert r.status_code in (502, 503) and r.json()["error"]["type"] == "server_error"
        time.sleep(0.5)
        r = chat(gw.url, registry["user"])
        assert r.status_code == 503 and "is `make serve` running?" in r.json()["error"]["message"]
        assert httpx.get(f"{gw.url}/healthz").status_code == 503


def test_rate_limits_answer_429_with_retry_after(registry):
    with Upstream() as up, gateway(registry, up, requests_per_min=3, tokens_per_min=10_000) as gw:
        codes = [chat(gw.url, registry["user"]).status_code for _ in range(3)]
        r = chat(gw.url, registry["user"])
        assert codes == [200, 200, 200] and r.status_code == 429
        assert r.json()["error"]["type"] == "rate_limit_error" and 1 <= int(r.headers["Retry-After"]) <= 60
        assert chat(gw.url, registry["other"]).status_code == 200  # per token
    with Upstream() as up, gateway(registry, up, tokens_per_min=20) as gw:
        # a request holds 8 prompt characters + max_tokens before it goes upstream, and is charged what it used
        assert chat(gw.url, registry["user"], max_tokens=8).status_code == 200  # holds 16; charged 3 + 8: 9 left
        r = chat(gw.url, registry["user"], max_tokens=8)  # would hold 16 of the 9 left
        assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"] and r.headers["Retry-After"]
        assert chat(gw.url, registry["user"], max_tokens=1).status_code == 200  # holds 9 of 9: charged 4, 5 left
        assert chat(gw.url, registry["user"]).status_code == 429


def test_n_and_max_tokens_are_capped_and_parallel_requests_cannot_overspend(registry):
    with Upstream() as up, gateway(registry, up, tokens_per_min=100, max_n=2, max_tokens=64,
                                   requests_per_min=1000) as gw:
        for extra, code in (({"n": 3}, "invalid_n"), ({"n": "2"}, "invalid_n"), ({"max_tokens": 65}, "invalid_max_tokens"),
                            ({"max_completion_tokens": 0}, "invalid_max_tokens"), ({"max_tokens": 64, "n": 2},
                                                                                   "request_over_budget")):
            r = chat(gw.url, registry["user"], content="x", **extra)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (extra, r.text)
        assert not up.state.requests  # refused before anything went upstream
        # three requests at once, each holding 1 + 40 tokens of 100: two go upstream, the third is refused
        up.state.token_delay_s = 0.05  # 2 s per answer: the three overlap
        with ThreadPoolExecutor(3) as pool:
            futures = []
            for _ in range(3):
                futures.append(pool.submit(chat, gw.url, registry["user"], content="x", max_tokens=40))
                time.sleep(0.3)
            codes = sorted(f.result().status_code for f in futures)
        assert codes == [200, 200, 429] and len(up.state.requests) == 2
        up.state.token_delay_s = 0
        # settled: 2 x (1 prompt + 40) charged, the holds released, so 18 are free (a leaked hold would refuse this)
        assert chat(gw.url, registry["user"], content="x", max_tokens=17).status_code == 200
        assert chat(gw.url, registry["user"], content="x", max_tokens=1).status_code == 429


def test_every_write_endpoint_is_rate_limited(registry):
    writes = [("POST", "/v1/conversations", "user", {"title": "t"}), ("PATCH", "/v1/conversations/1", "user", {"title": "t"}),
              ("POST", "/v1/feedback", "user", {"request_id": "x"}), ("POST", "/v1/arena/1/vote", "user", {"winner": "A"}),
              ("POST", "/admin/reload", "admin", {}), ("POST", "/admin/tokens", "admin", {"name": "bad name"}),
              ("DELETE", "/admin/tokens/nobody", "admin", None)]
    with Upstream() as up, gateway(registry, up, requests_per_min=2) as gw:
        for i, (method, path, role, body) in enumerate(writes):
            head = auth(registry["db"].create_token(f"writer-{i}", role))  # a window of its own per path
            kw = {"json": body} if body is not None else {}
            codes = [HTTP.request(method, gw.url + path, headers=head, **kw).status_code for _ in range(3)]
            assert 429 not in codes[:2] and codes[2] == 429, (method, path, codes)


def test_anonymous_health_is_up_or_down_and_the_schema_is_for_admins(served, registry):
    gw, _ = served
    anon = httpx.get(f"{gw.url}/healthz")
    assert anon.status_code == 200 and anon.json() == {"status": "ok"}  # no replica URLs, names or registry
    full = httpx.get(f"{gw.url}/healthz", headers=auth(registry["admin"])).json()
    assert full["replicas"] and full["aliases"] and full["registry"]["model"] == NAME
    assert httpx.get(f"{gw.url}/healthz", headers=auth(registry["user"])).status_code == 403
    assert httpx.get(f"{gw.url}/docs").status_code == 404 and httpx.get(f"{gw.url}/redoc").status_code == 404
    assert httpx.get(f"{gw.url}/openapi.json").status_code == 401
    assert httpx.get(f"{gw.url}/openapi.json", headers=auth(registry["user"])).status_code == 403
    schema = httpx.get(f"{gw.url}/openapi.json", headers=auth(registry["admin"])).json()
    assert "/v1/chat/completions" in schema["paths"]


def test_the_chat_page_allows_only_its_own_script_and_style(served):
    gw, _ = served
    r = httpx.get(gw.url + "/")
    csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    html = r.text
    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
    assert csp["script-src"] == digest and csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert "unsafe-inline" not in r.headers["content-security-policy"] and ' style="' not in html
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"


def test_conversations_create_list_load_retitle(served, registry):
    gw, _ = served
    h = auth(registry["user"])
    conv = httpx.post(f"{gw.url}/v1/conversations", headers=h, json={"title": "화면 생성", "system_prompt": "간결하게"}).json()
    r = httpx.post(
        f"{gw.url}/v1/chat/completions", headers=h, json={
            "model": "champion", "max_tokens": 2, "conversation_id": conv["id"],
            "messages": [{"role": "system", "content": "간결하게"}, {"role": "user", "content": "전화 010-9876-5432 로 연락"}]})
    assert r.status_code == 200
    listed = httpx.get(f"{gw.url}/v1/conversations", headers=h).json()["data"]
    assert conv["id"] in [c["id"] for c in listed]
    loaded = httpx.get(f"{gw.url}/v1/conversations/{conv['id']}", headers=h).json()
    assert [(m["role"], m["content"]) for m in loaded["messages"]] == [
        ("user", "전화 <PHONE> 로 연락"), ("assistant", "weights-two-0 weights-two-1")]
    assert loaded["system_prompt"] == "간결하게" and loaded["model"] == "champion"
    assert httpx.patch(f"{gw.url}/v1/conversations/{conv['id']}", headers=h, json={"title": "새 제목"}).json()["title"] == "새 제목"
    # another token neither sees nor writes into it
    assert httpx.get(f"{gw.url}/v1/conversations/{conv['id']}", headers=auth(registry["other"])).status_code == 404
    assert chat(gw.url, registry["other"], conversation_id=conv["id"]).status_code == 404


def test_promote_and_rollback_switch_traffic_without_restart(registry):
    loaded, tmp = registry["loaded"], registry["tmp"]
    configure(loaded)
    with Upstream() as up, gateway(registry, up) as gw:
        up.state.token_delay_s = 0.15
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=auth(registry["admin"]), timeout=30,
                          json={"model": "champion", "max_tokens": 12, "stream": True,
                                "messages": [{"role": "user", "content": "x"}]}) as inflight:
            lines = inflight.iter_lines()
            first = next(l for l in lines if l.startswith("data: "))
            with stage_run(loaded, "promote") as run:  # v3 becomes champion while v2 is streaming
                promote(NAME, run.info.run_id, make_bundle(tmp, "three"), {})
            time.sleep(0.6)  # > registry_refresh_s
            assert chat(gw.url, registry["admin"], max_tokens=1).json()["choices"][0]["message"]["content"] == "weights-three-0"
            rest = [l for l in lines if l.startswith("data: ") and "[DONE]" not in l]
        streamed = "".join(json.loads(l[6:])["choices"][0]["delta"]["content"] for l in [first, *rest]
                           if json.loads(l[6:])["choices"])
        assert streamed.split() == [f"weights-two-{i}" for i in range(12)]  # the request in flight kept its version
        rollback(NAME)  # champion v3 -> v2
        r = httpx.post(f"{gw.url}/admin/reload", headers=auth(registry["admin"])).json()
        assert r["aliases"]["champion"] == "2"
        assert chat(gw.url, registry["admin"], max_tokens=1).json()["choices"][0]["message"]["content"] == "weights-two-0"
    restore_aliases()


def test_canary_share_is_recorded_and_within_tolerance(registry):
    from scipy.stats import binomtest

    MlflowClient().set_registered_model_alias(NAME, "candidate", "1")
    try:
        with Upstream() as up, gateway(registry, up, **{"canary.alias": "candidate", "canary.percent": 20,
                                                        "requests_per_min": 1000}) as gw:
            answers = [chat(gw.url, registry["admin"], max_tokens=1).json()["choices"][0]["message"]["content"]
                       for _ in range(200)]
            explicit = chat(gw.url, registry["admin"], model="previous", max_tokens=1)
            rows = httpx.get(f"{gw.url}/admin/usage", headers=auth(registry["admin"])).json()["data"][-201:]
    finally:
        restore_aliases()
    canary = sum(a == "weights-one-0" for a in answers)
    assert binomtest(canary, 200, 0.2).pvalue > 0.001 and 20 <= canary <= 60, canary
    recorded = [r for r in rows[:-1] if r["canary"]]
    assert len(recorded) == canary and {(r["alias"], r["version"], r["requested_model"]) for r in recorded} == {
        ("candidate", "1", "champion")}
    assert explicit.status_code == 200 and rows[-1]["canary"] is False  # only champion traffic is split


def test_routing_table_sends_auto_by_keyword_or_regex(registry):
    routes = '[{"name":"xml","model":"previous","keywords":["XML"]},{"name":"ids","model":"champion","regex":"ID-\\\\d+"}]'
    with Upstream() as up, gateway(registry, up, routes=routes, default_model="previous") as gw:
        ask = lambda text: chat(gw.url, registry["admin"], model="auto", content=text, max_tokens=1).json()  # noqa: E731
        assert ask("XML 화면을 만들어줘")["choices"][0]["message"]["content"] == "weights-one-0"
        assert ask("주문 ID-42 조회")["choices"][0]["message"]["content"] == "weights-two-0"
        assert ask("그냥 질문")["choices"][0]["message"]["content"] == "weights-one-0"  # default_model
        ids = {m["id"] for m in httpx.get(f"{gw.url}/v1/models", headers=auth(registry["admin"])).json()["data"]}
        assert "auto" in ids
        rows = httpx.get(f"{gw.url}/admin/usage", headers=auth(registry["admin"])).json()["data"][-3:]
        assert [r["route"] for r in rows] == ["xml", "ids", None]


def test_replica_failover_and_least_busy(registry):
    with Upstream() as a, Upstream() as b, gateway(registry, a, b, health_interval_s=60) as gw:
        # least busy: two slow streams at once land on different replicas
        a.state.token_delay_s = b.state.token_delay_s = 0.3
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=auth(registry["admin"]), timeout=30,
                          json={"model": "champion", "max_tokens": 4, "stream": True,
                                "messages": [{"role": "user", "content": "x"}]}) as one:
            lines = one.iter_lines()
            next(lines)
            assert chat(gw.url, registry["admin"], max_tokens=1).status_code == 200
            list(lines)
        assert len(a.state.requests) == 1 and len(b.state.requests) == 1
        a.state.token_delay_s = b.state.token_delay_s = 0
        a.stop()  # one replica dies; the health loop (60 s) has not noticed: requests that fail there are retried
        results = [chat(gw.url, registry["admin"], max_tokens=1, stream=bool(i % 2)) for i in range(6)]
        assert [r.status_code for r in results] == [200] * 6
        rows = httpx.get(f"{gw.url}/admin/usage", headers=auth(registry["admin"])).json()["data"][-6:]
        assert {r["replica"] for r in rows} == {b.base_url} and max(r["attempts"] for r in rows) == 2
        health = httpx.get(f"{gw.url}/healthz", headers=auth(registry["admin"])).json()
        assert [r["healthy"] for r in health["replicas"]] == [False, True] and health["status"] == "ok"
        assert "gateway_retries_total 1.0" in httpx.get(f"{gw.url}/metrics", headers=auth(registry["admin"])).text


def test_client_disconnect_cancels_the_upstream_request(registry):
    with Upstream() as up, gateway(registry, up) as gw:
        up.state.token_delay_s = 0.2
        host, port = "127.0.0.1", gw.port
        body = json.dumps({"model": "champion", "max_tokens": 50, "stream": True,
                           "messages": [{"role": "user", "content": "x"}]}).encode()
        s = socket.create_connection((host, port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {registry['admin']}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data: ") < 2:
            got += s.recv(4096)
        s.close()  # the client leaves after two tokens of fifty
        deadline = time.monotonic() + 5
        while up.state.cut == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert up.state.cut == 1 and up.state.completed == 0  # the upstream stream was closed, not run to the end
        time.sleep(0.3)
        row = httpx.get(f"{gw.url}/admin/usage", headers=auth(registry["admin"])).json()["data"][-1]
        assert row["status"] == 499 and row["error"] == "client disconnected" and row["answer"].startswith("weights-two-0")
        # a non-streamed request whose client leaves is cancelled too
        s = socket.create_connection((host, port))
        body = body.replace(b'"stream": true', b'"stream": false')
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {registry['admin']}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.0)
        s.close()  # 1 s into a 10 s answer
        deadline = time.monotonic() + 5
        while up.state.cut < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert up.state.cut == 2 and up.state.completed == 0
        row = httpx.get(f"{gw.url}/admin/usage", headers=auth(registry["admin"])).json()["data"][-1]
        assert row["status"] == 499 and not row["stream"]


def test_metrics_count_requests_tokens_and_ttft(served, registry):
    gw, _ = served
    chat(gw.url, registry["admin"], stream=True)
    text = httpx.get(f"{gw.url}/metrics", headers=auth(registry["admin"])).text
    for name in ("gateway_requests_total", "gateway_request_latency_seconds_bucket",
                 "gateway_time_to_first_token_seconds_bucket", 'gateway_tokens_total{direction="output"}',
                 "gateway_inflight_requests"):
        assert name in text, name


class DoubleReplica:
    """A replica for the supervisor: an upstream stand-in that serves one version's merged weights (it cannot load
    others at run time, like vLLM serving a merged model)."""

    def __init__(self, name: str, version: str, tag: str):
        self.up = Upstream()
        self.up.state.allow_load = False
        self.up.state.loaded[f"{name}-v{version}"] = f"weights-{tag}"
        self.base_url, self.pid, self.running = self.up.base_url, None, False

    def start(self):
        self.up.start()
        self.running = True
        return self

    def stop(self) -> bool:
        self.up.stop()
        was, self.running = self.running, False
        return was

    def busy(self) -> int:
        return self.up.state.active


def test_merged_champion_replaced_by_the_supervisor_without_failing_requests(registry, tmp_path):
    """Merged mode: `make serve`'s supervisor follows a rollback by starting the new champion's replica, listing it
    beside the old one in the replicas file the gateway follows, and stopping the old one once drained; a stream
    in flight on the old version completes, new requests reach the new version, nothing fails."""
    from serving.registry import alias_version
    from serving.supervisor import Supervisor

    tags = {"1": "one", "2": "two", "3": "three"}
    loaded = load_config(overrides=registry["overrides"] + ["serving.adapter_mode=merged"])
    started = []

    def launch(n):
        v = alias_version(NAME, "champion")
        reps = [DoubleReplica(NAME, v, tags[v]).start() for _ in range(n)]
        started.extend(reps)
        return reps, v

    sup = Supervisor(loaded, launch, champion=lambda: alias_version(NAME, "champion"), path=tmp_path / "replicas.json",
                     settle_s=0.5, log=lambda m: None)
    app = create_app(loaded, replicas_file=tmp_path / "replicas.json")
    try:
        first = sup.start()
        assert first.version == "2"
        with ServeApp(app) as gw:
            assert chat(gw.url, registry["admin"], max_tokens=1).json()["choices"][0]["message"]["content"] == "weights-two-0"
            for _ in range(2):  # another version cannot be loaded into merged weights: named, not a hang or a 500
                r = chat(gw.url, registry["admin"], model="previous", max_tokens=1)
                assert r.status_code == 503 and "cannot load" in r.json()["error"]["message"], r.text
            started[0].up.state.token_delay_s = 0.1
            with HTTP.stream("POST", f"{gw.url}/v1/chat/completions", headers=auth(registry["admin"]), json={
                    "model": "champion", "max_tokens": 20, "stream": True,
                    "messages": [{"role": "user", "content": "x"}]}) as inflight:
                lines = inflight.iter_lines()
                first_line = next(l for l in lines if l.startswith("data: "))
                rollback(NAME)  # champion v2 -> v1
                sup.step()  # starts v1's replica, lists both
                assert [r["version"] for r in json.loads((tmp_path / "replicas.json").read_text())["replicas"]] == ["1", "2"]
                time.sleep(0.6)  # the gateway re-reads aliases and replicas
                after = chat(gw.url, registry["admin"], max_tokens=1)
                assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "weights-one-0"
                sup.step()  # v2's replica is still streaming: not stopped
                assert started[0].running
                rest = [l for l in lines if l.startswith("data: ") and "[DONE]" not in l]
            words = "".join(json.loads(l[6:])["choices"][0]["delta"]["content"] for l in [first_line, *rest]
                            if json.loads(l[6:])["choices"]).split()
            assert words == [f"weights-two-{i}" for i in range(20)]
            time.sleep(0.6)
            sup.step()  # drained: stopped and unlisted
            assert not started[0].running and [r["version"] for r in json.loads(
                (tmp_path / "replicas.json").read_text())["replicas"]] == ["1"]
            time.sleep(0.5)
            rows = httpx.get(f"{gw.url}/admin/usage", headers=auth(registry["admin"])).json()["data"]
            rows = [r for r in rows if r["status"] != 503][-3:]
            assert [(r["version"], r["status"]) for r in rows] == [("2", 200), ("1", 200), ("2", 200)]
            assert chat(gw.url, registry["admin"], max_tokens=1).status_code == 200
    finally:
        sup.stop()
        restore_aliases()
    assert not (tmp_path / "replicas.json").exists()


def test_two_gateways_share_rate_limits_through_redis(registry, tmp_path):
    """limits_storage redis://: two gateway processes count one token's requests together (a real redis-server on
    127.0.0.1, installed by `make setup`)."""
    from workspace.processes import ManagedProcess, free_port
    from workspace.setup_env import REDIS

    if not Path(REDIS).exists():
        pytest.fail(f"no redis-server at {REDIS}: `make setup` installs it as root (apt-get install redis-server)")
    port = free_port()
    redis = ManagedProcess([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                           log_path=tmp_path / "redis.log",
                           healthy=lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, what="redis-server")
    with redis, Upstream() as up, \
            gateway(registry, up, requests_per_min=3, limits_storage=f"redis://127.0.0.1:{port}") as a, \
            gateway(registry, up, requests_per_min=3, limits_storage=f"redis://127.0.0.1:{port}") as b:
        codes = [chat(g.url, registry["user"]).status_code for g in (a, b, a)]
        over = chat(b.url, registry["user"])
        assert codes == [200, 200, 200] and over.status_code == 429 and over.headers["Retry-After"]
        assert chat(a.url, registry["other"]).status_code == 200  # still per token


def test_the_gateway_reads_its_own_registry_wherever_the_process_points_mlflow(registry, tmp_path):
    """Aliases and version files come from serving.gateway's configured store, not from MLflow's process-wide URI
    (which anything else in the process may move: a flow, a test)."""
    import mlflow

    with Upstream() as up, gateway(registry, up) as gw:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/elsewhere.db")
        try:
            r = httpx.post(f"{gw.url}/admin/reload", headers=auth(registry["admin"])).json()
            assert r["aliases"].get("champion") == "2" and r["error"] is None
            answer = chat(gw.url, registry["user"], model=f"{NAME}@1", max_tokens=1).json()
            assert answer["choices"][0]["message"]["content"] == "weights-one-0"
        finally:
            configure(registry["loaded"])


@pytest.mark.slow
def test_the_gateway_on_postgresql_tokens_usage_conversations_feedback_arena(registry, postgres_server):
    """serving.gateway.database_url on PostgreSQL (a team's setting): the migrations build it at start, and the
    token, usage, conversation, feedback and arena paths work through the API as on SQLite, masked as on SQLite."""
    from conftest import postgres_database

    url = postgres_database(postgres_server)
    loaded = load_config(overrides=registry["overrides"] + [f"serving.gateway.database_url={url}",
                                                            "serving.gateway.requests_per_min=1000"])
    db = GatewayDb(url)
    user, admin = db.create_token("pg-user", "user"), db.create_token("pg-admin", "admin")
    restore_aliases()
    with Upstream() as up, ServeApp(create_app(loaded, upstreams=[up.base_url])) as gw:
        h = auth(user)
        conv = HTTP.post(f"{gw.url}/v1/conversations", headers=h, json={"title": "화면 생성"}).json()
        r = chat(gw.url, user, content="전화 010-9876-5432 로 연락", conversation_id=conv["id"])
        assert r.status_code == 200
        rid = r.json()["id"]
        loaded_conv = HTTP.get(f"{gw.url}/v1/conversations/{conv['id']}", headers=h).json()
        assert [m["content"] for m in loaded_conv["messages"]] == ["전화 <PHONE> 로 연락", "weights-two-0 weights-two-1 weights-two-2"]
        r = HTTP.post(f"{gw.url}/v1/feedback", headers=h, json={"request_id": rid, "rating": "up"})
        assert r.status_code == 200 and r.json()["version"] == "2"
        match = HTTP.post(f"{gw.url}/v1/arena", headers=h, timeout=30,
                          json={"messages": [{"role": "user", "content": "주문 화면"}], "models": ["champion", "previous"]})
        assert match.status_code == 200, match.text
        vote = HTTP.post(f"{gw.url}/v1/arena/{match.json()['id']}/vote", headers=h, json={"winner": "tie"})
        assert vote.status_code == 200 and vote.json()["winner"] == "tie"
        usage = HTTP.get(f"{gw.url}/admin/usage", headers=auth(admin)).json()["data"]
        assert {u["token_name"] for u in usage} == {"pg-user"} and len(usage) == 3  # the chat and both arena answers
        assert HTTP.get(f"{gw.url}/admin/usage.csv", headers=auth(admin)).text.count("pg-user") == 3
    assert db.revoke_token("pg-user") and db.check_token(user) is None
