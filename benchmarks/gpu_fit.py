"""The training fit check measured: a model with a real model's shape (random weights: memory and speed do not depend
on the values, and nothing is downloaded) trained with QLoRA for a few steps at a GPU profile's batch, cutoff, rank and
checkpointing; peak memory beside `make plan`'s estimate for the same settings, tokens/s, MFU.

Runs in the train environment (transformers, peft, bitsandbytes); one JSON line per shape on stdout:

    .venv-train-gpu/bin/python -m benchmarks.gpu_fit --shape qwen2.5-7b --batch 4 --cutoff 2048 --rank 8 --checkpointing
    .venv-train/bin/python -m benchmarks.gpu_fit --shape tiny --batch 2 --cutoff 64 --rank 8 --device cpu

The model is written once with random bf16 weights and loaded 4-bit (nf4, double quantisation, bf16 compute) through
transformers' bitsandbytes integration, as LLaMA-Factory loads a QLoRA base; LoRA on every linear layer of the
blocks (LLaMA-Factory's lora_target: all); AdamW on the LoRA weights. MFU counts 6 x parameters x tokens (the usual
training convention) against the card's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

# dense bf16 peak of the cards this project plans for, TFLOP/s (vendor data sheets, without sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "RTX 3090": 71.0, "RTX 4090": 165.0}
SHAPES = {  # config.json fields of the public models (no weights are read)
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),  # the CPU rehearsal
}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def measure(shape: str, batch: int, cutoff: int, rank: int, checkpointing: bool, steps: int, device: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=max(cutoff, 4096), torch_dtype="bfloat16")
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=os.environ.get("GPU_FIT_TMP")) as tmp:
        with torch.device(device):  # random init where it is fast; written once, then loaded as a QLoRA base is
            model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        build_s = time.time() - t0
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = Qwen2ForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": device})
    import bitsandbytes as bnb

    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()  # from_pretrained leaves eval mode, where transformers skips gradient checkpointing (a trainer
    # sets train mode; without it the first card run measured 90 GiB for what checkpointing keeps near 20)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, cutoff), device=device)
    times = []
    for _ in range(steps):
        t = time.time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t)
    timed = times[1:] or times  # the first step compiles kernels and allocates the optimizer state
    step_s = sum(timed) / len(timed)
    tokens_s = batch * cutoff / step_s
    out = {"shape": shape, "device": device, "params_b": round(n_params / 1e9, 3), "linear4bit_layers": n4,
           "batch": batch, "cutoff": cutoff, "rank": rank, "checkpointing": checkpointing, "steps": steps,
           "build_s": round(build_s, 1), "step_s": round(step_s, 3), "tokens_per_s": round(tokens_s, 1),
           "loss": round(loss.detach().item(), 3)}
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = peak_tflops(name)
        out.update(card=name, peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                   mfu=round(6 * n_params * tokens_s / (peak * 1e12), 4) if peak else None, peak_tflops=peak)
    else:
        out.update(card="cpu", peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--cutoff", type=int, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.shape, args.batch, args.cutoff, args.rank, args.checkpointing, args.steps,
                             args.device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
