"""The vLLM serving configuration and the hardware fit check.

`render_vllm_config` writes what `vllm serve --config file.yaml` reads (long flag names as keys); `fit_report`
tells before launch whether weights + KV cache fit the profile's GPUs:
    weights  = parameters x bytes per parameter (dtype, or the quantisation's bits)
    KV/token = 2 x layers x kv_heads x head_dim x bytes per KV element (fp8 KV cache: 1 byte)
    KV       = KV/token x max_model_len x max_num_seqs
    need per GPU = (weights + KV) / tensor_parallel_size + runtime overhead
    budget per GPU = gpu_memory_gib x gpu_memory_utilization
A config that does not fit is refused with the numbers and a suggestion. Called by serving/promote_stage.py and by
tests/test_serving_config.py; `validate_with_vllm` runs vLLM's own argument parser in the serve environment.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from workspace.config.serving import ServingConfig
from workspace.model_spec import BYTES, KNOWN_MODELS, FitError, ModelSpec, model_spec, spec_from_folder  # noqa: F401
from workspace.envrunner import EnvCommandError, EnvMissingError, run_in_env

QUANT_BYTES = {"awq": 0.5, "gptq": 0.5, "bitsandbytes": 0.5, "fp8": 1.0}

GIB = 1024 ** 3
OVERHEAD_GIB = 1.5  # CUDA context, activations, sampler buffers: a conservative per-GPU allowance


@dataclass
class FitReport:
    fits: bool
    weights_gib: float
    kv_gib: float
    need_per_gpu_gib: float
    budget_per_gpu_gib: float
    arithmetic: list[str]
    suggestion: str

    def text(self) -> str:
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return "\n".join([f"fit check: {verdict}", *[f"  {line}" for line in self.arithmetic]] +
                         ([f"  suggestion: {self.suggestion}"] if self.suggestion else []))


def fit_report(spec: ModelSpec, cfg: ServingConfig) -> FitReport:
    if cfg.engine == "vllm-cpu" or cfg.gpus == 0:
        kv_budget = float(cfg.cpu_kvcache_space_gib)
        kv_token = 2 * spec.layers * spec.kv_heads * spec.head_dim * (1 if cfg.kv_cache_dtype.startswith("fp8") else 2)
        kv = kv_token * cfg.max_model_len * cfg.max_num_seqs / GIB
        lines = [f"CPU: KV/token = 2 x {spec.layers} x {spec.kv_heads} x {spec.head_dim} x 2 B = {kv_token:,} B",
                 f"KV = {kv_token:,} B x {cfg.max_model_len} x {cfg.max_num_seqs} seqs = {kv:.3f} GiB "
                 f"<= VLLM_CPU_KVCACHE_SPACE {kv_budget} GiB"]
        ok = kv <= kv_budget
        return FitReport(ok, spec.params_b * 1e9 * 2 / GIB, kv, kv, kv_budget, lines,
                         "" if ok else "raise serving.cpu_kvcache_space_gib or lower max_model_len / max_num_seqs")
    w_bytes = QUANT_BYTES[cfg.quantization] if cfg.quantization else BYTES[cfg.dtype]
    kv_bytes = 1 if cfg.kv_cache_dtype.startswith("fp8") else BYTES[cfg.dtype]
    weights = spec.params_b * 1e9 * w_bytes / GIB
    kv_token = 2 * spec.layers * spec.kv_heads * spec.head_dim * kv_bytes
    kv = kv_token * cfg.max_model_len * cfg.max_num_seqs / GIB
    tp = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    need = (weights + kv) / tp + OVERHEAD_GIB
    budget = cfg.gpu_memory_gib * cfg.gpu_memory_utilization
    lines = [
        f"weights = {spec.params_b}B params x {w_bytes} B ({cfg.quantization or cfg.dtype}) = {weights:.2f} GiB",
        f"KV/token = 2 x {spec.layers} layers x {spec.kv_heads} kv_heads x {spec.head_dim} head_dim x {kv_bytes} B = {kv_token:,.0f} B",
        f"KV = {kv_token:,.0f} B x {cfg.max_model_len} max_model_len x {cfg.max_num_seqs} max_num_seqs = {kv:.2f} GiB",
        f"need per GPU = ({weights:.2f} + {kv:.2f}) / {tp} + {OVERHEAD_GIB} overhead = {need:.2f} GiB",
        f"budget per GPU = {cfg.gpu_memory_gib} GiB x {cfg.gpu_memory_utilization} = {budget:.2f} GiB",
    ]
    if cfg.gpus < tp:
        lines.append(f"tensor x pipeline parallel = {tp} > {cfg.gpus} GPUs")
    ok = need <= budget and cfg.gpus >= tp
    suggestion = ""
    if not ok:
        tips = []
        if weights / tp > budget * 0.6:
            tips.append("quantised weights (serving.quantization: awq/gptq)" if not cfg.quantization else "more tensor parallelism")
            if cfg.gpus > tp:
                tips.append(f"tensor_parallel_size up to {cfg.gpus}")
        if kv / tp > budget * 0.2:
            tips.append("a shorter max_model_len or fewer max_num_seqs")
            if not cfg.kv_cache_dtype.startswith("fp8"):
                tips.append("kv_cache_dtype: fp8 (halves the KV cache)")
        suggestion = "; ".join(tips) or "a larger GPU"
    return FitReport(ok, weights, kv, need, budget, lines, suggestion)


def render_vllm_config(cfg: ServingConfig, model: str, *, lora_modules: Optional[dict[str, str]] = None,
                       max_lora_rank: int = 64) -> dict:
    out: dict = {
        "model": model,
        "served-model-name": cfg.served_model_name,
        "host": cfg.host,
        "port": cfg.port,
        "dtype": cfg.dtype,
        "max-model-len": cfg.max_model_len,
        "max-num-seqs": cfg.max_num_seqs,
        "tensor-parallel-size": cfg.tensor_parallel_size,
        "pipeline-parallel-size": cfg.pipeline_parallel_size,
        "enable-prefix-caching": cfg.enable_prefix_caching,
        "kv-cache-dtype": cfg.kv_cache_dtype,
        "seed": 0,
    }
    if cfg.engine == "vllm":
        out["gpu-memory-utilization"] = cfg.gpu_memory_utilization
    if cfg.quantization:
        out["quantization"] = cfg.quantization
    if cfg.decoding.penalties():  # the defaults every request gets unless it sets them; evaluated with the same
        out["override-generation-config"] = cfg.decoding.penalties()  # (stop strings: the gateway adds them)
    if lora_modules:
        if cfg.served_model_name in lora_modules:  # vLLM refuses an adapter named like the base model
            out["served-model-name"] = f"{cfg.served_model_name}-base"
        rank = max(max_lora_rank, 8)
        out.update({"enable-lora": True, "max-lora-rank": 1 << (rank - 1).bit_length(),
                    "lora-modules": [f"{n}={p}" for n, p in lora_modules.items()]})
    # the API key itself never goes into the file: `vllm serve` reads VLLM_API_KEY from the environment
    return out


def write_vllm_config(cfg: dict, path: Path, api_key_env: Optional[str]) -> Path:
    header = ["# vllm serve --config " + path.name + "   (rendered by the workspace from the serving profile)"]
    if api_key_env:
        header.append(f"# API key: export VLLM_API_KEY=\"${api_key_env}\" before starting (never stored in this file)")
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def validate_with_vllm(*paths: Path) -> None:
    """Parse the files with vLLM's own `vllm serve` argument parser in the serve env. Raises FitError."""
    path = ", ".join(str(p) for p in paths)
    try:
        run_in_env("serve", ["python", "-m", "serving.validate_vllm_config", *map(str, paths)], timeout=300, echo=False,
                   what="vLLM argument parser")
    except EnvMissingError as exc:  # not the file's fault: say what is missing, not that the parser refused it
        raise FitError(f"{path} could not be checked by vLLM's argument parser: {exc}") from exc
    except EnvCommandError as exc:
        reason = next((l for l in reversed(exc.tail) if "error" in l.lower() or "invalid" in l.lower()), exc.tail[-1] if exc.tail else "")
        raise FitError(f"{path} is rejected by vLLM's argument parser: {reason.strip()}") from exc
