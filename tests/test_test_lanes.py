"""`make test` is every test in one run: a test file per worker (files that share a server together), the costliest
first, each worker on cores of its own; `make test-fast` leaves out the tests marked slow."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pinning import machine_cores
from workspace.paths import ROOT

CORES = machine_cores()  # the run's cores, also inside a pinned worker of `make test`


def _all_cores() -> None:  # a child of a pinned worker gets the run's cores back, as `make` would have them
    os.sched_setaffinity(0, CORES)


def test_make_test_runs_every_test_in_one_pinned_run():
    test = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          preexec_fn=_all_cores).stdout
    fast = subprocess.run(["make", "-n", "test-fast"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    [run] = [line for line in test.splitlines() if " -m pytest " in line]
    assert " -m slow" not in run and "not slow" not in run  # every test
    # one group (a file, or files that share a server) per worker, each worker on its own core (tests/pinning.py
    # reads LLMOPS_TEST_PIN; tests/lanes.py makes the groups and their order)
    workers = 2 if len(CORES) >= 2 else 0  # nproc: one process on a one-core machine
    assert "LLMOPS_TEST_PIN=1 " in run and f"-n {workers} --dist loadgroup" in run
    assert "lint-imports" in test and "lint-imports" in fast
    [fast_run] = [line for line in fast.splitlines() if " -m pytest " in line]
    assert '-m "not slow"' in fast_run


def test_bench_tests_reads_pytests_own_summary():
    from benchmarks.suite import SUMMARY

    out = "....\n===== 450 passed, 7 warnings in 1065.20s (0:17:45) =====\n"
    assert SUMMARY.findall(out) == [("450 passed, 7 warnings", "1065.20")]
    assert not SUMMARY.findall("==== 1 failed, 449 passed in 1000.00s ====\n")  # a failed run is not a timing


def test_every_file_with_a_slow_test_has_a_cost_for_the_scheduler():
    """tests/lanes.py orders the groups by COST_S: a file of slow tests left out of it would be handed out among the
    fast files, possibly last, while the other worker idles."""
    from lanes import COST_S, SHARED_WORKER

    slow = {p.name for p in (ROOT / "tests").glob("test_*.py")
            if re.search(r"pytest\.mark\.slow|pytestmark = pytest\.mark\.slow", p.read_text(encoding="utf-8"))}
    assert slow and "test_pipeline.py" in slow
    assert not {name for name in slow if SHARED_WORKER.get(name, name) not in COST_S}


def _probe_suite(tmp_path, files: dict[str, str], conftest: str, *pytest_args: str, env: dict | None = None,
                 **run) -> Path:
    """A throwaway test suite (`files`: name -> source, with `conftest`'s line after the path to tests/), run by a
    nested pytest with xdist and `pytest_args`; returns the folder its probes write to (PROBE_OUT)."""
    suite, out = tmp_path / "suite", tmp_path / "out"
    suite.mkdir(exist_ok=True), out.mkdir(exist_ok=True)
    (suite / "conftest.py").write_text(f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n{conftest}\n")
    for name, source in files.items():
        (suite / name).write_text(source)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}  # this test may run on a worker
    base.update({"PROBE_OUT": str(out), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    base.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "xdist", "-p", "no:cacheprovider", *pytest_args,
                           "--rootdir", str(suite), str(suite)], cwd=suite, env=base, capture_output=True, text=True,
                          timeout=120, **run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


PROBE = """import json, os, subprocess, sys
def test_probe():
    child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(os.environ["PROBE_OUT"], os.environ["PYTEST_XDIST_WORKER"]), "w") as f:
        json.dump([sorted(os.sched_getaffinity(0)), child], f)
"""


PIN = "from pinning import own_cores_per_worker; own_cores_per_worker()"
LANES = "from lanes import pytest_xdist_make_scheduler  # noqa: F401"


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores to give each worker one")
def test_each_slow_lane_worker_and_what_it_starts_run_on_a_core_of_their_own(tmp_path):
    """Two xdist workers under LLMOPS_TEST_PIN=1, with the conftest's first call: disjoint cores, and a process a worker
    starts inherits its core and the one-thread OpenMP setting."""
    files = {"test_a.py": PROBE, "test_b.py": PROBE}
    out = _probe_suite(tmp_path, files, PIN, "-n", "2", "--dist", "loadfile", env={"LLMOPS_TEST_PIN": "1"},
                       preexec_fn=_all_cores)
    seen = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert set(seen) == {"gw0", "gw1"}
    cores = [set(cpus) for cpus, _ in seen.values()]
    assert all(len(c) == len(CORES) // 2 for c in cores) and not cores[0] & cores[1]
    for cpus, child in seen.values():
        assert child == f"{cpus} {len(cpus)}"  # the child: the worker's cores, OMP_NUM_THREADS = their number
    # without the switch nothing is pinned
    out = _probe_suite(tmp_path, files, PIN, "-n", "2", env={"LLMOPS_TEST_PIN": "0", "OMP_NUM_THREADS": "7"},
                       preexec_fn=_all_cores)
    unpinned = [json.loads(p.read_text()) for p in out.iterdir()]
    assert all(child.endswith(" 7") and len(cpus) == len(CORES) for cpus, child in unpinned)


GROUP_PROBE = """import json, os
def test_probe():
    with open(os.path.join(os.environ["PROBE_OUT"], os.path.basename(__file__)), "w") as f:
        json.dump(os.environ["PYTEST_XDIST_WORKER"], f)
"""


def test_files_that_share_a_server_run_on_one_worker(tmp_path):
    """make test's scheduler (tests/lanes.py): the files SHARED_WORKER groups run on one worker, where --dist
    loadfile would give each its own (checked on the same probe suite, so the probe can tell them apart)."""
    from lanes import SHARED_WORKER

    shared = [name for name, group in SHARED_WORKER.items() if group == "base-server"]
    assert len(shared) == 2
    workers = {}
    for dist in ("loadfile", "loadgroup"):
        out = _probe_suite(tmp_path, {name: GROUP_PROBE for name in shared}, LANES, "-n", "2", "--dist", dist)
        workers[dist] = {json.loads((out / name).read_text()) for name in shared}
    assert len(workers["loadfile"]) == 2 and len(workers["loadgroup"]) == 1


ORDER_PROBE = """import os
def test_probe_{i}():
    with open(os.path.join(os.environ["PROBE_OUT"], "order"), "a") as f:
        f.write(os.path.basename(__file__) + " ")
"""


def test_the_costliest_group_goes_out_first(tmp_path):
    """The cold pipeline's file holds fewer tests than many fast files; xdist's own order (by number of tests) would
    start it after them. tests/lanes.py's order (COST_S) starts it first."""
    files = {"test_pipeline.py": ORDER_PROBE.format(i=0),
             "test_many.py": "".join(ORDER_PROBE.format(i=i) for i in range(5))}
    firsts = {}
    for dist in ("loadfile", "loadgroup"):
        (tmp_path / "out" / "order").unlink(missing_ok=True)
        out = _probe_suite(tmp_path, files, LANES, "-n", "1", "--dist", dist)
        firsts[dist] = (out / "order").read_text().split()[0]
    assert firsts == {"loadfile": "test_many.py", "loadgroup": "test_pipeline.py"}
