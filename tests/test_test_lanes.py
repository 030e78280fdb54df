"""`make test` is every test: the fast lane as `make test-fast` runs it, then the tests marked slow (a file per
worker, each worker on cores of its own); `make bench-tests` reports the two runs as one lane (counts summed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.suite import SUMMARY, combined_counts
from workspace.paths import ROOT


def test_make_test_runs_the_fast_lane_then_the_slow_one():
    test = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    fast = subprocess.run(["make", "-n", "test-fast"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    runs = [line for line in test.splitlines() if " -m pytest " in line]
    assert len(runs) == 2 and '-m "not slow"' in runs[0] and "-m slow" in runs[1]
    # the slow lane: one group (a file, or files that share a server) per worker, each worker on its own core
    # (tests/pinning.py reads LLMOPS_TEST_PIN; tests/lanes.py makes the groups)
    workers = 2 if len(os.sched_getaffinity(0)) >= 2 else 0  # nproc: one process on a one-core machine
    assert "LLMOPS_TEST_PIN=1 " in runs[1] and f"-n {workers} --dist loadgroup" in runs[1]
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


PROBE = """import json, os, subprocess, sys
def test_probe():
    child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(os.environ["PROBE_OUT"], os.environ["PYTEST_XDIST_WORKER"]), "w") as f:
        json.dump([sorted(os.sched_getaffinity(0)), child], f)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to give each worker one")
def test_each_slow_lane_worker_and_what_it_starts_run_on_a_core_of_their_own(tmp_path):
    """Two xdist workers under LLMOPS_TEST_PIN=1, with the conftest's first call: disjoint cores, and a process a worker
    starts inherits its core and the one-thread OpenMP setting."""
    suite, out = tmp_path / "suite", tmp_path / "out"
    suite.mkdir(), out.mkdir()
    (suite / "conftest.py").write_text(f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
                                       "from pinning import own_cores_per_worker; own_cores_per_worker()\n")
    for name in ("test_a.py", "test_b.py"):
        (suite / name).write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}  # this test may run on a worker
    env.update({"LLMOPS_TEST_PIN": "1", "PROBE_OUT": str(out), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "xdist", "-p", "no:cacheprovider", "-n", "2",
                           "--dist", "loadfile", "--rootdir", str(suite), str(suite)],
                          cwd=suite, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert set(seen) == {"gw0", "gw1"}
    cores = [set(cpus) for cpus, _ in seen.values()]
    assert all(len(c) == len(os.sched_getaffinity(0)) // 2 for c in cores) and not cores[0] & cores[1]
    for cpus, child in seen.values():
        assert child == f"{cpus} {len(cpus)}"  # the child: the worker's cores, OMP_NUM_THREADS = their number
    # without the switch nothing is pinned
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "xdist", "-p", "no:cacheprovider", "-n", "2",
                           "--rootdir", str(suite), str(suite)], cwd=suite,
                          env={**env, "LLMOPS_TEST_PIN": "0", "OMP_NUM_THREADS": "7"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    unpinned = [json.loads(p.read_text()) for p in out.iterdir()]
    assert all(child.endswith(" 7") and len(cpus) == len(os.sched_getaffinity(0)) for cpus, child in unpinned)


GROUP_PROBE = """import json, os
def test_probe():
    with open(os.path.join(os.environ["PROBE_OUT"], os.path.basename(__file__)), "w") as f:
        json.dump(os.environ["PYTEST_XDIST_WORKER"], f)
"""


def test_files_that_share_a_server_run_on_one_worker(tmp_path):
    """The slow lane's scheduler (tests/lanes.py): the files SHARED_WORKER groups run on one worker, where --dist
    loadfile would give each its own (checked on the same probe suite, so the probe can tell them apart)."""
    from lanes import SHARED_WORKER

    suite, out = tmp_path / "suite", tmp_path / "out"
    suite.mkdir(), out.mkdir()
    (suite / "conftest.py").write_text(f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
                                       "from lanes import pytest_xdist_make_scheduler  # noqa: F401\n")
    shared = [name for name, group in SHARED_WORKER.items() if group == "base-server"]
    assert len(shared) == 2
    for name in shared:
        (suite / name).write_text(GROUP_PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}  # this test may run on a worker
    env.update({"PROBE_OUT": str(out), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    workers = {}
    for dist in ("loadfile", "loadgroup"):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "xdist", "-p", "no:cacheprovider", "-n", "2",
                               "--dist", dist, "--rootdir", str(suite), str(suite)],
                              cwd=suite, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        workers[dist] = {json.loads((out / name).read_text()) for name in shared}
    assert len(workers["loadfile"]) == 2 and len(workers["loadgroup"]) == 1
