"""Each pytest-xdist worker of `make test` on cores of its own (imported by tests/conftest.py first)."""
from __future__ import annotations

import os


def own_cores_per_worker() -> None:
    """`make test` runs on pytest-xdist workers with LLMOPS_TEST_PIN=1: worker k, and every process it
    starts (LLaMA-Factory, lm-eval, vLLM, the gateway), runs on the k-th share of this machine's cores, with the
    OpenMP/BLAS thread counts set to that share. Two engines left to the scheduler on two cores each spin
    OpenMP threads on both cores and vLLM binds its threads to core 0 in both (the cold pipeline fixture ran past
    its 1500 s timeout that way); each on a core of its own, the lane behaves as two one-core machines side by
    side (docs/BENCHMARKS.md, tests)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("LLMOPS_TEST_PIN") != "1" or not worker.startswith("gw") or count < 2:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < count:
        return  # fewer cores than workers: leave the scheduler to it
    share = cpus[int(worker[2:]) % count::count]
    os.environ["LLMOPS_TEST_CORES"] = ",".join(map(str, cpus))  # what the run had: machine_cores()
    os.sched_setaffinity(0, share)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(len(share))


def machine_cores() -> list[int]:
    """The cores the test run started with: a pinned worker's own affinity is its share, the run's is recorded."""
    recorded = os.environ.get("LLMOPS_TEST_CORES")
    return [int(c) for c in recorded.split(",")] if recorded else sorted(os.sched_getaffinity(0))
