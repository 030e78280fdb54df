"""One writer at a time in a workspace: an advisory file lock (flock) around every stage that writes.

Two `make pipeline` (or a pipeline and a `make finetune`) started at once would otherwise race on the MLflow
SQLite database, Qdrant's local folder (one process at a time), the processed data and the adapters. The
second run waits for the first and says who holds the lock; with a timeout (`--lock-timeout 0`, or the
environment variable WORKSPACE_LOCK_TIMEOUT) it refuses instead, naming the holder.

The lock is re-entrant inside one process (the pipeline holds it while it calls the stage functions), and the
operating system releases it when the holder dies: a crashed run never leaves a stale lock behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from workspace.paths import CACHE

LOCK_DIR = CACHE / "locks"
_held: dict[str, tuple[int, object]] = {}  # lock path -> (depth, open file) for this process
_guard = threading.Lock()


class LockBusy(RuntimeError):
    """Another process holds the workspace lock and the wait timed out (or no wait was allowed)."""


def default_timeout() -> Optional[float]:
    raw = os.environ.get("WORKSPACE_LOCK_TIMEOUT", "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise LockBusy(f"WORKSPACE_LOCK_TIMEOUT={raw!r} is not a number of seconds (unset it to wait without limit)")


def holder(path: Path) -> dict:
    """What the holder wrote into the lock file (pid, what, since, command), or {}."""
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"PID {info.get('pid')} ({info.get('what', '?')}, since {since}: {info.get('command', '')[:120]})"


@contextlib.contextmanager
def workspace_lock(what: str, timeout: Optional[float] = None, name: str = "workspace",
                   directory: Optional[Path] = None) -> Iterator[Path]:
    """Hold the named lock for the block. timeout None: WORKSPACE_LOCK_TIMEOUT, else wait without limit."""
    path = (directory or LOCK_DIR) / f"{name}.lock"
    key = str(path)
    with _guard:
        if key in _held:  # re-entrant: the pipeline calls stage functions that lock too
            depth, fh = _held[key]
            _held[key] = (depth + 1, fh)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _guard:
                depth, fh = _held[key]
                _held[key] = (depth - 1, fh)
        return

    timeout = default_timeout() if timeout is None else timeout
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")
    start, announced = time.monotonic(), False
    try:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                info = holder(path)
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise LockBusy(
                        f"the workspace is busy: {_describe(info)} holds {path}. Wait for it to finish, or stop it "
                        f"(kill {info.get('pid', '<pid>')}); set WORKSPACE_LOCK_TIMEOUT (seconds) to wait longer")
                if not announced:
                    print(f"[lock] {what}: waiting for {_describe(info)} to release {path} ...", file=sys.stderr, flush=True)
                    announced = True
                time.sleep(0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "what": what, "since": time.time(), "command": " ".join(sys.argv)}))
        fh.flush()
        if announced:
            print(f"[lock] {what}: acquired after {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    except BaseException:
        fh.close()
        raise
    with _guard:
        _held[key] = (1, fh)
    try:
        yield path
    finally:
        with _guard:
            _held.pop(key, None)
        try:
            fh.seek(0)
            fh.truncate()
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()
