"""How `make test` hands test files to its pytest-xdist workers (imported by tests/conftest.py; no side effects, so a
probe suite can import it too: tests/test_test_lanes.py)."""
from __future__ import annotations

from pathlib import Path

# Files that share a session fixture, and so must run on one worker: their group's name.
SHARED_WORKER = {"test_api_key.py": "base-server", "test_eval_vllm.py": "base-server"}  # conftest's base_server

# What each group costs on one core, in seconds: the sum of its tests' setup and call times in `--durations=0` of
# `make test` (warm checkout, 2 cores, 2026-12-06). The scheduler hands out the costliest groups first (longest
# processing time first), so that no long group starts while the other worker is about to run out of work. A
# group that is not listed (a fast file) goes after these, the one with the most tests first. Every file with a
# slow test must be listed (tests/test_test_lanes.py checks it); the numbers only decide an order.
COST_S = {
    "test_pipeline.py": 710,  # the cold default pipeline (its fixture) and what runs on its champion: the longest chain
    "test_gpu_smoke.py": 140,  # (about 70 with its QLoRA adapter cached from an earlier run)
    "test_finetune.py": 130,
    "test_loop.py": 127,
    "base-server": 110,
    "test_two_hosts.py": 104,
    "test_serve.py": 75,
    "test_calibrate_gate.py": 75,
    "test_gateway.py": 42,
    "test_doctor.py": 40,
    "test_prepare.py": 26,
    "test_eval.py": 24,
    "test_serving_config.py": 22,
    "test_mlflow_server.py": 21,
    "test_gpu_path.py": 21,
    "test_feedback.py": 19,
    "test_monitoring.py": 15,
    "test_chat_page.py": 14,
    "test_base_model.py": 14,
    "test_registry.py": 14,
    "test_envrunner.py": 13,
    "test_prepare_llamafactory.py": 11,
    "test_rag.py": 8,
    "test_decoding.py": 8,
    "test_gpu_kit.py": 3,
}


def group(nodeid: str) -> str:
    """A node id's group: its file, or the shared group SHARED_WORKER names for the file."""
    file = nodeid.split("::", 1)[0]
    return SHARED_WORKER.get(Path(file).name, file)


def cost(name: str) -> float:
    return COST_S.get(Path(name).name, 0.0)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` (`make test`): each worker runs whole groups, a test file each as with --dist loadfile,
    except the files SHARED_WORKER puts together, the costliest first (COST_S). xdist's own loadgroup (an
    `xdist_group` mark appended to the node id) does nothing under pytest 9, whose node ids no longer come from the
    attribute xdist 3.8 rewrites, so this scheduler groups by the node id's file instead."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return group(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # xdist queued the groups by their number of tests: put the costly ones first
                queue = sorted(self.workqueue.items(), key=lambda item: (-cost(item[0]), -len(item[1])))
                self.workqueue.clear()
                self.workqueue.update(queue)
                self.ordered = True
            super()._assign_work_unit(node)

    return FileGroups(config, log)
