"""`make bench-tests`: how long `make test-fast` and `make test` take on this machine, in the order pytest-randomly drew.

Runs `make test-fast` (and, with --full, `make test`) as a developer would, times each from the shell's point of
view (setup check and import contracts included), reads pytest's own summary (passed, deselected, seconds) and
the random seed, and writes docs/BENCHMARKS.md (section tests). A lane that fails writes nothing and exits 1.
Tests themselves never assert times; this is where the times live.

    .venv/bin/python -m llmops bench suite [--full]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

from benchmarks.report import update_section
from workspace.paths import CACHE, ROOT

SUMMARY = re.compile(r"^=*\s*(\d+ passed.*?) in ([\d.]+)s", re.M)
SEED = re.compile(r"--randomly-seed=(\d+)")


TARGETS_S = {"test-fast": 120, "test": 15 * 60}  # issue 27: under 2 and under 15 minutes on 2 cores


def run_lane(target: str) -> dict:
    t0 = time.monotonic()
    proc = subprocess.run(["make", target], cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    log = CACHE / f"bench-tests-{target}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(out, encoding="utf-8")
    summary = SUMMARY.findall(out)
    if proc.returncode != 0 or not summary:
        print("\n".join(l for l in out.splitlines() if l.startswith(("FAILED", "ERROR")))[-4000:], file=sys.stderr)
        raise SystemExit(f"[bench-tests] `make {target}` failed (exit {proc.returncode}); full output: {log}")
    counts, seconds = summary[-1]  # one pytest run per target
    return {"target": target, "wall_s": wall, "pytest_s": float(seconds), "counts": counts,
            "seed": ", ".join(SEED.findall(out)) or "-"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also time `make test` (everything, as CI runs it)")
    args = ap.parse_args(argv)
    lanes = [run_lane("test-fast")] + ([run_lane("test")] if args.full else [])
    def verdict(lane: dict) -> str:
        limit = TARGETS_S[lane["target"]]
        return f"< {limit / 60:.0f} min: {'meets' if lane['wall_s'] < limit else 'MISSES'}"

    rows = "\n".join(f"| `make {l['target']}` | {l['wall_s'] / 60:.1f} min ({l['wall_s']:.0f} s) | {l['pytest_s']:.0f} s | "
                     f"{l['counts']} | {l['seed']} | {verdict(l)} |" for l in lanes)
    body = ("Wall time of each lane as a developer runs it (environments current; the setup check and the import "
            "contracts included), pytest's own time, its counts and the random order's seed (`PYTEST_ARGS=--randomly-"
            "seed=N` repeats it). Targets (issue 27): `make test-fast` under 2 min, `make test` under 15 min.\n\n"
            "| lane | wall | pytest | result | seed | target |\n|---|---|---|---|---|---|\n" + rows + "\n")
    print(body)
    update_section("tests", "Test lanes: make test-fast and make test", "make bench-tests" + ("  (--full)" if args.full else ""),
                   body)
    return 0

