"""docs/BENCHMARKS.md, the one place measured numbers live: each benchmark command rewrites its own section
(between `<!-- bench:NAME -->` markers) with its numbers, the machine and the command that reproduces them."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from workspace.paths import ROOT

DOC = ROOT / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery number here was written by the command shown beside it; rerun the command to refresh it.\n"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def update_section(name: str, title: str, command: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section `name` of docs/BENCHMARKS.md, atomically."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = (f"{start}\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}  \n"
               f"Measured: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit()}\n\n{body.strip()}\n{end}")
    text = doc.read_text(encoding="utf-8") if doc.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(doc)
