"""A model's shape for the fit checks (serving: weights + KV cache; training: weights + LoRA states + activations).

Read from a local folder's config.json and safetensors sizes, or, for hub ids that cannot be read offline, from
KNOWN_MODELS (copied from each model's config.json on the hub). Used by serving/config.py and finetune/fit.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class FitError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    params_b: float  # billions of parameters
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int = 0  # hidden size; 0 where unknown (the training fit check needs it)
    intermediate: int = 0  # MLP width
    vocab: int = 0
    heads: int = 0  # attention heads (query)
    tied_embeddings: bool = False

    @property
    def embedding_params(self) -> float:
        """Input embedding + output head parameters (bitsandbytes leaves both in 16-bit)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)


# From each model's config.json on the hub (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, vocab_size, tie_word_embeddings).
KNOWN_MODELS = {
    "Qwen/Qwen2.5-7B-Instruct": ModelSpec(7.62, 28, 4, 128, 3584, 18944, 152064, 28, False),
    "Qwen/Qwen2.5-14B-Instruct": ModelSpec(14.7, 48, 8, 128, 5120, 13824, 152064, 40, False),
    "Qwen/Qwen2.5-32B-Instruct": ModelSpec(32.8, 64, 8, 128, 5120, 27648, 152064, 40, False),
    "Qwen/Qwen2.5-32B-Instruct-AWQ": ModelSpec(32.8, 64, 8, 128, 5120, 27648, 152064, 40, False),
    "google/gemma-3-12b-it": ModelSpec(12.2, 48, 8, 256, 3840, 15360, 262208, 16, True),
    "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct": ModelSpec(7.8, 32, 8, 128, 4096, 14336, 102400, 32, False),
}
BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "auto": 2.0}


def spec_from_folder(path: Path) -> ModelSpec:
    cfg = json.loads((path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    n_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    dtype_bytes = BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), 4.0)
    return ModelSpec(n_bytes / dtype_bytes / 1e9, cfg["num_hidden_layers"], cfg.get("num_key_value_heads", heads),
                     head_dim, cfg["hidden_size"], cfg.get("intermediate_size", 4 * cfg["hidden_size"]),
                     cfg.get("vocab_size", 0), heads, bool(cfg.get("tie_word_embeddings", False)))


def model_spec(model: str, root: Optional[Path] = None) -> ModelSpec:
    p = Path(model)
    if root is not None and not p.is_absolute():
        p = root / p
    if (p / "config.json").exists():
        return spec_from_folder(p)
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model]
    raise FitError(f"no architecture known for {model!r}: use a local model folder or add it to "
                   "workspace.model_spec.KNOWN_MODELS")
