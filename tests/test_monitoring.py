"""Prometheus on the service plan's KPIs (serving/monitoring.py, `make monitoring`): for every profile the scrape
configuration passes `promtool check config` and the rules pass `promtool test rules` (each alert fires just past its
threshold, read from the profile's gate.slo, and stays quiet inside it); a wrong threshold fails those tests; every
series the rules read is one the gateway exports; and a real Prometheus scraping a running gateway records the KPIs.
promtool and prometheus are Debian's `prometheus` package, installed by `make setup`."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving.monitoring import CONFIG, GATEWAY_TOKEN, RULES, SERVE_KEY, TESTS, rules, write, write_credentials
from workspace.config import load_config
from workspace.paths import ROOT

PROFILES = sorted(p.stem for p in (ROOT / "configs" / "profiles").glob("*.yaml"))


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("no promtool: `make setup` installs Debian's prometheus (sudo apt-get install -y prometheus)")
    return found


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("profile", PROFILES)
def test_the_scrape_config_and_the_alert_tests_pass_promtool_for_every_profile(profile, tmp_path):
    loaded = load_config(profile=profile)
    write(loaded, tmp_path, loaded.config.gate.slo)
    for name in (GATEWAY_TOKEN, SERVE_KEY):  # what make monitoring writes (the check reads them)
        (tmp_path / name).write_text("secret\n")
    checked = run("check", "config", CONFIG, cwd=tmp_path)
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout + checked.stderr, checked.stdout + checked.stderr
    tested = run("test", "rules", TESTS, cwd=tmp_path)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # every alert has at least one test that expects it to fire, and the thresholds are the profile's
    cases = yaml.safe_load((tmp_path / TESTS).read_text())["tests"]
    fired = {t["alert_rule_test"][0]["alertname"] for t in cases if t["alert_rule_test"][0]["exp_alerts"]}
    assert fired == {r["alert"] for r in rules(loaded.config.gate.slo)["groups"][1]["rules"]}
    text = (tmp_path / RULES).read_text()
    slo = loaded.config.gate.slo
    assert f"> {slo.ttft_p50_ms / 1000:g}" in text and f"> {slo.max_error_rate:g}" in text
    assert f"< {slo.availability:g}" in text


def test_a_tracking_server_is_scraped_and_a_local_store_is_not(tmp_path):
    """tracking.uri naming an MLflow server (run with --expose-prometheus, docs/team-service.md): a job `mlflow` on its
    host and port, credentials in the URL left out; promtool accepts it. A local store: no such job."""
    from serving.monitoring import scrape_config

    local = scrape_config(load_config(), tmp_path)
    assert "mlflow" not in {j["job_name"] for j in local["scrape_configs"]}
    loaded = load_config(overrides=["tracking.uri=https://team:secret@mlflow.internal:5443"])
    job = next(j for j in scrape_config(loaded, tmp_path)["scrape_configs"] if j["job_name"] == "mlflow")
    assert job["static_configs"] == [{"targets": ["mlflow.internal:5443"]}] and job["scheme"] == "https"
    assert "secret" not in yaml.safe_dump(job)
    write(loaded, tmp_path, loaded.config.gate.slo)
    for name in (GATEWAY_TOKEN, SERVE_KEY):
        (tmp_path / name).write_text("secret\n")
    checked = run("check", "config", CONFIG, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_wrong_threshold_fails_the_alert_tests(tmp_path):
    write(load_config(), tmp_path, load_config().config.gate.slo)
    rules_file = tmp_path / RULES
    doc = yaml.safe_load(rules_file.read_text())
    for rule in doc["groups"][1]["rules"]:  # every threshold ten times looser (TTFT, errors), or absent (availability)
        if rule["alert"] == "GatewayTTFTHigh":
            rule["expr"] = "gateway:ttft_seconds:p50_5m > 300"
        elif rule["alert"] == "GatewayErrorRateHigh":
            rule["expr"] = "gateway:error_5xx_ratio:rate5m > 0.5"
        elif rule["alert"] == "AvailabilityLow":
            rule["expr"] = "job:up:avg1h < 0.5"
    rules_file.write_text(yaml.safe_dump(doc))
    tested = run("test", "rules", TESTS, cwd=tmp_path)
    assert tested.returncode != 0
    for alert in ("GatewayTTFTHigh", "GatewayErrorRateHigh", "AvailabilityLow"):
        assert f"alertname: {alert}" in tested.stdout + tested.stderr, alert


@pytest.fixture()
def gateway(tmp_path):
    """The gateway (in front of a stand-in vLLM) with a champion, and an admin token written as make monitoring does."""
    from conftest import make_bundle
    from serving.gateway.app import create_app
    from serving.registry import promote
    from upstream_double import ServeApp, Upstream
    from workspace.processes import free_port
    from workspace.tracking import configure, stage_run

    port = free_port("127.0.0.1")
    loaded = load_config(overrides=[f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/a",
                                    "tracking.registered_model=mon-test", f"serving.gateway.port={port}",
                                    f"serving.gateway.database_url=sqlite:///{tmp_path}/gw.db"])
    configure(loaded)
    with stage_run(loaded, "promote") as r:
        promote("mon-test", r.info.run_id, make_bundle(tmp_path, "one"), {})
    folder = tmp_path / "monitoring"
    write_credentials(loaded, folder)
    with Upstream() as up, ServeApp(create_app(loaded, upstreams=[up.base_url]), port=port) as gw:
        yield loaded, gw, folder


def _chat(gw, token: str, n: int) -> None:
    for _ in range(n):
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, timeout=30,
                       json={"model": "champion", "stream": True, "max_tokens": 3,
                             "messages": [{"role": "user", "content": "회원 목록 화면"}]})
        assert r.status_code == 200


def test_every_series_the_rules_read_is_one_the_gateway_exports(gateway):
    loaded, gw, folder = gateway
    token = (folder / GATEWAY_TOKEN).read_text().strip()
    _chat(gw, token, 2)
    exposed = httpx.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    names = {line.split("{")[0].split(" ")[0] for line in exposed.splitlines() if line and not line.startswith("#")}
    for series in ("gateway_time_to_first_token_seconds_bucket", "gateway_requests_total", "gateway_inflight_requests"):
        assert series in names, series
        assert series in yaml.safe_dump(rules(loaded.config.gate.slo)), series  # and the rules read it


@contextlib.contextmanager
def prometheus(folder: Path, tmp_path: Path):
    """A real Prometheus on a loopback port with `folder`'s prometheus.yml at a 1 s scrape and rule interval, stopped
    (by its PID) after. Yields a PromQL query function: expr -> the result vector."""
    from workspace.processes import ManagedProcess, free_port

    conf = yaml.safe_load((folder / CONFIG).read_text())
    conf["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (folder / CONFIG).write_text(yaml.safe_dump(conf))
    port = free_port("127.0.0.1")
    prom = ManagedProcess([shutil.which("prometheus") or "prometheus", f"--config.file={folder / CONFIG}",
                           f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                          log_path=tmp_path / "prometheus.log", cwd=folder, what="Prometheus",
                          health_url=f"http://127.0.0.1:{port}/-/ready")
    prom.start(timeout=60)

    def query(expr: str) -> list:
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", r
        return r["data"]["result"]

    query.port = port
    try:
        yield query
    finally:
        prom.stop()
    assert not prom.running


def until(query, exprs: list[str], drive, timeout: float = 60) -> dict:
    """Drive traffic until every expression has a positive sample (or the time is up); expr -> its result."""
    deadline, seen = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and len(seen) < len(exprs):
        drive()
        time.sleep(1)
        for expr in exprs:
            result = query(expr)
            if result and float(result[0]["value"][1]) > 0:
                seen[expr] = result
    return seen


def target_health(query) -> dict:
    targets = httpx.get(f"http://127.0.0.1:{query.port}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    return {t["labels"]["job"]: t["health"] for t in targets}


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_gateway_and_records_the_kpis(gateway, tmp_path):
    """Prometheus scrapes the running gateway with the token make monitoring wrote; after a few requests its
    recording rules answer through Prometheus's HTTP API. (With a real vLLM too: tests/test_serve.py.)"""
    loaded, gw, folder = gateway
    write(loaded, folder, loaded.config.gate.slo)
    token = (folder / GATEWAY_TOKEN).read_text().strip()
    exprs = ['up{job="gateway"}', "gateway:requests_per_minute:rate5m", "gateway:ttft_seconds:p50_5m"]
    with prometheus(folder, tmp_path) as query:
        seen = until(query, exprs, lambda: _chat(gw, token, 2))
        assert set(seen) == set(exprs), (seen, (tmp_path / "prometheus.log").read_text()[-2000:])
        assert seen["gateway:ttft_seconds:p50_5m"][0]["metric"]["alias"] == "champion"
        health = target_health(query)
        assert health["gateway"] == "up" and health["vllm"] == "down"  # no vLLM here: TargetDown's input
