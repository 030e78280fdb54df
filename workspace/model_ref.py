"""One reference to a model for every stage: a base (local folder or hub id + revision) and an optional LoRA
adapter folder, with one memoised fingerprint whose cost does not grow with the model's size.

The fingerprint of a folder reads, per weight file, its size, its safetensors header (names, dtypes, shapes,
offsets: a few KB) and SAMPLES 64 KiB blocks at fixed offsets; small files (tokenizer, config, a LoRA adapter
below 64 MiB) are hashed whole. A retrained model changes every block, so sampling tells two trainings apart
while a 65 GB base costs a few dozen reads instead of 65 GB of hashing. A hub model is keyed by the snapshot
commit found in the local Hugging Face cache (the user's HF_HOME / HF_HUB_CACHE), else by the configured revision.
Used by finetune/ (run key, manifest), eval/ (evaluation cache), serving/ and flows/.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from workspace.config import LoadedConfig
from workspace.paths import resolve

WHOLE_FILE_LIMIT = 64 << 20  # files up to this size are hashed whole
BLOCK = 64 << 10
SAMPLES = 16  # blocks sampled per large file, evenly spaced (first and last included)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
META_SUFFIXES = (".json", ".model", ".jinja", ".txt", ".py", ".tiktoken")
# records of how a folder was made, not what the model computes: a rebuild that writes the same weights (or a
# training that reports another runtime) must keep the fingerprint, and with it every cached result built on it
BUILD_RECORDS = frozenset({"manifest.json", "base_model_card.json", "pretrain_loss.json", "trainer_state.json",
                           "all_results.json", "train_results.json", "eval_results.json", "method_report.json",
                           "verification.json", "training_args.bin"})


class ModelNotFound(RuntimeError):
    """The configured model folder does not exist or is incomplete; the message says which key to fix."""


_MEMO: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> digest of one file, for this process


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _MEMO:
        return _MEMO[key]
    h = hashlib.sha256(f"{path.name}:{st.st_size}".encode())
    with open(path, "rb") as fh:
        if st.st_size <= WHOLE_FILE_LIMIT:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        else:
            if path.suffix == ".safetensors":  # the header: every tensor's name, dtype, shape and offsets
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(min(n, 100 << 20)))
            last = st.st_size - BLOCK
            for i in range(SAMPLES):
                fh.seek(last * i // (SAMPLES - 1))
                h.update(fh.read(BLOCK))
    _MEMO[key] = h.hexdigest()
    return _MEMO[key]


def folder_fingerprint(path: Path) -> str:
    """Digest of a model or adapter folder's weight, config and tokenizer files (not its checkpoints, logs or the
    records of its build: BUILD_RECORDS)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.suffix in META_SUFFIXES) and f.name not in BUILD_RECORDS:
            h.update(f.name.encode())
            h.update(_file_digest(f).encode())
    return h.hexdigest()[:16]


def hub_revision(hub_id: str, revision: Optional[str]) -> str:
    """The commit of the hub snapshot that will be loaded: resolved in the local HF cache when it is there."""
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = revision or "main"
    folder = Path(os.environ.get("HF_HUB_CACHE") or HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
    refs = folder / "refs" / ref
    if refs.is_file():
        return refs.read_text().strip()
    if (folder / "snapshots" / ref).is_dir():  # the revision is a commit already
        return ref
    return ref


@dataclass(frozen=True)
class ModelRef:
    """What is trained on, evaluated, served: `base` (a folder or a hub id), `revision` (hub only), an optional
    `adapter` folder, and a `name` that labels results (base, candidate, champion-v3)."""

    name: str
    base: str
    adapter: Optional[str] = None
    revision: Optional[str] = None
    hub: bool = False

    def with_adapter(self, name: str, adapter: Optional[str]) -> "ModelRef":
        return ModelRef(name, self.base, adapter, self.revision, self.hub)

    def base_fingerprint(self) -> str:
        if self.hub:
            return f"hub:{self.base}@{hub_revision(self.base, self.revision)}"
        return f"sha256:{folder_fingerprint(Path(self.base))}"

    def fingerprint(self) -> str:
        """Base + adapter; computed from headers, sizes and sampled blocks (memoised per file)."""
        parts = {"base": self.base_fingerprint(),
                 "adapter": folder_fingerprint(Path(self.adapter)) if self.adapter else None}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def adapter_rank(adapter: str | Path) -> int:
    """The LoRA rank `r` a PEFT adapter folder was trained with (its adapter_config.json): what vLLM's
    --max-lora-rank must cover. Read from the adapter, not from finetune.lora_rank: an adapter continued from the
    champion's (finetune.init_adapter) keeps the champion's rank whatever the config says now."""
    path = Path(adapter) / "adapter_config.json"
    try:
        r = json.loads(path.read_text(encoding="utf-8"))["r"]
    except FileNotFoundError:
        raise ModelNotFound(f"{path} does not exist: {adapter} is not a LoRA adapter folder (a finished finetune "
                            "run's, or a registered version's adapter/)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ModelNotFound(f"{path}: no LoRA rank `r` in it (PEFT writes one); the folder is not a LoRA adapter") from None
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ModelNotFound(f"{path}: r = {r!r} is not a positive integer rank")
    return r


def base_model(loaded: LoadedConfig, name: str = "base") -> ModelRef:
    """The configured base model. Raises ModelNotFound naming the key and the fix when a local folder is missing."""
    bm = loaded.config.base_model
    if bm.source == "hub":
        return ModelRef(name, bm.hub_id, revision=bm.revision, hub=True)  # type: ignore[arg-type]
    path = resolve(bm.path)
    if not (path / "config.json").exists():
        hint = "run `make base-model`" if bm.source == "build" else "set base_model.path to a model folder"
        raise ModelNotFound(f"base model not found: base_model.path {bm.path} has no config.json; {hint}")
    return ModelRef(name, str(path))
