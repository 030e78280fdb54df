"""The harvest folder's format, defined once: what `make harvest` (serving/gateway/harvest.py) writes and the
prepare stage (finetune/prepare.py) reads. Both sides import these names; neither spells a file name itself.

    <data.feedback.dir>/<date>[.n]/
        sft.jsonl      OpenAI messages rows: an answer rated up, a corrected answer (each with its context)
        pref.jsonl     LLaMA-Factory's ranking rows: conversations + chosen + rejected [+ system]
        manifest.json  written last: counts, time range, registry versions, skipped rows, each file's SHA-256

A folder without manifest.json is an unfinished harvest and is never read.
"""
from __future__ import annotations

from pathlib import Path

SFT_FILE = "sft.jsonl"
PREF_FILE = "pref.jsonl"
MANIFEST = "manifest.json"
DATA_FILES = (SFT_FILE, PREF_FILE)  # in the order the prepare stage reads them


def finished_harvests(root: Path) -> list[Path]:
    """The finished harvest folders under `root` (those with a manifest), oldest first; [] when root is missing."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists())
