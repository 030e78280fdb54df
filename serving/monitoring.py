"""Prometheus for the service: a scrape configuration, recording rules and alerting rules on the service plan's
KPIs, with their thresholds the profile's SLOs (`gate.slo`, passed in by flows/monitoring.py), and unit tests for
every alert that `promtool test rules` runs (`make monitoring` writes them; tests/test_monitoring.py checks them
with promtool).

    scrape      the gateway's /metrics (an admin token from a file), each vLLM replica's /metrics (the serve key's
                file), Prometheus itself
    recording   gateway:ttft_seconds:p50_5m and :p95_5m per alias, gateway:requests_per_minute:rate5m,
                gateway:error_5xx_ratio:rate5m, job:up:avg1h (availability per job)
    alerts      GatewayTTFTHigh (p50 TTFT over gate.slo.ttft_p50_ms for 10 min), GatewayErrorRateHigh (5xx share
                over gate.slo.max_error_rate for 5 min), GatewayThroughputLow (under gate.slo.min_requests_per_min
                while gate.slo.concurrency or more requests are in flight, for 10 min), TargetDown (a scrape target
                down for 2 min), AvailabilityLow (a job's last hour under gate.slo.availability)

The gateway's latency histograms and request counters are the KPIs' source (what a client sees, through every
replica); vLLM's own series are scraped beside them for diagnosis. Written here rather than as static files: the
thresholds are the profile's, and the unit tests' series are built around them (just over and just under each
threshold), so a profile with other SLOs gets rules and tests of its own.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from serving.gateway import LATENCY_BUCKETS
from workspace.config.load import LoadedConfig
from workspace.config.serving import SloConfig

RULES, TESTS, CONFIG = "rules.yml", "rules_test.yml", "prometheus.yml"
GATEWAY_TOKEN, SERVE_KEY = "gateway_token", "serve_key"  # credential files beside prometheus.yml (0600)


def _fmt(x: float) -> str:
    return f"{x:g}"


def rules(slo: SloConfig) -> dict:
    ttft_s = slo.ttft_p50_ms / 1000
    recording = [
        *({"record": f"gateway:ttft_seconds:p{q}_5m",
           "expr": f"histogram_quantile(0.{q}, sum by (alias, le) (rate(gateway_time_to_first_token_seconds_bucket[5m])))"}
          for q in (50, 95)),
        {"record": "gateway:requests_per_minute:rate5m", "expr": "sum(rate(gateway_requests_total[5m])) * 60"},
        {"record": "gateway:error_5xx_ratio:rate5m",
         "expr": 'sum(rate(gateway_requests_total{status=~"5.."}[5m])) / sum(rate(gateway_requests_total[5m]))'},
        {"record": "job:up:avg1h", "expr": "avg by (job) (avg_over_time(up[1h]))"},
    ]
    alerts = [
        {"alert": "GatewayTTFTHigh", "expr": f"gateway:ttft_seconds:p50_5m > {_fmt(ttft_s)}", "for": "10m",
         "labels": {"severity": "warning"},
         "annotations": {"summary": f"time to first token p50 over {_fmt(ttft_s)} s (gate.slo.ttft_p50_ms)"}},
        {"alert": "GatewayErrorRateHigh", "expr": f"gateway:error_5xx_ratio:rate5m > {_fmt(slo.max_error_rate)}",
         "for": "5m", "labels": {"severity": "critical"},
         "annotations": {"summary": f"over {_fmt(slo.max_error_rate * 100)}% of requests answered 5xx "
                                    "(gate.slo.max_error_rate)"}},
        {"alert": "GatewayThroughputLow",
         "expr": (f"gateway:requests_per_minute:rate5m < {_fmt(slo.min_requests_per_min)} "
                  f"and on() sum(gateway_inflight_requests) >= {slo.concurrency}"),
         "for": "10m", "labels": {"severity": "warning"},
         "annotations": {"summary": f"under {_fmt(slo.min_requests_per_min)} requests/min with {slo.concurrency} or "
                                    "more in flight (gate.slo.min_requests_per_min, gate.slo.concurrency)"}},
        {"alert": "TargetDown", "expr": "up == 0", "for": "2m", "labels": {"severity": "critical"},
         "annotations": {"summary": "a scrape target is down (gateway, a vLLM replica, the MLflow server or "
                                                   "Prometheus)"}},
        {"alert": "AvailabilityLow", "expr": f"job:up:avg1h < {_fmt(slo.availability)}", "labels": {"severity": "critical"},
         "annotations": {"summary": f"a job was up less than {_fmt(slo.availability * 100)}% of the last hour "
                                    "(gate.slo.availability)"}},
    ]
    return {"groups": [{"name": "llmops-recording", "rules": recording}, {"name": "llmops-alerts", "rules": alerts}]}


def scrape_config(loaded: LoadedConfig, folder: Path) -> dict:
    cfg = loaded.config.serving
    gw = cfg.gateway
    vllm = [f"{cfg.host}:{cfg.port + i}" for i in range(cfg.replicas)]

    def bearer(name: str) -> dict:
        return {"authorization": {"type": "Bearer", "credentials_file": str(folder / name)}}

    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": [RULES],
        "scrape_configs": [
            {"job_name": "gateway", "metrics_path": "/metrics", **bearer(GATEWAY_TOKEN),
             "static_configs": [{"targets": [f"{gw.host}:{gw.port}"]}]},
            {"job_name": "vllm", "metrics_path": "/metrics", **bearer(SERVE_KEY),
             "static_configs": [{"targets": vllm}]},
            {"job_name": "prometheus", "static_configs": [{"targets": ["127.0.0.1:9090"]}]},
            *_mlflow_job(loaded.config.tracking.uri),
        ],
    }


def _mlflow_job(uri: str) -> list[dict]:
    """A scrape job for the MLflow tracking server when tracking.uri names one (http/https): the server exposes
    /metrics when it runs with `--expose-prometheus DIR` (docs/team-service.md's command). A local store: none."""
    from urllib.parse import urlparse

    u = urlparse(uri)
    if u.scheme not in ("http", "https") or not u.hostname:
        return []
    port = u.port or (443 if u.scheme == "https" else 80)
    return [{"job_name": "mlflow", "metrics_path": "/metrics", "scheme": u.scheme,
             "static_configs": [{"targets": [f"{u.hostname}:{port}"]}]}]


def _bucket_series(alias: str, low: float, high: float, per_min: int, minutes: int) -> list[dict]:
    """A TTFT histogram whose every observation falls in (low, high]: its p50 is (low + high) / 2."""
    out = []
    for le in [*LATENCY_BUCKETS, math.inf]:
        grows = le >= high
        out.append({"series": f'gateway_time_to_first_token_seconds_bucket{{alias="{alias}",le="{"+Inf" if le == math.inf else _fmt(le)}"}}',
                    "values": f"0+{per_min if grows else 0}x{minutes}"})
    return out


def unit_tests(slo: SloConfig) -> dict:
    """promtool's tests: every alert fires on series just past its threshold and stays quiet just inside it."""
    ttft_s = slo.ttft_p50_ms / 1000
    bounds = [0.0, *LATENCY_BUCKETS]
    # a bucket wholly above the threshold (p50 = its middle > threshold) and one wholly at or under it
    above = next(((lo, hi) for lo, hi in zip(bounds, bounds[1:]) if lo >= ttft_s), None)
    below = next(((lo, hi) for lo, hi in reversed(list(zip(bounds, bounds[1:]))) if hi <= ttft_s), None)
    alerts = {r["alert"]: r for r in rules(slo)["groups"][1]["rules"]}
    tests = []

    def case(name: str, series: list[dict], alert: str, fires: bool, eval_time: str, labels: dict):
        exp = ([{"exp_labels": {**alerts[alert]["labels"], **labels}, "exp_annotations": alerts[alert]["annotations"]}]
               if fires else [])
        tests.append({"name": name, "interval": "1m", "input_series": series,
                      "alert_rule_test": [{"eval_time": eval_time, "alertname": alert, "exp_alerts": exp}]})

    if above:
        case("TTFT p50 over the SLO fires", _bucket_series("champion", *above, 60, 30), "GatewayTTFTHigh", True, "25m",
             {"alias": "champion"})
    if below:
        case("TTFT p50 under the SLO is quiet", _bucket_series("champion", *below, 60, 30), "GatewayTTFTHigh", False,
             "25m", {})
    total = 1000  # requests per minute
    bad = max(1, math.ceil(total * slo.max_error_rate * 2))
    for errors, fires in ((bad, True), (math.floor(total * slo.max_error_rate / 2), False)):
        case(f"{errors} 5xx in {total} requests/min {'fires' if fires else 'is quiet'}",
             [{"series": 'gateway_requests_total{alias="champion",status="200"}', "values": f"0+{total - errors}x30"},
              {"series": 'gateway_requests_total{alias="champion",status="503"}', "values": f"0+{errors}x30"}],
             "GatewayErrorRateHigh", fires, "20m", {})
    slow = max(0, math.floor(slo.min_requests_per_min / 2))
    for inflight, fires in ((slo.concurrency, True), (max(0, slo.concurrency - 1), False)):
        if slo.min_requests_per_min <= 0:
            break
        case(f"{slow} requests/min with {inflight} in flight {'fires' if fires else 'is quiet'}",
             [{"series": 'gateway_requests_total{alias="champion",status="200"}', "values": f"0+{slow}x40"},
              {"series": 'gateway_inflight_requests{replica="http://127.0.0.1:8000/v1"}', "values": f"{inflight}x40"}],
             "GatewayThroughputLow", fires, "30m", {})
    case("a replica down for 3 minutes fires", [{"series": 'up{job="vllm",instance="127.0.0.1:8000"}', "values": "1x5 0x5"}],
         "TargetDown", True, "9m", {"job": "vllm", "instance": "127.0.0.1:8000"})
    case("a replica down for 1 minute is quiet", [{"series": 'up{job="vllm",instance="127.0.0.1:8000"}', "values": "1x5 0x1 1x5"}],
         "TargetDown", False, "7m", {})
    # an hour with 6 minutes down (90% up) against the availability objective; a whole hour up stays quiet
    case("an hour 90% up fires", [{"series": 'up{job="gateway",instance="127.0.0.1:8080"}', "values": "1x53 0x6"}],
         "AvailabilityLow", slo.availability > 0.9, "59m", {"job": "gateway"})
    case("an hour up is quiet", [{"series": 'up{job="gateway",instance="127.0.0.1:8080"}', "values": "1x60"}],
         "AvailabilityLow", False, "59m", {})
    return {"rule_files": [RULES], "evaluation_interval": "1m", "tests": tests}


def write(loaded: LoadedConfig, folder: Path, slo: SloConfig) -> list[Path]:
    """prometheus.yml, rules.yml and rules_test.yml into `folder` (each written whole: a temp file, then renamed).
    `slo`: the objectives the alerts watch (gate.slo, which the flow passes: the ones the gate measured)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, doc in ((CONFIG, scrape_config(loaded, folder)), (RULES, rules(slo)), (TESTS, unit_tests(slo))):
        path = folder / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
        tmp.replace(path)
        out.append(path)
    return out


def _secret(path: Path, value: str) -> None:
    """`value` into `path`, 0600 from the start (a temp name, then renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    tmp.replace(path)


def write_credentials(loaded: LoadedConfig, folder: Path, token_name: str = "prometheus") -> None:
    """The files the scrape jobs read: a fresh admin token of the gateway (`token_name`; an older one of that name is
    revoked first) and the key vLLM checks (serving.api_key_env's value, or the workspace's own serve key)."""
    from serving.gateway import GatewayDb, database_url
    from serving.serve import SERVE_KEY_FILE
    from workspace.endpoint import INTERNAL_KEY_ENV, internal_key_overrides

    folder.mkdir(parents=True, exist_ok=True)
    db = GatewayDb(database_url(loaded))
    db.revoke_token(token_name)
    _secret(folder / GATEWAY_TOKEN, db.create_token(token_name, "admin"))
    env = loaded.config.serving.api_key_env
    internal_key_overrides(env, SERVE_KEY_FILE)  # the workspace's key, created once when none is configured
    key = os.environ.get(env or INTERNAL_KEY_ENV, "")
    if not key:
        raise ValueError(f"serving.api_key_env names {env}, which is not set in this environment: export it first")
    _secret(folder / SERVE_KEY, key)
