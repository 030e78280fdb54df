"""Greedy generation for the custom metrics, through either scorer of the evaluation stage:
`hf` (in-process transformers, base model + optional peft adapter, batched) or an OpenAI-compatible endpoint
(the vLLM server through workspace.endpoint, concurrent chat completions). Both render prompts with the model's
own chat template. Called by eval/evaluate.py and eval/rag_quality.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from workspace.device import torch_device
from workspace.endpoint import Endpoint


@dataclass
class Generations:
    outputs: list[str]
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


def load_items(path: Path, limit: Optional[int] = None) -> list[dict]:
    """Rows of a processed split ({"messages": [...]}) -> {id, messages (prompt side), reference}."""
    items = []
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            items.append({"id": f"{path.stem}:{no}", "messages": messages[:-1], "reference": messages[-1]["content"]})
            if limit and len(items) >= limit:
                break
    return items


def output_penalties(prompt_len: int, frequency_penalty: float = 0.0, presence_penalty: float = 0.0):
    """A transformers LogitsProcessor with vLLM's OpenAI penalties, so the in-process scorer decodes as the server does
    (serving.decoding): on the tokens generated after the (left-padded) prompt only, logit -= frequency_penalty x
    count + presence_penalty x (count > 0). Written here because transformers has no such processor: its
    RepetitionPenaltyLogitsProcessor is another rule (multiplicative, over the prompt too)."""
    import torch
    from transformers import LogitsProcessor

    class OutputPenalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = input_ids[:, prompt_len:]
            if out.shape[1] == 0:
                return scores
            counts = torch.zeros_like(scores)
            counts.scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
            return scores - frequency_penalty * counts - presence_penalty * (counts > 0).to(scores.dtype)

    return OutputPenalties()


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text up to and including the first stop string written (what vLLM returns with include_stop_str_in_output:
    it checks the text after every token, so the stop string that ends first wins)."""
    ends = [i + len(s) for s in stop if (i := text.find(s)) >= 0]
    return text[:min(ends)] if ends else text


def generate_hf(base: str, adapter: Optional[str], items: list[dict], max_new_tokens: int, *, device: str, dtype: str,
                batch_size: int = 16, progress=None, sampling: Optional[dict] = None) -> Generations:
    """Greedy generation in this process on `device` ('cpu' | 'cuda') in `dtype` (a torch dtype name; from
    eval.device / eval.dtype through workspace.device.resolve_dtype). `sampling`: serving.decoding's non-default
    settings: its penalties (a logits processor) and stop strings (generation of a row ends at one, and the text is
    cut after it, as vLLM does)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"eval.device is cuda but torch {torch.__version__} in the workspace env sees no CUDA GPU")

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    model.to(torch_device(device))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    sampling = dict(sampling or {})
    stop = sampling.pop("stop", None) or []
    sampling.pop("include_stop_str_in_output", None)  # the text keeps the stop string, as below
    prompts = [tok.apply_chat_template(it["messages"], tokenize=False, add_generation_prompt=True) for it in items]
    outputs: list[str] = []
    n_tokens = 0
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            penalties = LogitsProcessorList([output_penalties(batch["input_ids"].shape[1], **sampling)]) if sampling else None
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=penalties,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 **({"stop_strings": stop, "tokenizer": tok} if stop else {}))
            new = gen[:, batch["input_ids"].shape[1]:]
            for row in new:
                ids = [t for t in row.tolist() if t != tok.pad_token_id]
                if tok.eos_token_id in ids:
                    ids = ids[: ids.index(tok.eos_token_id) + 1]
                n_tokens += len(ids)
                outputs.append(cut_at_stop(tok.decode(ids, skip_special_tokens=True), stop).strip())
            if progress:
                progress(len(outputs))
    return Generations(outputs, n_tokens, time.time() - t0)


def generate_openai(endpoint: Endpoint, items: list[dict], max_new_tokens: int, progress=None,
                    sampling: Optional[dict] = None) -> Generations:
    """Greedy chat completions against an OpenAI-compatible server (workspace.endpoint), `concurrency` in flight;
    `sampling` (serving.decoding's penalties and stop strings) is sent with every request, whatever the server's
    defaults."""
    t0 = time.time()
    results = endpoint.chat_many([it["messages"] for it in items], max_tokens=max_new_tokens, progress=progress,
                                 sampling=sampling)
    return Generations([r[0] for r in results], sum(r[1] for r in results), time.time() - t0)
