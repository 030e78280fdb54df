"""Verify a trained LoRA adapter, in the train environment (it needs peft):

    .venv-train/bin/python -m finetune.verify_adapter --base models/base-tiny --adapter <dir> --data <val.jsonl> --out v.json

1. the adapter loads on the base model with peft;
2. its greedy outputs on a few validation prompts differ from the base model's (a LoRA that loads but changes
   nothing, e.g. a zero-initialised B matrix, is a known failure in the field);
3. the validation loss (answer tokens only) of base and base+adapter on the validation split.
Writes a JSON report; exits 3 when the adapter changes nothing. Uses only torch/transformers/peft.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time


def load_rows(path: str, limit: int) -> list[list[dict]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line)["messages"])
            if len(rows) >= limit:
                break
    return rows


def encode(tok, messages: list[dict], max_len: int):
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    answer = messages[-1]["content"] + (tok.eos_token or "") + "\n"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer, add_special_tokens=False)["input_ids"]
    ids = (p_ids + a_ids)[:max_len]
    labels = ([-100] * len(p_ids) + a_ids)[:max_len]
    return ids, labels


def answer_loss(model, tok, rows, max_len: int) -> float:
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for messages in rows:
            ids, labels = encode(tok, messages, max_len)
            n = sum(1 for l in labels[1:] if l != -100)
            if not n:
                continue
            dev = model.device
            out = model(input_ids=torch.tensor([ids], device=dev), labels=torch.tensor([labels], device=dev))
            total += out.loss.item() * n
            count += n
    return total / max(count, 1)


def greedy(model, tok, rows, max_new_tokens: int) -> list[str]:
    import torch

    outs = []
    with torch.no_grad():
        for messages in rows:
            prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
            outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", required=True, help="validation split (jsonl with messages)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--loss-rows", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--device", required=True, choices=["cpu", "cuda"], help="finetune.device")
    ap.add_argument("--dtype", required=True, choices=["float32", "bfloat16", "float16"],
                    help="workspace.device.resolve_dtype of finetune.device/bf16")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.base)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("VERIFY finetune.device is cuda but this train environment's torch sees no CUDA GPU "
              f"(torch {torch.__version__}): run `make setup GPU=1` on a GPU machine")
        return 4
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=getattr(torch, args.dtype),
                                                device_map={"": 0} if args.device == "cuda" else None)
    rows = load_rows(args.data, max(args.prompts, args.loss_rows))
    gen_rows = rows[: args.prompts]
    base_out = greedy(base, tok, gen_rows, args.max_new_tokens)
    base_loss = answer_loss(base, tok, rows[: args.loss_rows], args.max_len)
    try:
        model = PeftModel.from_pretrained(base, args.adapter)
    except Exception as exc:  # noqa: BLE001 - reported as a verification failure
        report = {"loads": False, "error": f"{type(exc).__name__}: {exc}"}
        open(args.out, "w", encoding="utf-8").write(json.dumps(report, ensure_ascii=False, indent=2))
        print(f"VERIFY adapter does not load on the base: {report['error']}")
        return 2
    cand_out = greedy(model, tok, gen_rows, args.max_new_tokens)
    cand_loss = answer_loss(model, tok, rows[: args.loss_rows], args.max_len)
    lora_b_norm = sum(p.detach().float().norm().item() for n, p in model.named_parameters() if "lora_B" in n)
    differ = [a != b for a, b in zip(base_out, cand_out)]
    report = {
        "loads": True,
        "prompts": len(gen_rows),
        "outputs_differ": sum(differ),
        "differ_fraction": sum(differ) / max(len(differ), 1),
        "lora_b_norm": lora_b_norm,
        "val_loss_base": base_loss,
        "val_loss_candidate": cand_loss,
        "val_ppl_base": math.exp(min(base_loss, 50)),
        "val_ppl_candidate": math.exp(min(cand_loss, 50)),
        "loss_rows": len(rows[: args.loss_rows]),
        "examples": [{"prompt": r[-2]["content"], "base": b, "candidate": c, "reference": r[-1]["content"]}
                     for r, b, c in zip(gen_rows, base_out, cand_out)],
        "seconds": round(time.time() - t0, 1),
    }
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(report, ensure_ascii=False, indent=2))
    print(f"VERIFY outputs_differ={sum(differ)}/{len(differ)} val_loss base={base_loss:.3f} candidate={cand_loss:.3f}")
    return 0 if sum(differ) > 0 else 3


if __name__ == "__main__":
    sys.exit(main())
