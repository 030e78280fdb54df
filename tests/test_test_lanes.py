"""`make test` is every test: the fast lane as `make test-fast` runs it, then the tests marked slow; `make
bench-tests` reports the two runs as one lane (counts summed)."""
from __future__ import annotations

import subprocess

from benchmarks.suite import SUMMARY, combined_counts
from workspace.paths import ROOT


def test_make_test_runs_the_fast_lane_then_the_slow_one():
    test = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    fast = subprocess.run(["make", "-n", "test-fast"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    runs = [line for line in test.splitlines() if " -m pytest " in line]
    assert len(runs) == 2 and '-m "not slow"' in runs[0] and "-m slow" in runs[1]
    assert runs[0].split(" || ")[0] in fast  # the same fast lane, on the same workers
    assert "lint-imports" in test


def test_the_two_runs_are_reported_as_one_lane():
    out = ("==== 375 passed, 69 deselected, 5 warnings in 150.20s (0:02:30) ====\n"
           "===== 68 passed, 1 failed, 375 deselected, 1 warning in 1903.88s (0:31:43) =====\n")
    summaries = SUMMARY.findall(out)
    assert [float(s) for _, s in summaries] == [150.20, 1903.88]
    assert combined_counts([c for c, _ in summaries]) == "443 passed, 6 warnings, 1 failed"
    assert combined_counts(["372 passed, 5 warnings"]) == "372 passed, 5 warnings"
    assert combined_counts(["2 passed, 3 deselected"]) == "2 passed, 3 deselected"  # one run: kept as pytest said
