"""Serving load benchmark: `vllm bench serve` (the serve environment's maintained load tool) drives streamed chat
completions against an OpenAI-compatible endpoint, step by step (concurrency x prompt length), and the results
are read back from its JSON. The same workload goes to the champion on vLLM and to a baseline serving the same
weights with plain transformers (`transformers serve`, the adapter merged onto the base), alternating the two
servers step by step. vLLM's own Prometheus series (/metrics) are scraped around every step and cross-checked
against the client's numbers. Also: the brief SLO benchmark `make promote` runs when `gate.slo.required`.

The workload is a custom dataset (not `random`: `vllm bench serve` forces `ignore_eos` for random prompts and
`transformers serve` rejects that field): screen-XML requests from the held-out split, padded with passages of the
RAG corpus to the step's prompt length (counted with the model's tokenizer, chat template included).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import httpx

from workspace.endpoint import Endpoint
from workspace.envrunner import EnvCommandError, env_command, run_in_env
from workspace.processes import ManagedProcess

TEMPLATE_MARGIN = 24  # chat-template tokens around the user message (chatml: about 10), kept free


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- workload
def build_prompts(tokenizer_path: str, requests: list[str], passages: list[str], prompt_tokens: int, n: int,
                  seed: int = 0) -> tuple[list[str], list[int]]:
    """n user messages of about `prompt_tokens` tokens each (chat template excluded): a request, preceded by
    enough passages. Returns the messages and their token counts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if not requests:
        raise BenchError("no requests to build the benchmark prompts from")
    out, lengths = [], []
    for i in range(n):
        req = requests[(seed + i) % len(requests)]
        ids = tok(req, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            text = tok.decode(ids[-prompt_tokens:])
        else:
            ctx: list[int] = []
            j = seed + i
            while len(ctx) + len(ids) < prompt_tokens and passages:
                ctx += tok("참고: " + passages[j % len(passages)] + "\n", add_special_tokens=False)["input_ids"]
                j += 1
            ctx = ctx[: max(0, prompt_tokens - len(ids) - 1)]
            text = tok.decode(ctx) + "\n" + req
        out.append(text)
        lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))
    return out, lengths


def write_dataset(path: Path, prompts: list[str], output_tokens: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for p in prompts:
            fh.write(json.dumps({"prompt": p, "output_tokens": output_tokens}, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------------------- prometheus
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfa]+)')


def scrape(metrics_url: str, api_key: Optional[str] = None) -> dict[str, float]:
    """Prometheus text -> {series name: value summed over label sets}; {} when the endpoint has no /metrics.
    With a key, /metrics is behind it like the API (workspace/vllm_auth.py)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(metrics_url, timeout=10, headers=headers)
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                pass
    return out


def server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What vLLM itself counted during a step: requests finished, mean TTFT, mean end-to-end latency."""
    if not before or not after:
        return {}

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    out = {"requests": delta("vllm:request_success_total")}
    n = delta("vllm:time_to_first_token_seconds_count")
    if n > 0:
        out["ttft_mean_ms"] = 1000 * delta("vllm:time_to_first_token_seconds_sum") / n
        out["ttft_count"] = n
    n = delta("vllm:e2e_request_latency_seconds_count")
    if n > 0:
        out["e2el_mean_ms"] = 1000 * delta("vllm:e2e_request_latency_seconds_sum") / n
    return out


# ------------------------------------------------------------------------------------------------ a step
@dataclass
class StepResult:
    server: str
    concurrency: int
    prompt_tokens: int  # the step's target
    requests: int
    completed: int = 0
    failed: int = 0
    duration_s: float = 0.0
    mean_input_tokens: float = 0.0
    ttft_p50_ms: float = math.nan
    ttft_p95_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    ttft_mean_ms: float = math.nan
    tpot_p50_ms: float = math.nan
    e2el_p50_ms: float = math.nan
    e2el_p95_ms: float = math.nan
    output_tokens_per_s: float = 0.0
    requests_per_min: float = 0.0
    error_rate: float = 1.0
    server_side: dict = field(default_factory=dict)
    cross_check: str = ""  # "" ok / not applicable; else what disagrees by more than 10%

    @property
    def step(self) -> str:
        return f"c{self.concurrency}_p{self.prompt_tokens}"

    def metrics(self) -> dict[str, float]:
        keys = ("ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "tpot_p50_ms", "e2el_p50_ms", "e2el_p95_ms",
                "output_tokens_per_s", "requests_per_min", "error_rate")
        return {k: float(getattr(self, k)) for k in keys if not math.isnan(float(getattr(self, k)))}


def run_step(*, server: str, endpoint: Endpoint, tokenizer: str, dataset: Path, concurrency: int,
             prompt_tokens: int, requests: int, output_tokens: int, out_dir: Path, timeout: float,
             metrics_url: Optional[str] = None) -> StepResult:
    """One `vllm bench serve` run (streamed chat completions, all requests queued at once, `concurrency` in flight)
    against `endpoint` (its model; its key, which `vllm bench serve` sends from $OPENAI_API_KEY)."""
    base_url, model = endpoint.base_url, endpoint.model
    res = StepResult(server, concurrency, prompt_tokens, requests)
    name = f"{server}-{res.step}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    key = endpoint.api_key if endpoint is not None else None
    before = scrape(metrics_url, key) if metrics_url else {}
    argv = ["python", "-m", "workspace.vllm_launcher", "bench", "serve", "--backend", "openai-chat",
            "--base-url", base_url.removesuffix("/v1"), "--endpoint", "/v1/chat/completions", "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "custom", "--dataset-path", str(dataset),
            "--custom-output-len", str(output_tokens), "--num-prompts", str(requests),
            "--max-concurrency", str(concurrency), "--request-rate", "inf", "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,95,99",
            "--save-result", "--result-dir", str(out_dir), "--result-filename", name, "--disable-tqdm", "--seed", "0"]
    try:
        run_in_env("serve", argv, timeout=timeout, echo=False, what=f"vllm bench serve ({server}, {res.step})",
                   log_path=out_dir / f"{server}-{res.step}.log", extra_env=endpoint.bench_env())
    except EnvCommandError as exc:
        raise BenchError(f"the load tool failed on {server} at {res.step}: {exc}") from exc
    data = json.loads((out_dir / name).read_text())
    res.completed = int(data.get("completed", 0))
    res.failed = int(data.get("failed", requests - res.completed))
    res.duration_s = float(data.get("duration", 0.0))
    res.mean_input_tokens = data["total_input_tokens"] / res.completed if res.completed else 0.0
    for ours, theirs in (("ttft_p50_ms", "p50_ttft_ms"), ("ttft_p95_ms", "p95_ttft_ms"), ("ttft_p99_ms", "p99_ttft_ms"),
                         ("ttft_mean_ms", "mean_ttft_ms"), ("tpot_p50_ms", "p50_tpot_ms"), ("e2el_p50_ms", "p50_e2el_ms"),
                         ("e2el_p95_ms", "p95_e2el_ms")):
        if data.get(theirs) is not None and res.completed:
            setattr(res, ours, float(data[theirs]))
    res.output_tokens_per_s = float(data.get("output_throughput", 0.0))
    res.requests_per_min = 60.0 * res.completed / res.duration_s if res.duration_s else 0.0
    res.error_rate = (requests - res.completed) / requests if requests else 1.0
    if metrics_url:
        res.server_side = server_side(before, scrape(metrics_url, key))
        res.cross_check = cross_check(res)
    return res


def cross_check(res: StepResult, tolerance: float = 0.10) -> str:
    """Client-side vs vLLM-reported: request count and mean TTFT; a difference beyond `tolerance` is named."""
    s = res.server_side
    if not s:
        return "no /metrics"
    problems = []
    if abs(s.get("requests", 0) - res.completed) > tolerance * max(res.completed, 1):
        problems.append(f"requests: client {res.completed}, vLLM {s.get('requests', 0):.0f}")
    if "ttft_mean_ms" in s and not math.isnan(res.ttft_mean_ms) and res.ttft_mean_ms > 0:
        diff = abs(s["ttft_mean_ms"] - res.ttft_mean_ms) / res.ttft_mean_ms
        if diff > tolerance:
            problems.append(f"TTFT mean: client {res.ttft_mean_ms:.1f} ms, vLLM {s['ttft_mean_ms']:.1f} ms ({diff:.0%})")
    return "; ".join(problems)


# -------------------------------------------------------------------------------------------- baseline
class TransformersServer(ManagedProcess):
    """`transformers serve <model>` from the serve environment on 127.0.0.1 (OpenAI chat with SSE; no /metrics)."""

    what = "transformers serve"
    stop_grace = 15.0

    def __init__(self, model_dir: str, port: int, log_path: Path, *, device: str, dtype: str, host: str = "127.0.0.1"):
        """device/dtype: the served engine's (workspace.device.serving_device(serving.engine), serving.dtype), so the
        baseline runs on the same hardware as vLLM."""
        self.model_dir, self.port, self.host, self.device, self.dtype = model_dir, port, host, device, dtype
        super().__init__(log_path=log_path, health_url=f"http://{host}:{port}/health")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def endpoint(self) -> Endpoint:
        return Endpoint(self.base_url, self.model_dir)

    def command(self) -> tuple[list[str], dict[str, str]]:
        return env_command("serve", ["transformers", "serve", self.model_dir, "--host", self.host, "--port",
                                     str(self.port), "--device", self.device, "--dtype", self.dtype],
                           extra_env={"TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"})


MERGE_DTYPE = "float32"
MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, adapter, out, dtype = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
"""


def merged_model(base: str, adapter: Optional[str], out: Path) -> str:
    """The base with the adapter merged in (train env: peft), for servers without LoRA support. Cached by path."""
    if not adapter:
        return base
    if (out / "config.json").exists():
        return str(out)
    tmp = out.with_name(out.name + ".tmp")
    # merged in full precision (rounding the sum W + BA once, at serving time), on the CPU: a one-off
    run_in_env("train", ["python", "-c", MERGE, base, adapter, str(tmp), MERGE_DTYPE], timeout=600, echo=False,
               what="merging the adapter for the baseline server")
    tmp.rename(out)
    return str(out)


# --------------------------------------------------------------------------------------------------- SLO
def slo_rules(res: StepResult, slo) -> list[dict]:
    """The service plan's KPIs against a brief benchmark step: rows for the gate table."""
    rows = [
        {"name": "slo-ttft-p50", "metric": f"serve/{res.step}/ttft_p50_ms", "value": res.ttft_p50_ms,
         "threshold": slo.ttft_p50_ms, "passed": (not math.isnan(res.ttft_p50_ms)) and res.ttft_p50_ms < slo.ttft_p50_ms,
         "detail": f"TTFT p50 must be < {slo.ttft_p50_ms:.0f} ms at {res.mean_input_tokens:.0f} prompt tokens"},
        {"name": "slo-requests-per-min", "metric": f"serve/{res.step}/requests_per_min", "value": res.requests_per_min,
         "threshold": slo.min_requests_per_min, "passed": res.requests_per_min >= slo.min_requests_per_min,
         "detail": f">= {slo.min_requests_per_min:.0f} requests/min with {res.concurrency} concurrent sessions"},
        {"name": "slo-error-rate", "metric": f"serve/{res.step}/error_rate", "value": res.error_rate,
         "threshold": slo.max_error_rate, "passed": res.error_rate <= slo.max_error_rate,
         "detail": f"{res.requests - res.completed} of {res.requests} requests failed (allowed {slo.max_error_rate:.0%})"},
    ]
    return rows


def as_dict(res: StepResult) -> dict:
    d = asdict(res)
    d["step"] = res.step
    return d


# ------------------------------------------------------------------------------------------------ plots
def plot(results: list[StepResult], path: Path) -> Optional[Path]:
    """TTFT percentiles and output tokens/s against concurrency, one line per server and prompt length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    groups: dict[tuple[str, int], list[StepResult]] = {}
    for r in results:
        groups.setdefault((r.server, r.prompt_tokens), []).append(r)
    for (server, plen), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.concurrency)
        xs = [r.concurrency for r in rs]
        style = "-" if server == "vllm" else "--"
        axes[0].plot(xs, [r.ttft_p50_ms for r in rs], style, marker="o", label=f"{server} {plen} tok p50")
        axes[0].plot(xs, [r.ttft_p99_ms for r in rs], style, marker="x", alpha=0.5, label=f"{server} {plen} tok p99")
        axes[1].plot(xs, [r.output_tokens_per_s for r in rs], style, marker="o", label=f"{server} {plen} tok")
        axes[2].plot(xs, [r.e2el_p50_ms for r in rs], style, marker="o", label=f"{server} {plen} tok")
    for ax, title in zip(axes, ("TTFT (ms), p50 and p99", "output tokens/s", "end-to-end latency p50 (ms)")):
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- entry points
def workload_texts(test_source: Optional[Path], corpus: Optional[Path]) -> tuple[list[str], list[str]]:
    """Requests (user turns of the held-out screen requests) and padding passages (the RAG corpus texts)."""
    requests, passages = [], []
    if test_source and test_source.exists():
        for line in test_source.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if "messages" in row:
                    text = next((m["content"] for m in row["messages"] if m.get("role") == "user"), "")
                else:
                    text = " ".join(filter(None, [row.get("instruction", ""), row.get("input", "")]))
                if text:
                    requests.append(text)
    if corpus and corpus.exists() and corpus.is_file():
        for line in corpus.read_text(encoding="utf-8").splitlines():
            if line.strip():
                passages.append(json.loads(line).get("text", ""))
    if not requests:
        requests = ["회원 목록 화면을 생성해주세요. 필드: 이름, 이메일, 가입일"]
    return requests, [p for p in passages if p] or ["사내 시스템 운영 안내 문서입니다."]


def clamp_prompt(prompt_tokens: int, output_tokens: int, max_model_len: int) -> int:
    """The longest prompt that fits the served context with the output (a '2k' step on a 2,048-token model)."""
    return max(16, min(prompt_tokens, max_model_len - output_tokens - TEMPLATE_MARGIN))


def slo_benchmark(serving_cfg, slo, base: str, adapter: Optional[str], lora_rank: int, texts: tuple[list[str], list[str]],
                  work: Path) -> StepResult:
    """Serve the candidate (base + adapter as a LoRA module, the serving profile's settings) on a free port and
    run the brief SLO step: `slo.requests` requests, `slo.concurrency` in flight, prompts of `slo.prompt_tokens`."""
    from workspace.vllm_server import VllmServer, free_port

    name = serving_cfg.served_model_name
    server = VllmServer(base, serving_cfg, lora_modules={name: adapter} if adapter else None, max_lora_rank=lora_rank,
                        port=free_port(serving_cfg.host), log_path=work / "vllm-slo.log",
                        served_model_name=f"{name}-base" if adapter else name)  # as promoted: the LoRA has the name
    plen = clamp_prompt(slo.prompt_tokens, slo.output_tokens, serving_cfg.max_model_len)
    prompts, _ = build_prompts(base, texts[0], texts[1], plen, slo.requests)
    dataset = write_dataset(work / f"slo-p{plen}.jsonl", prompts, slo.output_tokens)
    server.start()
    try:
        return run_step(server="vllm", endpoint=server.endpoint(name if adapter else server.served_model_name),
                        tokenizer=base, dataset=dataset, concurrency=slo.concurrency, prompt_tokens=plen,
                        requests=slo.requests, output_tokens=slo.output_tokens, out_dir=work, timeout=600,
                        metrics_url=f"http://{server.host}:{server.port}/metrics")
    finally:
        server.stop()
