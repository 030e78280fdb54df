"""Run a command so that it dies with the process that started it, even when that process is killed by SIGKILL.

    python -I workspace/guard.py <parent-pid> -- <program> [args...]

The workspace starts every child (training, export, vLLM, `transformers serve`, the MLflow UI) through this guard,
in a new process group that holds the guard, the command and everything the command starts (vLLM's engine core,
dataloader workers). The guard waits for the command and watches its own parent: when the parent is gone (the
guard was re-parented), it stops the whole group: SIGTERM, then SIGKILL after a grace period. A SIGTERM/SIGINT to
the guard is passed on to the command. The guard exits with the command's status, and when the command died by a
signal it dies by the same signal, so the caller sees what really happened (-9 stays -9).

Why not prctl(PR_SET_PDEATHSIG): the kernel sends it when the *thread* that forked the child exits, and the
workspace starts children from worker threads (Prefect tasks, thread pools) that end long before the parent does.
Kept free of workspace imports and started with `python -I` (no site-packages, no PYTHONPATH): it starts in
milliseconds with any interpreter.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.25
GRACE_S = 10.0


def _group_members() -> list[int]:
    """The other live processes of this process group (from /proc; zombies do not count)."""
    me, group, out = os.getpid(), os.getpgrp(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != b"Z":
            out.append(int(entry))
    return out


def _signal_members(sig: int) -> None:
    for pid in _group_members():
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_group(grace: float = GRACE_S) -> None:
    """SIGTERM to every other process of this group, SIGKILL to what is left after `grace` seconds."""
    _signal_members(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_members():
        time.sleep(0.1)
    _signal_members(signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: guard.py <parent-pid> -- <program> [args...]", file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[2:]
    if os.getpgrp() != os.getpid():
        os.setpgrp()  # the caller normally starts the guard with start_new_session; be sure of the group either way
    try:
        child = subprocess.Popen(command)  # inherits stdin/stdout/stderr, environment, cwd and the process group
    except OSError as exc:
        print(f"[guard] cannot start {command[0]}: {exc}", file=sys.stderr)
        return 127
    # The caller stops the group with one signal to all of it, which reaches the command directly: the guard only
    # stays alive to report the command's status (a handler, not SIG_IGN, and set after the command started, so
    # the command does not inherit an ignored signal).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:  # the parent died (we were re-parented to init or a subreaper)
            try:  # the output may be a pipe whose reader died with the parent
                print(f"[guard] parent {parent} is gone: stopping {command[0]} (PID {child.pid}) and its children",
                      file=sys.stderr, flush=True)
            except OSError:
                pass
            _stop_group()
            return 1
    if _group_members():  # the command exited but left children behind in its group
        _stop_group(grace=2.0)
    if code < 0:  # die by the same signal, so the caller sees -9 as -9
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
