"""Dataset preparation: read raw instruction data (alpaca, sharegpt, OpenAI messages; jsonl/json/csv), validate
every row, clean and PII-mask it, remove duplicates, split deterministically and write LLaMA-Factory-ready
splits under data/processed/<content-hash>/ (atomically), with quarantine.jsonl and stats.json.

Called by flows/prepare.py (`make prepare`) and by tests as a plain function: `prepare_dataset(loaded)`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from workspace.config.data import DataSource
from workspace.config.load import LoadedConfig
from workspace.fsutil import recover, staging
from workspace import harvest_format
from workspace import pii as pii_module
from workspace.pii import KINDS, mask_pii
from workspace.paths import ROOT, resolve

PREPARE_VERSION = "2"  # bump when the output of this module changes for the same inputs
QUARANTINE_SNIPPET = 300  # characters of the raw row kept in quarantine.jsonl, cut AFTER masking (snippet())
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}


class PrepareError(RuntimeError):
    """The stage refuses its inputs; the message names the file/row/key and says how to fix it."""


# ------------------------------------------------------------------------------------------------ PII
# workspace/pii.py: one masker for the splits, the quarantine, stats, errors and MLflow (and the gateway's logs).
PII_KINDS = KINDS


# ------------------------------------------------------------------------------------------- cleaning
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"), None)
_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC, no zero-width characters, exotic spaces as plain spaces, \\r\\n as \\n, no trailing spaces,
    at most one blank line, trimmed. Indentation inside lines is kept (answers are XML/code)."""
    text = unicodedata.normalize("NFC", text).translate(_ZERO_WIDTH)
    text = _SPACES.sub(" ", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING.sub("\n", text)
    return _BLANKS.sub("\n\n", text).strip()


def dedup_key(messages: list[dict]) -> str:
    """Normalised duplicate key: case-folded, every run of whitespace removed."""
    joined = "\x1f".join(f"{m['role']}:{m['content']}" for m in messages)
    return hashlib.sha1(re.sub(r"\s+", "", joined.casefold()).encode()).hexdigest()


def prompt_key(messages: list[dict]) -> str:
    """The request side of an example (everything but the final answer), for train/test overlap."""
    return dedup_key(messages[:-1])


# -------------------------------------------------------------------------------------------- reading
@dataclass
class RawRow:
    file: str
    line: int  # 1-based line (jsonl, csv) or element index + 1 (json array)
    data: Any = None
    error: Optional[str] = None  # a reading failure (invalid_utf8, unparsable_json, not_an_object)
    raw: str = ""  # the whole row as read; never written as is (snippet() masks, then cuts)


def snippet(raw: str) -> str:
    """What quarantine.jsonl keeps of a row: masked first, then cut, so a number cut in half is never written."""
    return mask_pii(raw)[:QUARANTINE_SNIPPET]


def read_rows(path: Path, display: str) -> Iterator[RawRow]:
    """Stream the rows of one file. Bad lines become RawRows with an error, never exceptions."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as fh:
            for no, raw in enumerate(fh, 1):
                if no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield RawRow(display, no, error="invalid_utf8",
                                 raw=f"byte {exc.start}: " + raw.decode("utf-8", "replace"))
                    continue
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield RawRow(display, no, error="unparsable_json", raw=f"{exc.msg} at column {exc.colno}: {text}")
                    continue
                yield _object_row(display, no, data, text)
    elif suffix == ".json":
        blob = path.read_bytes()
        try:
            text = blob.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise PrepareError(f"{display}: invalid UTF-8 at byte {exc.start}; a .json file is parsed whole, "
                               "so re-encode it as UTF-8 (or convert it to .jsonl to quarantine bad rows one by one)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrepareError(f"{display}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}); "
                               "fix it, or convert it to .jsonl so bad rows are quarantined one by one")
        if not isinstance(data, list):
            raise PrepareError(f"{display}: a .json source must hold an array of rows, got {type(data).__name__}")
        for no, item in enumerate(data, 1):
            yield _object_row(display, no, item, "")
    elif suffix == ".csv":
        with open(path, "rb") as fh:
            blob = fh.read()
        try:
            text = blob.decode("utf-8-sig")  # with or without BOM
        except UnicodeDecodeError as exc:
            raise PrepareError(f"{display}: invalid UTF-8 at byte {exc.start}; save the CSV as UTF-8")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for record in reader:
            no = reader.line_num
            if None in record:
                yield RawRow(display, no, error="csv_extra_columns", raw=str(record))
                continue
            data = {}
            for key, value in record.items():
                if key in ("conversations", "messages", "history") and value and value.strip().startswith("["):
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        pass
                data[key] = value
            yield RawRow(display, no, data=data, raw=json.dumps(data, ensure_ascii=False))
    else:
        raise PrepareError(f"{display}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")


def _object_row(display: str, no: int, data: Any, text: str) -> RawRow:
    raw = text or json.dumps(data, ensure_ascii=False)
    if not isinstance(data, dict):
        return RawRow(display, no, error="not_an_object", raw=raw)
    return RawRow(display, no, data=data, raw=raw)


def detect_format(data: dict) -> Optional[str]:
    if "conversations" in data:
        return "sharegpt"
    if "messages" in data:
        return "openai"
    if "instruction" in data or "output" in data:
        return "alpaca"
    return None


# ------------------------------------------------------------------------------------------ validation
class RowRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _text_field(data: dict, key: str, required: bool) -> str:
    if key not in data or data[key] is None:
        if required:
            raise RowRejected(f"missing_field:{key}")
        return ""
    value = data[key]
    if not isinstance(value, str):
        raise RowRejected(f"wrong_type:{key}", f"expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowRejected(f"empty_field:{key}")
    return value


def to_messages(data: dict, fmt: str) -> list[dict]:
    """One raw row -> [{role, content}, ...] (system first if any, then user/assistant turns)."""
    if fmt == "alpaca":
        instruction = _text_field(data, "instruction", True)
        inp = _text_field(data, "input", False)
        output = _text_field(data, "output", True)
        system = _text_field(data, "system", False)
        messages = [{"role": "system", "content": system}] if system.strip() else []
        history = data.get("history") or []
        if not isinstance(history, list):
            raise RowRejected("wrong_type:history", "expected a list of [prompt, answer] pairs")
        for turn in history:
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise RowRejected("wrong_type:history", "each history item must be [prompt, answer] strings")
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        prompt = instruction if not inp.strip() else f"{instruction}\n{inp}"
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        return messages
    if fmt == "sharegpt":
        turns, role_key, content_key, role_map = data.get("conversations"), "from", "value", SHAREGPT_ROLES
        name = "conversations"
    else:
        turns, role_key, content_key, role_map = data.get("messages"), "role", "content", {r: r for r in ROLES}
        name = "messages"
    if turns is None:
        raise RowRejected(f"missing_field:{name}")
    if not isinstance(turns, list):
        raise RowRejected(f"wrong_type:{name}", f"expected a list, got {type(turns).__name__}")
    if not turns:
        raise RowRejected(f"empty_field:{name}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowRejected(f"wrong_type:{name}", f"turn {i} is {type(turn).__name__}, expected an object")
        if role_key not in turn:
            raise RowRejected(f"missing_field:{name}[{i}].{role_key}")
        role = turn[role_key]
        if not isinstance(role, str) or role not in role_map:
            shown = mask_pii(str(role))[:40]  # a role is user data too: masked and short before it becomes a reason
            raise RowRejected(f"unknown_role:{shown}", f"turn {i}; allowed: {', '.join(sorted(role_map))}")
        content = turn.get(content_key)
        if content is None:
            raise RowRejected(f"missing_field:{name}[{i}].{content_key}")
        if not isinstance(content, str):
            raise RowRejected(f"wrong_type:{name}[{i}].{content_key}", f"expected a string, got {type(content).__name__}")
        messages.append({"role": role_map[role], "content": content})
    return messages


def check_turns(messages: list[dict]) -> None:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise RowRejected("misplaced_system", "a system message is only allowed first")
    if not body:
        raise RowRejected("empty_conversation")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowRejected("not_alternating", f"turn {i} is {m['role']}, expected {expected}")
        if not m["content"].strip():
            raise RowRejected(f"empty_field:{m['role']}_turn_{i}")
    if body[-1]["role"] != "assistant":
        raise RowRejected("not_ending_with_assistant")


# --------------------------------------------------------------------------------------------- tokens
class TokenCounter:
    """Counts tokens of a conversation with the base model's tokenizer, in batches (fast path for 100k rows).
    Per message it adds the chat template's overhead (measured once from the tokenizer's own template)."""

    def __init__(self, tokenizer_path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.overhead = self._template_overhead()

    def _template_overhead(self) -> int:
        if not getattr(self.tok, "chat_template", None):
            return 0
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        rendered = self.tok.apply_chat_template(probe, tokenize=False)
        total = len(self.tok(rendered, add_special_tokens=False)["input_ids"])
        content = sum(len(self.tok(m["content"], add_special_tokens=False)["input_ids"]) for m in probe)
        return max(0, (total - content + 1) // 2)

    def count(self, conversations: list[list[dict]]) -> list[int]:
        texts = [m["content"] for conv in conversations for m in conv]
        lengths = [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
        out, i = [], 0
        for conv in conversations:
            out.append(sum(lengths[i: i + len(conv)]) + self.overhead * len(conv))
            i += len(conv)
        return out

    @property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tok.name_or_path)


def tokenizer_fingerprint(name_or_path: str) -> str:
    """What the prepared data's key knows of the tokenizer: its name or folder and the bytes of its tokenizer*.json
    files. Read from the files, without loading the tokenizer: the prepare stage's cache key is computed on every
    pipeline run, cached or not, and loading one (importing transformers) cost about 5 s of a 19 s cached run."""
    folder = Path(name_or_path)
    files = sorted(folder.glob("tokenizer*.json")) if folder.exists() else []
    h = hashlib.sha256(name_or_path.encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- result
@dataclass
class PreparedDataset:
    path: Path
    content_hash: str  # of what training reads (files_hash): the finetune run key follows it
    stats: dict
    skipped: bool  # True when the folder already existed (same inputs)
    splits: dict[str, Path] = field(default_factory=dict)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# what training reads from a processed folder (LLaMA-Factory: dataset_info.json and the splits it names); the
# quarantine, stats and plot are reports
TRAINING_FILES = ("dataset_info.json", "train.jsonl", "val.jsonl", "test.jsonl", "pref_train.jsonl")


def files_hash(folder: Path) -> str:
    """The processed data's own hash: of the bytes of TRAINING_FILES (name and content). Two folders with the same
    rows in the same order have the same hash, whatever code or settings wrote them: a change to the masker or the
    reader that writes the same files retrains nothing."""
    h = hashlib.sha256()
    for name in TRAINING_FILES:
        if (folder / name).exists():
            h.update(f"{name}:{_file_sha(folder / name)}\n".encode())
    return h.hexdigest()[:16]


def inputs_key(loaded: LoadedConfig, tokenizer_fingerprint: str) -> str:
    """The processed folder's name: a key over everything that decides what prepare writes (the sources' bytes, the
    data settings, the tokenizer, this code and the masker), so an unchanged input is found without redoing the
    work. Not the data's identity (files_hash is): a code change gives a new folder even when its files are equal."""
    cfg = loaded.config
    h = hashlib.sha256()
    data_cfg = cfg.data.model_dump(mode="json")
    data_cfg.pop("output_dir")
    if not cfg.data.feedback.enabled:  # off: the key (and every cached dataset) is what it was before feedback existed
        data_cfg.pop("feedback")
    h.update(json.dumps({"data": data_cfg, "cutoff_len": cfg.finetune.cutoff_len, "tokenizer": tokenizer_fingerprint,
                         "version": PREPARE_VERSION, "code": _file_sha(Path(__file__)),
                         "masker": _file_sha(Path(pii_module.__file__))}, sort_keys=True).encode())
    for key, src in source_keys(loaded):
        path = check_source_path(loaded, key, src)
        h.update(src.path.encode())
        h.update(_file_sha(path).encode())
    for folder in feedback_dirs(loaded):
        for name in harvest_format.DATA_FILES:
            if (folder / name).exists():
                h.update(f"{folder.name}/{name}".encode())
                h.update(_file_sha(folder / name).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ harvested feedback


def feedback_dirs(loaded: LoadedConfig) -> list[Path]:
    """The harvest folders (`make harvest`: data/raw/feedback/<date>/ with manifest.json, written last) that
    data.feedback selects, oldest first; none when it is off. An unfinished harvest (no manifest) is not read."""
    fb = loaded.config.data.feedback
    if not fb.enabled:
        return []
    root = resolve(fb.dir)
    if not root.is_dir():
        raise PrepareError(f"data.feedback.dir = {fb.dir} (set in {loaded.origin('data.feedback')}): no such folder; "
                           "run `make harvest` first, or set data.feedback.enabled: false")
    found = harvest_format.finished_harvests(root)
    if not found:
        raise PrepareError(f"data.feedback.dir = {fb.dir}: no finished harvest in it (a folder with "
                           f"{harvest_format.MANIFEST}); "
                           "run `make harvest` first, or set data.feedback.enabled: false")
    return found[-1:] if fb.harvests == "latest" else found


def _pair_messages(data: dict) -> tuple[list[dict], str, str]:
    """A LLaMA-Factory ranking row (sharegpt: conversations + chosen + rejected [+ system]) -> (prompt messages,
    chosen, rejected). Raises RowRejected."""
    prompt = to_messages(data, "sharegpt")
    system = _text_field(data, "system", False)
    if system.strip():
        prompt = [{"role": "system", "content": system}] + prompt
    if prompt[-1]["role"] != "user":
        raise RowRejected("pair_prompt_not_user", "the conversation must end with the user's turn")
    answers = []
    for key in ("chosen", "rejected"):
        turn = data.get(key)
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RowRejected(f"missing_field:{key}", 'expected {"from": "gpt", "value": "..."}')
        answers.append(turn["value"])
    return prompt, answers[0], answers[1]


@dataclass
class _Pair:
    prompt: list[dict]
    chosen: str
    rejected: str
    file: str
    line: int

    def ranking_row(self) -> dict:
        """LLaMA-Factory's ranking format (sharegpt formatting, ranking: true)."""
        system = self.prompt[0]["content"] if self.prompt[0]["role"] == "system" else ""
        turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                 for m in self.prompt if m["role"] != "system"]
        return {"conversations": turns, "chosen": {"from": "gpt", "value": self.chosen},
                "rejected": {"from": "gpt", "value": self.rejected}, "system": system}


def _load_pairs(path: Path, count: SourceCount, counter: TokenCounter, cutoff: int, quarantine: list[dict],
                pii: Counter, held_out: set[str], seen: set[str]) -> list[_Pair]:
    def reject(line: int, reason: str, detail: str, raw: str) -> None:
        count.rejected += 1
        count.reasons[reason] += 1
        quarantine.append({"file": count.file, "line": line, "reason": reason, "detail": mask_pii(detail),
                           "raw": snippet(raw)})

    pairs: list[_Pair] = []
    for row in read_rows(path, count.file):
        count.rows_read += 1
        if row.error:
            reject(row.line, row.error, "", row.raw)
            continue
        try:
            prompt, chosen, rejected = _pair_messages(row.data)
            for m in prompt:
                m["content"] = mask_pii(clean_text(m["content"]), pii)
            chosen, rejected = mask_pii(clean_text(chosen), pii), mask_pii(clean_text(rejected), pii)
            check_turns(prompt + [{"role": "assistant", "content": chosen}])
            if not chosen.strip() or not rejected.strip():
                raise RowRejected("empty_answer", "chosen and rejected must both be non-empty")
            if chosen == rejected:
                raise RowRejected("chosen_equals_rejected", "a pair of identical answers teaches nothing")
        except RowRejected as exc:
            reject(row.line, exc.reason, exc.detail, row.raw)
            continue
        if dedup_key(prompt) in held_out:  # (prompt_key drops a final answer; a pair's prompt has none)
            reject(row.line, "harvested_prompt_in_eval_split", "the prompt is an evaluation (test/val) prompt", row.raw)
            continue
        key = hashlib.sha1(json.dumps([prompt, chosen, rejected], ensure_ascii=False).encode()).hexdigest()
        if key in seen:
            count.duplicates += 1
            continue
        longest = max(counter.count([prompt + [{"role": "assistant", "content": a}] for a in (chosen, rejected)]))
        if longest > cutoff:
            reject(row.line, "over_token_budget", f"{longest} tokens > finetune.cutoff_len {cutoff}", row.raw)
            continue
        seen.add(key)
        pairs.append(_Pair(prompt, chosen, rejected, count.file, row.line))
    count.kept += len(pairs)
    return pairs


def _load_feedback(loaded: LoadedConfig, counter: TokenCounter, splits: dict[str, list], counts: list,
                   quarantine: list[dict], stats: Counter, pii: Counter, seen: dict[str, str],
                   seen_norm: dict[str, str]) -> tuple[list["_Kept"], list[_Pair]]:
    """Harvested rows: supervised rows join the training split only (deduplicated against every row read so
    far, weighted by data.feedback.sft_weight) and preference pairs are kept for DPO; a harvested prompt that is a
    test or validation prompt is quarantined, so feedback on the shipped test items never reaches training."""
    fb = loaded.config.data.feedback
    cutoff = loaded.config.finetune.cutoff_len
    held_out = {prompt_key(r.messages) for r in splits["test"] + splits["val"]}
    sft: list[_Kept] = []
    pairs: list[_Pair] = []
    pair_seen: set[str] = set()
    for folder in feedback_dirs(loaded):
        for name in harvest_format.DATA_FILES:
            path = folder / name
            if not path.exists() or path.stat().st_size == 0:
                continue
            key = f"data.feedback[{folder.name}].{name.split('.')[0]}"
            count = SourceCount(_display(path), key, "train", "openai" if name == harvest_format.SFT_FILE else "ranking")
            counts.append(count)
            if name == harvest_format.PREF_FILE:
                pairs += _load_pairs(path, count, counter, cutoff, quarantine, pii, held_out, pair_seen)
                continue
            src = DataSource(path=str(path), format="openai", weight=fb.sft_weight)
            rows = _load_source(src, path, count, counter, cutoff, None, quarantine, pii)
            keep = []
            for r in rows:
                if prompt_key(r.messages) in held_out:
                    count.rejected += 1
                    count.reasons["harvested_prompt_in_eval_split"] += 1
                    quarantine.append({"file": r.file, "line": r.line, "reason": "harvested_prompt_in_eval_split",
                                       "detail": "the prompt is an evaluation (test/val) prompt",
                                       "raw": snippet(json.dumps(r.messages, ensure_ascii=False))})
                else:
                    keep.append(r)
            sft += _dedupe(keep, count, quarantine, stats, seen, seen_norm)
    return sft, pairs


def source_keys(loaded: LoadedConfig) -> list[tuple[str, DataSource]]:
    """(config key, source) of every data source: data.sources[0], ..., data.test_source."""
    cfg = loaded.config.data
    out = [(f"data.sources[{i}]", src) for i, src in enumerate(cfg.sources)]
    return out + ([("data.test_source", cfg.test_source)] if cfg.test_source else [])


def check_source_path(loaded: LoadedConfig, key: str, src: DataSource) -> Path:
    """The source's file, or a PrepareError naming the key, the file (or --set flag) that set it and the fix."""
    path = resolve(src.path)
    # the path's own origin when it was set alone (--set data.test_source.path=...), else its section's
    where = loaded.origin(f"{key}.path") if "[" not in key else loaded.origin(key.split("[")[0])
    suffixes = ".jsonl, .json or .csv"
    if not path.exists():
        raise PrepareError(f"{key}.path = {src.path}: file not found (set in {where}); fix the path there, or "
                           f"remove the source")
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json", ".csv"))[:5]
        hint = f" (it holds {', '.join(files)})" if files else ""
        raise PrepareError(f"{key}.path = {src.path}: is a directory, not a file (set in {where}); list each "
                           f"{suffixes} file{hint} as its own entry of data.sources")
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise PrepareError(f"{key}.path = {src.path}: unsupported file type {path.suffix!r} (set in {where}); "
                           f"use {suffixes}")
    return path


def tokenizer_path(loaded: LoadedConfig) -> str:
    bm = loaded.config.base_model
    if bm.source == "hub":
        return bm.hub_id  # type: ignore[return-value]
    path = resolve(bm.path)
    if not (path / "tokenizer_config.json").exists():
        hint = "run `make base-model`" if bm.source == "build" else "point base_model.path at a model folder"
        raise PrepareError(f"base model tokenizer not found in {bm.path} (needed to count tokens against "
                           f"finetune.cutoff_len): {hint}")
    return str(path)


# ------------------------------------------------------------------------------------------------ core
@dataclass
class _Kept:
    messages: list[dict]
    file: str
    line: int
    weight: float
    category: Optional[str]
    tokens: int = 0


def _display(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@dataclass
class SourceCount:
    """One source's accounting: what was read, kept, rejected (by reason) and dropped as a duplicate."""
    file: str
    key: str  # data.sources[i] or data.test_source
    split: str  # "train+val" (split by the stage) or "test" (the supplied test file)
    format: str
    rows_read: int = 0
    kept: int = 0
    rejected: int = 0
    duplicates: int = 0
    reasons: Counter = field(default_factory=Counter)
    formats_seen: Counter = field(default_factory=Counter)  # what detect_format says of the rows (misdeclared format)

    @property
    def reject_ratio(self) -> float:
        return self.rejected / self.rows_read if self.rows_read else 0.0

    def top_reasons(self, n: int = 3) -> str:
        return ", ".join(f"{r} x{k}" for r, k in self.reasons.most_common(n)) or "none"

    def as_dict(self) -> dict:
        return {"file": self.file, "key": self.key, "split": self.split, "format": self.format,
                "rows_read": self.rows_read, "kept": self.kept, "rejected": self.rejected,
                "duplicates": self.duplicates, "reject_ratio": round(self.reject_ratio, 4),
                "rejected_by_reason": dict(self.reasons.most_common())}


def _load_source(src: DataSource, path: Path, count: SourceCount, counter: TokenCounter, cutoff: int,
                 stratify_by: Optional[str], quarantine: list[dict], pii: Counter) -> list[_Kept]:
    display = count.file
    if path.stat().st_size == 0:
        raise PrepareError(f"{display} ({count.key}): empty file (0 bytes). Remove it from data.sources or fill it.")
    kept: list[_Kept] = []
    pending: list[_Kept] = []

    def reject(row_file: str, line: int, reason: str, detail: str, raw: str) -> None:
        count.rejected += 1
        count.reasons[reason] += 1
        quarantine.append({"file": row_file, "line": line, "reason": reason, "detail": mask_pii(detail),
                           "raw": snippet(raw)})

    def flush() -> None:
        lengths = counter.count([k.messages for k in pending])
        for item, n in zip(pending, lengths):
            if n > cutoff:
                reject(item.file, item.line, "over_token_budget", f"{n} tokens > finetune.cutoff_len {cutoff}",
                       json.dumps(item.messages, ensure_ascii=False))
            else:
                item.tokens = n
                kept.append(item)
        pending.clear()

    for row in read_rows(path, display):
        count.rows_read += 1
        if row.error:
            reject(row.file, row.line, row.error, "", row.raw)
            continue
        detected = detect_format(row.data)
        count.formats_seen[detected or "unknown"] += 1
        fmt = src.format if src.format != "auto" else detected
        try:
            if fmt is None:
                raise RowRejected("unknown_format", "no instruction/output, conversations or messages key; "
                                  "declare the format in data.sources[].format")
            messages = to_messages(row.data, fmt)
            for m in messages:
                m["content"] = mask_pii(clean_text(m["content"]), pii)
            check_turns(messages)
        except RowRejected as exc:
            reject(row.file, row.line, exc.reason, exc.detail, row.raw)
            continue
        category = row.data.get(stratify_by) if stratify_by else None
        pending.append(_Kept(messages, row.file, row.line, src.weight, None if category is None else str(category)))
        if len(pending) >= 2048:
            flush()
    flush()
    if count.rows_read == 0:
        raise PrepareError(f"{display} ({count.key}): no rows (only blank lines). Remove it from data.sources or fill it.")
    return kept


def _dedupe(rows: list[_Kept], count: SourceCount, quarantine: list[dict], stats: Counter, seen: dict[str, str],
            seen_norm: dict[str, str]) -> list[_Kept]:
    out = []
    for r in rows:
        exact = hashlib.sha1(json.dumps(r.messages, ensure_ascii=False).encode()).hexdigest()
        norm = dedup_key(r.messages)
        where = f"{r.file}:{r.line}"
        if exact in seen or norm in seen_norm:
            kind = "duplicate_exact" if exact in seen else "duplicate_normalized"
            detail = f"same as {seen[exact]}" if exact in seen else f"same as {seen_norm[norm]} up to case and whitespace"
            stats[f"duplicates_{kind.split('_')[1]}"] += 1
            count.duplicates += 1
            quarantine.append({"file": r.file, "line": r.line, "reason": kind, "detail": detail,
                               "raw": snippet(json.dumps(r.messages, ensure_ascii=False))})
            continue
        seen[exact] = where
        seen_norm[norm] = where
        out.append(r)
    count.kept += len(out)
    return out


def _unit(seed: int, key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def split_rows(rows: list[_Kept], val_ratio: float, test_ratio: float, seed: int) -> dict[str, list[_Kept]]:
    """Leak-free and deterministic: rows are grouped by their normalised prompt (every answer to one request stays
    in one split). Within each stratum (the group's first row's category), groups are ordered by a seeded hash of
    the prompt and dealt out: test until it holds round(n*test_ratio) rows, then val until round(n*val_ratio),
    the rest to train (a split may overshoot its target by one group's rows)."""
    groups: dict[str, list[_Kept]] = {}
    for r in rows:
        groups.setdefault(prompt_key(r.messages), []).append(r)
    strata: dict[Optional[str], list[str]] = {}
    for key, members in groups.items():
        strata.setdefault(members[0].category, []).append(key)
    out: dict[str, list[_Kept]] = {"train": [], "val": [], "test": []}
    for stratum in sorted(strata, key=lambda k: (k is None, str(k))):
        keys = sorted(strata[stratum], key=lambda k: _unit(seed, k))
        n = sum(len(groups[k]) for k in keys)
        targets = (("test", round(n * test_ratio)), ("val", round(n * val_ratio)))
        i = 0
        for name, target in targets:
            got = 0
            while i < len(keys) and got < target:
                out[name] += groups[keys[i]]
                got += len(groups[keys[i]])
                i += 1
        for k in keys[i:]:
            out["train"] += groups[k]
    for name in out:  # a stable, interleaved order in the written files
        out[name].sort(key=lambda r: _unit(seed + 1, dedup_key(r.messages)))
    return out


def prompt_groups(rows: list[_Kept]) -> int:
    return len({prompt_key(r.messages) for r in rows})


def apply_weights(rows: list[_Kept], seed: int) -> list[_Kept]:
    """Source weights on the training split: 2.0 repeats every row twice, 0.5 keeps a seeded half."""
    out = []
    for r in rows:
        whole, frac = int(r.weight), r.weight - int(r.weight)
        copies = whole + (1 if frac and _unit(seed + 2, dedup_key(r.messages)) < frac else 0)
        out.extend([r] * copies)
    return out


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pct(p: float) -> int:
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {"min": s[0], "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": s[-1], "mean": round(sum(s) / len(s), 1)}


def _write_jsonl(path: Path, rows: list[_Kept]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"messages": r.messages}, ensure_ascii=False) + "\n")


def dataset_info(splits: dict[str, list]) -> dict:
    """LLaMA-Factory's dataset_info.json: sharegpt formatting with OpenAI-style role/content tags."""
    info = {}
    for name, rows in splits.items():
        if not rows:
            continue
        info[name] = {
            "file_name": f"{name}.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                     "assistant_tag": "assistant", "system_tag": "system"},
        }
    return info


def _length_plot(path: Path, lengths: dict[str, list[int]], cutoff: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=40, alpha=0.6, label=f"{name} ({len(values)})")
    ax.axvline(cutoff, color="red", linestyle="--", label=f"cutoff_len {cutoff}")
    ax.set_xlabel("tokens per example (base model tokenizer, chat template)")
    ax.set_ylabel("examples")
    ax.set_title("Example length by split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_sources(counts: list[SourceCount], max_ratio: float) -> None:
    """Per source: a source whose reject ratio exceeds data.max_reject_ratio, or that adds no row at all, fails the
    stage, named with its key, its top reasons and (when the rows look like another format) the format to declare."""
    problems = []
    for c in counts:
        if c.rows_read and (c.reject_ratio > max_ratio or c.kept == 0):
            if c.kept == 0 and c.rejected == 0:
                why = f"all {c.rows_read} rows duplicate earlier rows"
            else:
                why = (f"{c.rejected} of {c.rows_read} rows rejected ({c.reject_ratio:.1%} > data.max_reject_ratio "
                       f"{max_ratio:.1%}), top reasons: {c.top_reasons()}")
            seen = [f for f, _ in c.formats_seen.most_common() if f != "unknown"]
            if c.format != "auto" and seen and seen[0] != c.format:
                why += f"; its rows look like {seen[0]} but {c.key}.format is {c.format} (set it to {seen[0]} or auto)"
            problems.append(f"{c.file} ({c.key}): {why}")
    if problems:
        raise PrepareError("; ".join(problems) + ". Fix the file (or its format), remove it from data.sources, or "
                           "raise data.max_reject_ratio.")


def _write_failed(folder: Path, quarantine: list[dict], counts: list[SourceCount], error: str) -> Path:
    """A failed stage still leaves its evidence: quarantine.jsonl and the per-source counts (masked, like always)."""
    with staging(folder) as tmp:
        with open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as fh:
            for q in quarantine:
                fh.write(json.dumps(q, ensure_ascii=False) + "\n")
        (tmp / "stats.json").write_text(json.dumps({"failed": mask_pii(error), "by_source": [c.as_dict() for c in counts]},
                                                   indent=2, ensure_ascii=False), encoding="utf-8")
    return folder


def prepare_dataset(loaded: LoadedConfig, force: bool = False) -> PreparedDataset:
    """The stage. Returns the processed folder; skips all work when it exists for the same inputs. On failure the
    quarantine and per-source counts are written to <output_dir>/failed-<hash>/ and the error names that folder."""
    cfg = loaded.config
    t0 = time.time()
    counter = TokenCounter(tokenizer_path(loaded))
    digest = inputs_key(loaded, counter.fingerprint)
    out_root = resolve(cfg.data.output_dir)
    final = out_root / digest
    recover(final)
    if final.exists() and not force:
        stats = json.loads((final / "stats.json").read_text(encoding="utf-8"))
        return PreparedDataset(final, files_hash(final), stats, skipped=True,
                               splits={n: final / f"{n}.jsonl" for n in ("train", "val", "test") if (final / f"{n}.jsonl").exists()})
    if cfg.data.test_source and cfg.data.test_ratio:
        raise PrepareError(f"data.test_source and data.test_ratio are both set (in {loaded.origin('data')}): use one "
                           "way to get a test split (set data.test_ratio: 0 when supplying a test file)")

    quarantine: list[dict] = []
    stats: Counter = Counter()
    pii: Counter = Counter()
    seen: dict[str, str] = {}
    seen_norm: dict[str, str] = {}
    cutoff = cfg.finetune.cutoff_len
    rows: list[_Kept] = []
    counts: list[SourceCount] = []
    max_ratio = cfg.data.max_reject_ratio
    try:
        test_src = None
        for key, src in source_keys(loaded):
            path = check_source_path(loaded, key, src)
            count = SourceCount(_display(path), key, "test" if key == "data.test_source" else "train+val", src.format)
            counts.append(count)
            if key == "data.test_source":
                test_src = (src, path, count)
                continue
            loaded_rows = _load_source(src, path, count, counter, cutoff, cfg.data.stratify_by, quarantine, pii)
            rows += _dedupe(loaded_rows, count, quarantine, stats, seen, seen_norm)
        train_counts = [c for c in counts if c.split != "test"]
        _check_sources(train_counts, max_ratio)
        splits = split_rows(rows, cfg.data.val_ratio, cfg.data.test_ratio, cfg.data.seed)
        if test_src:
            src, path, count = test_src
            test_rows = _load_source(src, path, count, counter, cutoff, None, quarantine, pii)
            test_rows = _dedupe(test_rows, count, quarantine, stats, {}, {})
            _check_sources([count], max_ratio)
            train_prompts = {prompt_key(r.messages): f"{r.file}:{r.line}" for r in splits["train"] + splits["val"]}
            overlap = [(r, train_prompts[prompt_key(r.messages)]) for r in test_rows if prompt_key(r.messages) in train_prompts]
            if overlap:
                shown = "; ".join(f"{r.file}:{r.line} = {where}" for r, where in overlap[:5])
                raise PrepareError(f"{len(overlap)} test example(s) from {src.path} also appear in the training data "
                                   f"(same prompt): {shown}. Remove them from one side; a test set that overlaps "
                                   "training measures memory, not generalisation.")
            splits["test"] = test_rows
        feedback_sft, pairs = _load_feedback(loaded, counter, splits, counts, quarantine, stats, pii, seen, seen_norm)
        splits["train"] += feedback_sft
        # every source is under data.max_reject_ratio (checked above), so their sum is too
        rejected = sum(c.rejected for c in train_counts)
        total = sum(c.rows_read for c in train_counts)
        ratio = rejected / total if total else 0.0
        if not splits["train"]:
            raise PrepareError(f"no training rows left after the split ({len(rows)} kept rows all went to val/test); "
                               "lower data.val_ratio / data.test_ratio or add data")
    except PrepareError as exc:
        failed = _write_failed(out_root / f"failed-{digest}", quarantine, counts, str(exc))
        raise PrepareError(f"{exc} Rejected rows and per-source counts: {_display(failed)}/quarantine.jsonl, "
                           "stats.json") from None
    splits["train"] = apply_weights(splits["train"], cfg.data.seed)

    by_reason = Counter()
    for q in quarantine:
        by_reason[q["reason"]] += 1
    test_count = test_src[2] if test_src else None
    lengths = {name: [r.tokens for r in rows_] for name, rows_ in splits.items()}
    stats_out = {
        "inputs_key": digest,
        "content_hash": None,  # files_hash of the folder, filled in once its files are written
        "sources": [s.model_dump(mode="json") for s in cfg.data.sources],
        "test_source": cfg.data.test_source.model_dump(mode="json") if cfg.data.test_source else None,
        "rows_read": total,  # the training sources (split into train/val); the supplied test file is counted apart
        "rows_rejected": rejected,
        "reject_ratio": round(ratio, 4),
        "test_rows_read": test_count.rows_read if test_count else 0,
        "test_rows_rejected": test_count.rejected if test_count else 0,
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "by_source": [c.as_dict() for c in counts],
        "duplicates_exact": stats["duplicates_exact"],
        "duplicates_normalized": stats["duplicates_normalized"],
        "pii_masked": {k: pii.get(k, 0) for k in PII_KINDS},
        "splits": {name: len(r) for name, r in splits.items()},
        "feedback": {"harvests": [d.name for d in feedback_dirs(loaded)], "sft_rows": len(feedback_sft),
                     "preference_pairs": len(pairs)} if cfg.data.feedback.enabled else None,
        "prompt_groups": {name: prompt_groups(r) for name, r in splits.items()},
        "tokens": {name: _percentiles(v) for name, v in lengths.items()},
        "cutoff_len": cutoff,
        "tokenizer": counter.tok.name_or_path,
        "seconds": round(time.time() - t0, 2),
    }

    out_root.mkdir(parents=True, exist_ok=True)
    with staging(final) as tmp:  # --force: the old folder stays whole until the new one replaces it
        for name, rows_ in splits.items():
            if rows_:
                _write_jsonl(tmp / f"{name}.jsonl", rows_)
        info = dataset_info(splits)
        if pairs:
            with open(tmp / "pref_train.jsonl", "w", encoding="utf-8") as fh:
                for pair in pairs:
                    fh.write(json.dumps(pair.ranking_row(), ensure_ascii=False) + "\n")
            info["pref_train"] = {"file_name": "pref_train.jsonl", "formatting": "sharegpt", "ranking": True,
                                  "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                              "system": "system"}}
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        with open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as fh:
            for q in quarantine:
                fh.write(json.dumps(q, ensure_ascii=False) + "\n")
        stats_out["content_hash"] = data_hash = files_hash(tmp)
        (tmp / "stats.json").write_text(json.dumps(stats_out, indent=2, ensure_ascii=False), encoding="utf-8")
        _length_plot(tmp / "length_hist.png", lengths, cutoff)
    shutil.rmtree(out_root / f"failed-{digest}", ignore_errors=True)
    return PreparedDataset(final, data_hash, stats_out, skipped=False,
                           splits={n: final / f"{n}.jsonl" for n, r in splits.items() if r})


def log_to_mlflow(result: PreparedDataset) -> None:
    """Dataset inputs (mlflow.data, digest = content hash), stats as metrics, files as artifacts."""
    import mlflow
    import pandas as pd

    stats = result.stats
    mlflow.log_params({"data.content_hash": result.content_hash, "data.cutoff_len": stats["cutoff_len"],
                       "data.sources": ",".join(s["path"] for s in stats["sources"])})
    metrics = {"data/rows_read": stats["rows_read"], "data/rows_rejected": stats["rows_rejected"],
               "data/reject_ratio": stats["reject_ratio"], "data/duplicates_exact": stats["duplicates_exact"],
               "data/duplicates_normalized": stats["duplicates_normalized"]}
    metrics.update({f"data/{name}_rows": n for name, n in stats["splits"].items()})
    metrics.update({f"data/pii_{k}": v for k, v in stats["pii_masked"].items()})
    metrics.update({f"data/rejected_{re.sub(r'[^A-Za-z0-9_./ -]', '_', k)}"[:250]: v
                    for k, v in stats["rejected_by_reason"].items()})
    for name, pct in stats["tokens"].items():
        metrics.update({f"data/{name}_tokens_{k}": v for k, v in pct.items()})
    mlflow.log_metrics(metrics)
    import warnings

    for name, path in result.splits.items():
        rows = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]
        df = pd.DataFrame({"prompt": [m[-2]["content"] for m in rows], "response": [m[-1]["content"] for m in rows],
                           "turns": [len(m) for m in rows]})
        with warnings.catch_warnings():  # MLflow's schema-inference hints and source-ambiguity notices
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(df, source=str(path), name=f"{result.content_hash}-{name}",
                                         digest=f"{result.content_hash}-{name}"[:36], targets="response")
        mlflow.log_input(ds, context=name)
    for fname in ("stats.json", "dataset_info.json", "quarantine.jsonl", "length_hist.png"):
        if (result.path / fname).exists():
            mlflow.log_artifact(str(result.path / fname), "dataset")
