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

from workspace.config import DataSource, LoadedConfig
from workspace.paths import ROOT, resolve

PREPARE_VERSION = "1"  # bump when the output of this module changes for the same inputs
QUARANTINE_SNIPPET = 300  # characters of the (masked) raw row kept in quarantine.jsonl
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}


class PrepareError(RuntimeError):
    """The stage refuses its inputs; the message names the file/row/key and says how to fix it."""


# ------------------------------------------------------------------------------------------------ PII
# Order matters: resident registration numbers and card numbers before phone numbers.
PII_PATTERNS: list[tuple[str, str, re.Pattern]] = [
    ("email", "<EMAIL>", re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")),
    ("rrn", "<RRN>", re.compile(r"(?<!\d)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\s?-\s?[1-8]\d{6}(?!\d)")),
    ("card", "<CARD>", re.compile(r"(?<!\d)\d{4}(?:[ \-]?\d{4}){3}(?!\d)")),
    ("phone_mobile", "<PHONE>", re.compile(r"(?<!\d)(?:\+82[ \-]?1[016789]|01[016789])[ \-.]?\d{3,4}[ \-.]?\d{4}(?!\d)")),
    ("phone_landline", "<PHONE>", re.compile(
        r"(?<!\d)(?:\+82[ \-]?(?:2|[3-6][1-5])|02|0[3-6][1-5]|070)[ \-.)]?\d{3,4}[ \-.]?\d{4}(?!\d)")),
]


def mask_pii(text: str, counts: Counter | None = None) -> str:
    for kind, placeholder, pattern in PII_PATTERNS:
        text, n = pattern.subn(placeholder, text)
        if n and counts is not None:
            counts[kind] += n
    return text


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
    raw: str = ""


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
                                 raw=f"byte {exc.start}: " + raw.decode("utf-8", "replace")[:QUARANTINE_SNIPPET])
                    continue
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield RawRow(display, no, error="unparsable_json", raw=f"{exc.msg} at column {exc.colno}: {text[:QUARANTINE_SNIPPET]}")
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
                yield RawRow(display, no, error="csv_extra_columns", raw=str(record)[:QUARANTINE_SNIPPET])
                continue
            data = {}
            for key, value in record.items():
                if key in ("conversations", "messages", "history") and value and value.strip().startswith("["):
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        pass
                data[key] = value
            yield RawRow(display, no, data=data, raw=json.dumps(data, ensure_ascii=False)[:QUARANTINE_SNIPPET])
    else:
        raise PrepareError(f"{display}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")


def _object_row(display: str, no: int, data: Any, text: str) -> RawRow:
    raw = text or json.dumps(data, ensure_ascii=False)
    if not isinstance(data, dict):
        return RawRow(display, no, error="not_an_object", raw=raw[:QUARANTINE_SNIPPET])
    return RawRow(display, no, data=data, raw=raw[:QUARANTINE_SNIPPET])


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
            raise RowRejected(f"unknown_role:{role}", f"turn {i}; allowed: {', '.join(sorted(role_map))}")
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
        files = sorted(Path(self.tok.name_or_path).glob("tokenizer*.json")) if Path(self.tok.name_or_path).exists() else []
        h = hashlib.sha256(self.tok.name_or_path.encode())
        for f in files:
            h.update(f.read_bytes())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- result
@dataclass
class PreparedDataset:
    path: Path
    content_hash: str
    stats: dict
    skipped: bool  # True when the folder already existed (same inputs)
    splits: dict[str, Path] = field(default_factory=dict)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(loaded: LoadedConfig, tokenizer_fingerprint: str) -> str:
    cfg = loaded.config
    h = hashlib.sha256()
    data_cfg = cfg.data.model_dump(mode="json")
    data_cfg.pop("output_dir")
    h.update(json.dumps({"data": data_cfg, "cutoff_len": cfg.finetune.cutoff_len, "tokenizer": tokenizer_fingerprint,
                         "version": PREPARE_VERSION, "code": _file_sha(Path(__file__))}, sort_keys=True).encode())
    sources = list(cfg.data.sources) + ([cfg.data.test_source] if cfg.data.test_source else [])
    for src in sources:
        path = resolve(src.path)
        if not path.exists():
            raise PrepareError(f"data source {src.path}: file not found (config key data.sources / data.test_source); "
                               "fix the path in configs/pipeline.yaml")
        h.update(src.path.encode())
        h.update(_file_sha(path).encode())
    return h.hexdigest()[:16]


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


def _load_source(src: DataSource, counter: TokenCounter, cutoff: int, stratify_by: Optional[str],
                 quarantine: list[dict], stats: Counter, pii: Counter) -> list[_Kept]:
    path = resolve(src.path)
    display = _display(path)
    if path.stat().st_size == 0:
        raise PrepareError(f"{display}: empty file (0 bytes). Remove it from data.sources or fill it.")
    kept: list[_Kept] = []
    pending: list[_Kept] = []
    n_rows = 0

    def reject(row_file: str, line: int, reason: str, detail: str, raw: str) -> None:
        stats[f"rejected:{reason.split(':')[0]}"] += 1
        quarantine.append({"file": row_file, "line": line, "reason": reason, "detail": mask_pii(detail),
                           "raw": mask_pii(raw)})

    def flush() -> None:
        lengths = counter.count([k.messages for k in pending])
        for item, n in zip(pending, lengths):
            if n > cutoff:
                reject(item.file, item.line, "over_token_budget", f"{n} tokens > finetune.cutoff_len {cutoff}",
                       json.dumps(item.messages, ensure_ascii=False)[:QUARANTINE_SNIPPET])
            else:
                item.tokens = n
                kept.append(item)
        pending.clear()

    for row in read_rows(path, display):
        n_rows += 1
        if row.error:
            reject(row.file, row.line, row.error, "", row.raw)
            continue
        fmt = src.format if src.format != "auto" else detect_format(row.data)
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
    if n_rows == 0:
        raise PrepareError(f"{display}: no rows (only blank lines). Remove it from data.sources or fill it.")
    stats["rows_read"] += n_rows
    return kept


def _dedupe(rows: list[_Kept], quarantine: list[dict], stats: Counter, seen: dict[str, str],
            seen_norm: dict[str, str]) -> list[_Kept]:
    out = []
    for r in rows:
        exact = hashlib.sha1(json.dumps(r.messages, ensure_ascii=False).encode()).hexdigest()
        norm = dedup_key(r.messages)
        where = f"{r.file}:{r.line}"
        if exact in seen:
            stats["duplicates_exact"] += 1
            quarantine.append({"file": r.file, "line": r.line, "reason": "duplicate_exact", "detail": f"same as {seen[exact]}",
                               "raw": json.dumps(r.messages, ensure_ascii=False)[:QUARANTINE_SNIPPET]})
            continue
        if norm in seen_norm:
            stats["duplicates_normalized"] += 1
            quarantine.append({"file": r.file, "line": r.line, "reason": "duplicate_normalized",
                               "detail": f"same as {seen_norm[norm]} up to case and whitespace",
                               "raw": json.dumps(r.messages, ensure_ascii=False)[:QUARANTINE_SNIPPET]})
            continue
        seen[exact] = where
        seen_norm[norm] = where
        out.append(r)
    return out


def _unit(seed: int, key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def split_rows(rows: list[_Kept], val_ratio: float, test_ratio: float, seed: int) -> dict[str, list[_Kept]]:
    """Deterministic: within each stratum, rows ordered by a seeded hash of their content; the first
    round(n*test_ratio) go to test, the next round(n*val_ratio) to val, the rest to train."""
    strata: dict[Optional[str], list[_Kept]] = {}
    for r in rows:
        strata.setdefault(r.category, []).append(r)
    out: dict[str, list[_Kept]] = {"train": [], "val": [], "test": []}
    for key in sorted(strata, key=lambda k: (k is None, str(k))):
        group = sorted(strata[key], key=lambda r: _unit(seed, dedup_key(r.messages)))
        n_test, n_val = round(len(group) * test_ratio), round(len(group) * val_ratio)
        out["test"] += group[:n_test]
        out["val"] += group[n_test:n_test + n_val]
        out["train"] += group[n_test + n_val:]
    for name in out:  # a stable, interleaved order in the written files
        out[name].sort(key=lambda r: _unit(seed + 1, dedup_key(r.messages)))
    return out


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


def prepare_dataset(loaded: LoadedConfig, force: bool = False) -> PreparedDataset:
    """The stage. Returns the processed folder; skips all work when it exists for the same inputs."""
    cfg = loaded.config
    t0 = time.time()
    counter = TokenCounter(tokenizer_path(loaded))
    digest = content_hash(loaded, counter.fingerprint)
    out_root = resolve(cfg.data.output_dir)
    final = out_root / digest
    if final.exists() and not force:
        stats = json.loads((final / "stats.json").read_text(encoding="utf-8"))
        return PreparedDataset(final, digest, stats, skipped=True,
                               splits={n: final / f"{n}.jsonl" for n in ("train", "val", "test") if (final / f"{n}.jsonl").exists()})
    if cfg.data.test_source and cfg.data.test_ratio:
        raise PrepareError("data.test_source and data.test_ratio are both set: use one way to get a test split "
                           "(set data.test_ratio: 0 when supplying a test file)")

    quarantine: list[dict] = []
    stats: Counter = Counter()
    pii: Counter = Counter()
    seen: dict[str, str] = {}
    seen_norm: dict[str, str] = {}
    cutoff = cfg.finetune.cutoff_len
    rows: list[_Kept] = []
    for src in cfg.data.sources:
        loaded_rows = _load_source(src, counter, cutoff, cfg.data.stratify_by, quarantine, stats, pii)
        rows += _dedupe(loaded_rows, quarantine, stats, seen, seen_norm)
    splits = split_rows(rows, cfg.data.val_ratio, cfg.data.test_ratio, cfg.data.seed)

    if cfg.data.test_source:
        test_rows = _load_source(cfg.data.test_source, counter, cutoff, None, quarantine, stats, pii)
        test_rows = _dedupe(test_rows, quarantine, stats, {}, {})
        train_prompts = {prompt_key(r.messages): f"{r.file}:{r.line}" for r in splits["train"] + splits["val"]}
        overlap = [(r, train_prompts[prompt_key(r.messages)]) for r in test_rows if prompt_key(r.messages) in train_prompts]
        if overlap:
            shown = "; ".join(f"{r.file}:{r.line} = {where}" for r, where in overlap[:5])
            raise PrepareError(f"{len(overlap)} test example(s) from {cfg.data.test_source.path} also appear in the "
                               f"training data (same prompt): {shown}. Remove them from one side; a test set that "
                               "overlaps training measures memory, not generalisation.")
        splits["test"] = test_rows
    splits["train"] = apply_weights(splits["train"], cfg.data.seed)

    rejected = sum(v for k, v in stats.items() if k.startswith("rejected:"))
    duplicates = stats["duplicates_exact"] + stats["duplicates_normalized"]
    total = stats["rows_read"]
    ratio = rejected / total if total else 0.0
    by_reason = Counter()
    for q in quarantine:
        by_reason[q["reason"]] += 1
    if ratio > cfg.data.max_reject_ratio:
        examples = "; ".join([f"{q['file']}:{q['line']} {q['reason']}" for q in quarantine
                              if not q["reason"].startswith("duplicate")][:5])
        raise PrepareError(
            f"{rejected} of {total} rows rejected ({ratio:.1%} > data.max_reject_ratio {cfg.data.max_reject_ratio:.1%}). "
            f"By reason: {dict(by_reason)}. First: {examples}. Fix the source files, or raise data.max_reject_ratio.")
    if not splits["train"]:
        raise PrepareError("no training rows survived validation; see the reasons above")

    lengths = {name: [r.tokens for r in rows_] for name, rows_ in splits.items()}
    stats_out = {
        "content_hash": digest,
        "sources": [s.model_dump(mode="json") for s in cfg.data.sources],
        "test_source": cfg.data.test_source.model_dump(mode="json") if cfg.data.test_source else None,
        "rows_read": total,
        "rows_rejected": rejected,
        "reject_ratio": round(ratio, 4),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "duplicates_exact": stats["duplicates_exact"],
        "duplicates_normalized": stats["duplicates_normalized"],
        "pii_masked": {k: pii.get(k, 0) for k, _, _ in PII_PATTERNS},
        "splits": {name: len(r) for name, r in splits.items()},
        "tokens": {name: _percentiles(v) for name, v in lengths.items()},
        "cutoff_len": cutoff,
        "tokenizer": counter.tok.name_or_path,
        "seconds": round(time.time() - t0, 2),
    }

    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".tmp-{digest}-{int(time.time() * 1000)}"
    tmp.mkdir()
    try:
        for name, rows_ in splits.items():
            if rows_:
                _write_jsonl(tmp / f"{name}.jsonl", rows_)
        (tmp / "dataset_info.json").write_text(json.dumps(dataset_info(splits), indent=2), encoding="utf-8")
        with open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as fh:
            for q in quarantine:
                fh.write(json.dumps(q, ensure_ascii=False) + "\n")
        (tmp / "stats.json").write_text(json.dumps(stats_out, indent=2, ensure_ascii=False), encoding="utf-8")
        _length_plot(tmp / "length_hist.png", lengths, cutoff)
        if final.exists():  # --force: replace the old folder only after the new one is complete
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedDataset(final, digest, stats_out, skipped=False,
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
    metrics.update({f"data/rejected_{k.replace(':', '_')}": v for k, v in stats["rejected_by_reason"].items()})
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
