"""The finetune section: LLaMA-Factory's recipe (SFT or DPO, LoRA/QLoRA/full, devices, hosts)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from workspace.config.base import Strict


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
    gpu_memory_gib: float = Field(0, ge=0)  # per training GPU, for the fit check (0: the detected GPU)
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
