"""Which slow-lane tests run on one pytest-xdist worker (imported by tests/conftest.py; no side effects, so a probe
suite can import it too: tests/test_test_lanes.py)."""
from __future__ import annotations

from pathlib import Path

# Files that share a session fixture, and so must run on one worker: their group's name.
SHARED_WORKER = {"test_api_key.py": "base-server", "test_eval_vllm.py": "base-server"}  # conftest's base_server


def pytest_xdist_make_scheduler(config, log):
    """The slow lane (`--dist loadgroup`) hands each worker whole groups: a test file is a group, as with --dist
    loadfile, except the files SHARED_WORKER puts together. xdist's own loadgroup (an `xdist_group` mark appended to
    the node id) does nothing under pytest 9, whose node ids no longer come from the attribute xdist 3.8 rewrites, so
    this scheduler groups by the node id's file instead. The group with the most tests goes out first (xdist's
    scope order)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return SHARED_WORKER.get(Path(file).name, file)

    return FileGroups(config, log)
