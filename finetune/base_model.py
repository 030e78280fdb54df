"""Build the embedded default base model: a byte-level BPE tokenizer with a chat template and a small
Qwen2-architecture causal LM, pretrained on the shipped Korean/English text (data/raw/pretrain).

Called by `make base-model` (and `make setup` when the model is missing):
    python -m llmops base-model [--config configs/pipeline.yaml] [--set base_model.build.steps=300] [--force]
Deterministic for a seed; skipped when models/base-tiny already holds a build of the same inputs. The
model card (base_model_card.json) records the held-out perplexity of the trained model and of the same
architecture untrained, so anyone can see it is a real base model, not a random one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from workspace import offline
from workspace.config.data import BaseModelBuild
from workspace.config.load import ConfigError, add_cli_args, load_from_args
from workspace.paths import resolve

CARD = "base_model_card.json"
SPECIAL = {"eos": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>"}
# ChatML, as Qwen2 uses; LLaMA-Factory's `qwen` template and vLLM's chat endpoint render the same turns.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def read_text(text_dir: Path) -> list[str]:
    files = sorted(p for p in text_dir.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{text_dir}: no *.txt pretraining text. Run `make data` (python -m datagen) first.")
    lines: list[str] = []
    for f in files:
        lines.extend(line.rstrip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    return lines


def build_fingerprint(build: BaseModelBuild, lines: list[str]) -> str:
    h = hashlib.sha256(json.dumps(build.model_dump(mode="json"), sort_keys=True).encode())
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def train_tokenizer(lines: list[str], vocab_size: int):
    """Byte-level BPE. Runs of whitespace are split off before byte-level mapping, so a word is the same
    token whether or not a space precedes it (" 이메일" in a prompt and "이메일" inside XML)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL["im_end"], pad_token=SPECIAL["eos"],
        additional_special_tokens=[SPECIAL["im_start"], SPECIAL["im_end"]],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def _blocks(ids: list[int], seq_len: int):
    import torch

    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _encode(tokenizer, lines: list[str]) -> list[int]:
    sep = tokenizer.convert_tokens_to_ids(SPECIAL["eos"])
    out: list[int] = []
    for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        out.extend(ids)
        out.append(sep)
    return out


def perplexity(model, blocks, batch_size: int = 64, device: str = "cpu") -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i: i + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            total += loss.item() * batch.numel()
            count += batch.numel()
    model.train()
    return math.exp(total / max(count, 1))


def build_base_model(build: BaseModelBuild, out_dir: Path, force: bool = False, quiet: bool = False,
                     device: str = "cpu") -> dict:
    """Train tokenizer + model into out_dir (atomically). Returns the model card.

    `device` cuda is for the one-call GPU smoke (benchmarks/gpu_smoke.py), where the machine's minutes are few: the
    same recipe in float32 on the card, a different build bit for bit (the card records where it was built)."""
    lines = read_text(resolve(build.text_dir))
    fingerprint = build_fingerprint(build, lines)
    card_path = out_dir / CARD
    if not force and card_path.exists():
        card = json.loads(card_path.read_text())
        if card.get("fingerprint") == fingerprint:
            if not quiet:
                print(f"[base-model] {out_dir} is current (fingerprint {fingerprint}); `make rebuild-base-model` rebuilds")
            return card

    import torch  # imported only when there is work to do: the up-to-date check above stays fast
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.time()
    torch.manual_seed(build.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    import random

    order = list(range(len(lines)))
    random.Random(build.seed).shuffle(order)
    n_held = max(1, int(len(lines) * build.heldout_fraction))
    held = [lines[i] for i in order[:n_held]]
    train = [lines[i] for i in order[n_held:]]

    tokenizer = train_tokenizer(train, build.vocab_size)
    train_blocks = _blocks(_encode(tokenizer, train), build.seq_len)
    held_blocks = _blocks(_encode(tokenizer, held), build.seq_len)
    if len(train_blocks) == 0 or len(held_blocks) == 0:
        raise ValueError(f"pretraining text in {build.text_dir} is too short for seq_len {build.seq_len}")

    vocab = ((len(tokenizer) + 63) // 64) * 64
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=build.hidden_size, intermediate_size=build.intermediate_size,
        num_hidden_layers=build.num_layers, num_attention_heads=build.num_heads,
        num_key_value_heads=build.num_kv_heads, max_position_embeddings=build.max_position,
        tie_word_embeddings=True, rope_theta=10000.0, use_sliding_window=False,
        eos_token_id=tokenizer.convert_tokens_to_ids(SPECIAL["im_end"]),
        pad_token_id=tokenizer.convert_tokens_to_ids(SPECIAL["eos"]), bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    ppl_untrained = perplexity(model, held_blocks, device=device)

    opt = torch.optim.AdamW(model.parameters(), lr=build.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < build.warmup_steps:
            return (step + 1) / build.warmup_steps
        progress = (step - build.warmup_steps) / max(1, build.steps - build.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(build.seed)
    losses: list[float] = []
    model.train()
    with Progress(TextColumn("[base-model] pretraining"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), disable=quiet) as bar:
        task = bar.add_task("pretrain", total=build.steps, loss=float("nan"))
        for step in range(build.steps):
            idx = torch.randint(0, len(train_blocks), (build.batch_size,), generator=gen)
            batch = train_blocks[idx].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            bar.update(task, advance=1, loss=loss.item())
            if not quiet and not bar.console.is_terminal and (step + 1) % 50 == 0:  # CI logs: plain lines
                print(f"[base-model] step {step + 1}/{build.steps} loss {loss.item():.3f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    ppl_trained = perplexity(model, held_blocks, device=device)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id

    card = {
        "architecture": "Qwen2ForCausalLM",
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "embedding_rows": vocab,
        "build": build.model_dump(mode="json"),
        "fingerprint": fingerprint,
        "pretrain_lines": len(train),
        "heldout_lines": len(held),
        "pretrain_tokens_seen": build.steps * build.batch_size * build.seq_len,
        "heldout_perplexity_untrained": round(ppl_untrained, 3),
        "heldout_perplexity": round(ppl_trained, 3),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        **({"built_on": device} if device != "cpu" else {}),
    }
    tmp = out_dir.with_name(out_dir.name + ".tmp-build")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain_loss.json").write_text(json.dumps(losses))
    (tmp / CARD).write_text(json.dumps(card, indent=2, ensure_ascii=False))
    # swap in atomically: an interrupted build never leaves a half-written model where stages look for one
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    if not quiet:
        print(f"[base-model] {out_dir}: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, "
              f"held-out perplexity {ppl_untrained:.1f} (untrained) -> {ppl_trained:.2f} (trained), "
              f"{card['seconds']:.0f} s")
    return card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--force", action="store_true", help="rebuild even when the model is current")
    ap.add_argument("--out", default=None, help="output folder (default base_model.path)")
    ap.add_argument("--device", default="cpu", help="cpu (the default build) or cuda (the GPU smoke's, not the same "
                    "bits)")
    args = ap.parse_args(argv)
    try:
        loaded = load_from_args(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    cfg = loaded.config
    offline.apply(cfg.hub.enabled)
    if cfg.base_model.source != "build":
        print(f"[base-model] base_model.source is {cfg.base_model.source!r}: nothing to build "
              f"(model: {cfg.base_model.hub_id or cfg.base_model.path})")
        return 0
    build_base_model(cfg.base_model.build, resolve(args.out or cfg.base_model.path), force=args.force,
                     device=args.device)
    return 0
