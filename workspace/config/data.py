"""The finetune package's input sections: base_model (built, local or hub) and data (sources, split, feedback)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from workspace.config.base import Strict


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
