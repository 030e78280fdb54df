"""`make bench-model-key`: what a model's cache key costs on a large base model.

Writes a synthetic local model folder (config, tokenizer, two safetensors shards of real non-zero data, >= 4 GB in
all) in a temporary folder, then times in fresh processes: the workspace's fingerprint (workspace/model_ref.py:
headers, sizes, sampled blocks; first call, then the memoised second call in the same process) against hashing
every byte (what the workspace did before, once per stage). Also checks that the key changes when the weights
are rewritten with other values of the same shape. Writes docs/BENCHMARKS.md (section model-key).

    .venv/bin/python -m llmops bench model-key [--gib 4.2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import update_section

CHUNK = 64 << 20

TIMER = """
import sys, time
from workspace.model_ref import ModelRef
t0 = time.perf_counter(); a = ModelRef("base", sys.argv[1]).fingerprint(); t1 = time.perf_counter()
b = ModelRef("base", sys.argv[1]).fingerprint(); t2 = time.perf_counter()
assert a == b
print(f"{a} {t1 - t0:.4f} {t2 - t1:.6f}")
"""

FULL = """
import hashlib, sys, time
from pathlib import Path
t0 = time.perf_counter(); h = hashlib.sha256()
for f in sorted(Path(sys.argv[1]).iterdir()):
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
print(f"{h.hexdigest()[:16]} {time.perf_counter() - t0:.2f}")
"""


def write_shard(path: Path, n_bytes: int, seed: int) -> None:
    """A valid safetensors file: one BF16 tensor of n_bytes, filled with pseudo-random data (not a sparse file)."""
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "model.weight": {"dtype": "BF16", "shape": [n_bytes // 2], "data_offsets": [0, n_bytes]}}).encode()
    header += b" " * (-len(header) % 8)
    block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        written = 0
        i = 0
        while written < n_bytes:
            n = min(CHUNK, n_bytes - written)
            fh.write(bytes([i % 251]) + block[1:n] if n > 1 else block[:n])  # every chunk differs
            written += n
            i += 1


def synthetic_model(folder: Path, gib: float, seed: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120,
                                                    "num_hidden_layers": 48, "num_attention_heads": 40,
                                                    "num_key_value_heads": 8, "torch_dtype": "bfloat16"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    per_shard = int(gib * (1 << 30) / 2)
    for i in range(2):
        write_shard(folder / f"model-0000{i + 1}-of-00002.safetensors", per_shard, seed + i)
    return sum(f.stat().st_size for f in folder.iterdir())


def run(code: str, folder: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    return out.stdout.split()


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=4.2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-model-key-"))
    try:
        folder = tmp / "model"
        t0 = time.perf_counter()
        size = synthetic_model(folder, args.gib, seed=1)
        print(f"[bench-model-key] wrote {size / (1 << 30):.2f} GiB in {time.perf_counter() - t0:.0f} s")
        cold = drop_page_cache()
        key, first_s, memo_s = run(TIMER, folder)
        cold_full = drop_page_cache()
        _, full_s = run(FULL, folder)
        warm_key, warm_first_s, _ = run(TIMER, folder)  # the pages are cached now
        synthetic_model(folder, args.gib, seed=2)  # same shapes and sizes, other values: a "retrained" model
        other_key, _, _ = run(TIMER, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert key == warm_key
    rows = [("fingerprint, first call" + (" (page cache dropped)" if cold else ""), float(first_s)),
            ("fingerprint, first call (pages cached)", float(warm_first_s)),
            ("fingerprint, again in the same process (memoised)", float(memo_s)),
            ("sha256 of every byte (the old key)" + (" (page cache dropped)" if cold_full else ""), float(full_s))]
    body = (f"A synthetic local model folder of {size / (1 << 30):.2f} GiB (two BF16 safetensors shards of non-zero "
            "data, config, tokenizer), timed in fresh processes.\n\n| what | seconds |\n|---|---|\n"
            + "\n".join(f"| {name} | {s:.4f} |" for name, s in rows)
            + f"\n\nTarget: the key under 1 s: {'met' if float(first_s) < 1 else 'NOT met'} ({float(first_s):.3f} s). "
            f"Rewriting the shards with other values of the same shapes and sizes changed the key: "
            f"{'yes' if other_key != key else 'NO'}. The fingerprint reads each file's size, its safetensors header and "
            "16 blocks of 64 KiB at fixed offsets; a change confined to bytes outside those blocks (a hand-edited "
            "tensor) is not seen, a retrained model (every block changes) is.\n")
    print(body)
    if not args.no_write:
        update_section("model-key", "Model reference: the cache key of a large base model", "make bench-model-key", body)
    return 0 if float(first_s) < 1 and other_key != key else 1

