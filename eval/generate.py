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


class GrammarMask:
    """serving.decoding.grammar in the in-process scorer: xgrammar's token masks (the library vLLM's structured outputs
    use), one matcher per row of a batch; tokens the grammar does not allow next get -inf. Written here rather than
    taken from xgrammar.contrib.hf.LogitsProcessor: that one asserts every sampled token is accepted, and a row that
    generate() ended by a stop string is padded afterwards (pad is not in the grammar); here such a row is left alone.
    Built once per batch (a matcher holds the row's state)."""

    def __init__(self, compiled, batch_size: int, prompt_len: int, pad_token_id: Optional[int]):
        import xgrammar as xgr

        self.xgr, self.prompt_len, self.pad = xgr, prompt_len, pad_token_id
        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch_size)]
        self.done = [False] * batch_size
        self.bitmask = xgr.allocate_token_bitmask(batch_size, compiled.tokenizer_info.vocab_size)

    @staticmethod
    def compile(grammar: str, tokenizer, vocab_size: int):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        try:
            return xgr.GrammarCompiler(info).compile_grammar(grammar)
        except RuntimeError as exc:  # xgrammar's parser error names the line and column
            raise ValueError(f"serving.decoding.grammar does not parse: {exc}") from exc

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.prompt_len:  # the token chosen at the previous step
            for i, m in enumerate(self.matchers):
                if self.done[i] or m.is_terminated():
                    continue
                token = int(input_ids[i, -1])
                if not m.accept_token(token):
                    if token != self.pad:
                        raise RuntimeError(f"row {i}: token {token} was chosen outside the grammar")
                    self.done[i] = True  # generate() ended this row (a stop string) and pads it
        for i, m in enumerate(self.matchers):
            if self.done[i] or m.is_terminated():
                self.bitmask[i].fill_(-1)  # a finished row: nothing masked (its tokens are padding)
            else:
                m.fill_next_token_bitmask(self.bitmask, i)
        self.xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text up to and including the first stop string written (what vLLM returns with include_stop_str_in_output:
    it checks the text after every token, so the stop string that ends first wins)."""
    ends = [i + len(s) for s in stop if (i := text.find(s)) >= 0]
    return text[:min(ends)] if ends else text


def generate_hf(base: str, adapter: Optional[str], items: list[dict], max_new_tokens: int, *, device: str, dtype: str,
                batch_size: int = 16, progress=None, sampling: Optional[dict] = None) -> Generations:
    """Greedy generation in this process on `device` ('cpu' | 'cuda') in `dtype` (a torch dtype name; from
    eval.device / eval.dtype through workspace.device.resolve_dtype). `sampling`: serving.decoding's non-default
    settings: its penalties (a logits processor), stop strings (generation of a row ends at one, and the text is
    cut after it, as vLLM does) and grammar (xgrammar's token masks, as vLLM's structured outputs apply them)."""
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
    grammar = (sampling.pop("structured_outputs", None) or {}).get("grammar")
    compiled = GrammarMask.compile(grammar, tok, model.config.vocab_size) if grammar else None
    prompts = [tok.apply_chat_template(it["messages"], tokenize=False, add_generation_prompt=True) for it in items]
    outputs: list[str] = []
    n_tokens = 0
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            prompt_len = batch["input_ids"].shape[1]
            processors = LogitsProcessorList(
                ([output_penalties(prompt_len, **sampling)] if sampling else [])
                + ([GrammarMask(compiled, len(batch["input_ids"]), prompt_len, tok.pad_token_id)] if compiled else []))
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors or None,
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
    `sampling` (serving.decoding's penalties, stop strings and grammar) is sent with every request, whatever the
    server's defaults."""
    t0 = time.time()
    results = endpoint.chat_many([it["messages"] for it in items], max_tokens=max_new_tokens, progress=progress,
                                 sampling=sampling)
    return Generations([r[0] for r in results], sum(r[1] for r in results), time.time() - t0)
