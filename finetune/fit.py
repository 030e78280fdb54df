"""The training fit check: will the profile's finetuning fit in each GPU's memory? Run before launch (the finetune
stage refuses what does not fit) and by `make plan`.

Per GPU, in bytes (N = GPUs in the data-parallel group = finetune.num_gpus x finetune.nnodes):
    base weights   = quantised params x bits/8 (+ 2/64 B per param of nf4 block constants, 1/256 with double
                     quantisation) + embedding and output head params x 2 (bitsandbytes keeps them 16-bit);
                     16-bit (LoRA) or 32-bit+16-bit (full) otherwise.        ZeRO-3: / N (bnb_4bit_quant_storage)
    LoRA params    = rank x (in + out) per adapted matrix x layers (lora_target all: q, k, v, o, gate, up, down)
    trainable states = trainable params x (4 fp32 weight + 4 fp32 grad + 8 Adam m,v) B
                     ZeRO-2: weight + grad/N + Adam/N; ZeRO-3: all / N; no DeepSpeed: all on every GPU
    activations    = with gradient checkpointing: layers x batch x cutoff x hidden x 2 B (each layer's input)
                     + one layer recomputed: batch x cutoff x hidden x 34 B (Korthikanti et al. 2022, 16-bit,
                     flash/SDPA attention: no s^2 term); without it: layers x that one layer
                     + logits: batch x cutoff x vocab x 10 B (16-bit logits, their fp32 copy, its gradient)
    overhead       = 1.5 GiB (CUDA context, NCCL buffers, allocator fragmentation)
    budget         = the GPU's memory (finetune.gpu_memory_gib, else detected)
The numbers are estimates on the safe side; they are printed, so a person can check them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from workspace.config.load import LoadedConfig
from workspace.model_spec import ModelSpec, model_spec
from workspace.paths import ROOT, resolve

GIB = 1024 ** 3
OVERHEAD_GIB = 1.5
TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainFitError(RuntimeError):
    pass


@dataclass
class TrainFit:
    fits: bool
    need_gib: float
    budget_gib: float
    arithmetic: list[str]
    suggestion: str
    zero_stage: int

    def text(self) -> str:
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return "\n".join([f"training fit check: {verdict}", *[f"  {line}" for line in self.arithmetic]] +
                         ([f"  suggestion: {self.suggestion}"] if self.suggestion else []))


def _b(n: float) -> str:
    """Parameters in B (billions), or M for small models."""
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def zero_stage(loaded: LoadedConfig) -> int:
    """The ZeRO stage of finetune.deepspeed (0 without DeepSpeed)."""
    ds = loaded.config.finetune.deepspeed
    if not ds:
        return 0
    path = resolve(ds)
    try:
        return int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0))
    except FileNotFoundError:
        raise TrainFitError(f"finetune.deepspeed names {ds}, which does not exist (set in {loaded.origin('finetune.deepspeed')}); "
                            "the shipped ones are configs/deepspeed/ds_z2.json and ds_z3.json") from None
    except (ValueError, AttributeError) as exc:
        raise TrainFitError(f"finetune.deepspeed {ds}: not a DeepSpeed JSON ({exc})") from None


def lora_params(spec: ModelSpec, rank: int, target: str) -> float:
    heads = spec.heads or max(1, spec.hidden // max(spec.head_dim, 1))
    q_out = heads * spec.head_dim
    kv_out = spec.kv_heads * spec.head_dim
    shapes = {"q_proj": (spec.hidden, q_out), "k_proj": (spec.hidden, kv_out), "v_proj": (spec.hidden, kv_out),
              "o_proj": (q_out, spec.hidden), "gate_proj": (spec.hidden, spec.intermediate),
              "up_proj": (spec.hidden, spec.intermediate), "down_proj": (spec.intermediate, spec.hidden)}
    names = TARGETS_ALL if target == "all" else [t.strip() for t in target.split(",") if t.strip() in shapes]
    return float(spec.layers * sum(rank * sum(shapes[n]) for n in names))


def gpu_budget(loaded: LoadedConfig, detected_gib: Optional[float] = None) -> tuple[float, str]:
    ft = loaded.config.finetune  # the training card: the serving card (serving.gpu_memory_gib) may be another one
    if ft.gpu_memory_gib:
        return ft.gpu_memory_gib, "finetune.gpu_memory_gib"
    if detected_gib:
        return detected_gib, "detected"
    return 0.0, ""


def train_fit(loaded: LoadedConfig, spec: Optional[ModelSpec] = None, detected_gib: Optional[float] = None) -> Optional[TrainFit]:
    """The arithmetic for finetune.device: cuda (None on the CPU: RAM is not planned here)."""
    c = loaded.config
    ft = c.finetune
    if ft.device != "cuda":
        return None
    model = c.base_model.hub_id if c.base_model.source == "hub" else c.base_model.path
    spec = spec or model_spec(model, ROOT)
    if not (spec.hidden and spec.vocab and spec.intermediate):
        raise TrainFitError(f"the shape of {model} is incomplete for the training fit check: add it to "
                            "workspace.model_spec.KNOWN_MODELS or use a local folder with config.json")
    n = max(1, ft.num_gpus) * ft.nnodes
    stage = zero_stage(loaded)
    total = spec.params_b * 1e9
    emb = float(spec.embedding_params)
    body = max(total - emb, 0.0)
    lines: list[str] = []
    if ft.method == "qlora":
        bits = ft.quantization_bit or 4
        per = bits / 8 + (2 / 64 if bits == 4 else 4 / 64) * (1 / 4 if bits == 4 else 1)  # block constants, double-quant
        weights = body * per + emb * 2
        lines.append(f"base weights = {_b(body)} x {per:.3f} B ({bits}-bit nf4 + constants) + "
                     f"{_b(emb)} embedding/head x 2 B = {weights / GIB:.2f} GiB")
    elif ft.method == "lora":
        weights = total * 2
        lines.append(f"base weights = {_b(total)} x 2 B (16-bit) = {weights / GIB:.2f} GiB")
    else:
        weights = 0.0
        lines.append("base weights: full finetuning, counted with the trainable states")
    trainable = total if ft.method == "full" else lora_params(spec, ft.lora_rank, ft.lora_target)
    if ft.method != "full":
        lines.append(f"LoRA params = rank {ft.lora_rank} x (in + out) x {spec.layers} layers "
                     f"({ft.lora_target}) = {trainable / 1e6:.1f}M")
    w32, g32, adam = trainable * 4, trainable * 4, trainable * 8
    if stage >= 3:
        weights_gpu = weights / n
        states = (w32 + g32 + adam) / n
        how = f"ZeRO-3: weights and (4 + 4 + 8) B states / {n} GPUs"
    elif stage == 2:
        weights_gpu = weights
        states = w32 + (g32 + adam) / n
        how = f"ZeRO-2: 4 B weights + (4 B grads + 8 B Adam) / {n} GPUs"
    else:
        weights_gpu = weights
        states = w32 + g32 + adam
        how = "no DeepSpeed: (4 + 4 + 8) B on every GPU"
    lines.append(f"weights per GPU = {weights_gpu / GIB:.2f} GiB; trainable states = {trainable / 1e6:.1f}M x 16 B "
                 f"-> {states / GIB:.2f} GiB per GPU ({how})")
    b, s, h = ft.batch_size, ft.cutoff_len, spec.hidden
    layer = b * s * h * 34
    if ft.gradient_checkpointing:
        acts = spec.layers * b * s * h * 2 + layer
        act_how = (f"checkpointed: {spec.layers} layers x {b} x {s} x {h} x 2 B + one layer {b} x {s} x {h} x 34 B")
    else:
        acts = spec.layers * layer
        act_how = f"no checkpointing: {spec.layers} layers x {b} x {s} x {h} x 34 B"
    logits = b * s * spec.vocab * 10
    lines.append(f"activations = {acts / GIB:.2f} GiB ({act_how}); logits = {b} x {s} x {spec.vocab} x 10 B = "
                 f"{logits / GIB:.2f} GiB")
    need = (weights_gpu + states + acts + logits) / GIB + OVERHEAD_GIB
    budget, where = gpu_budget(loaded, detected_gib)
    lines.append(f"need per GPU = {weights_gpu / GIB:.2f} + {states / GIB:.2f} + {acts / GIB:.2f} + {logits / GIB:.2f} "
                 f"+ {OVERHEAD_GIB} overhead = {need:.2f} GiB")
    if not budget:
        lines.append("budget per GPU: unknown (set finetune.gpu_memory_gib)")
        return TrainFit(True, need, 0.0, lines, "", stage)
    lines.append(f"budget per GPU = {budget:.1f} GiB ({where})")
    fits = need <= budget
    suggestion = ""
    if not fits:
        tips = []
        if stage < 3 and n > 1 and weights_gpu / GIB > budget * 0.4:
            tips.append("finetune.deepspeed: configs/deepspeed/ds_z3.json (shards the 4-bit weights over the GPUs)")
        if stage < 2 and n > 1 and states / GIB > budget * 0.1:
            tips.append("finetune.deepspeed: configs/deepspeed/ds_z2.json (shards gradients and Adam states)")
        if (acts + logits) / GIB > budget * 0.25:
            tips.append(f"a smaller finetune.batch_size ({b}) with more gradient_accumulation, or a shorter cutoff_len ({s})")
            if not ft.gradient_checkpointing:
                tips.append("finetune.gradient_checkpointing: true")
        if ft.method != "full" and states / GIB > budget * 0.15:
            tips.append(f"a smaller finetune.lora_rank ({ft.lora_rank})")
        if ft.method == "lora":
            tips.append("method: qlora with quantization_bit: 4")
        suggestion = "; ".join(tips) or "more or larger GPUs"
    return TrainFit(fits, need, budget, lines, suggestion, stage)
