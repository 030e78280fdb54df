"""Run a command so that it, and everything it starts, dies with the process that started it, even when that
process is killed by SIGKILL.

    python -I workspace/guard.py <parent-pid> -- <program> [args...]

The workspace starts every child (training, export, vLLM, `transformers serve`, the MLflow UI) through this guard,
and its own commands (flows/*) re-run themselves under it (workspace.processes.guard_this_process). The guard:
  - makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER): whatever the command starts stays below the
    guard even when an intermediate process dies (Prefect's temporary API server, vLLM's engine core);
  - waits for the command and watches its own parent: when the parent is gone (the guard was re-parented), it
    stops every process below it: SIGTERM, then SIGKILL after a grace period;
  - when the command ends, stops what it left behind;
  - exits with the command's status, and when the command died by a signal it dies by the same signal, so the
    caller sees what really happened (-9 stays -9).
It stays in the caller's process group, so a terminal's Ctrl-C reaches the command as before; a SIGTERM sent to
the guard alone is passed on to the command (one sent to a whole group the guard leads already reached it).

Why not prctl(PR_SET_PDEATHSIG) in the child: the kernel sends it when the *thread* that forked the child exits,
and the workspace starts children from worker threads (Prefect tasks, thread pools) that end long before the
parent does. Kept free of workspace imports and started with `python -I`: it starts in milliseconds.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

POLL_S = 0.25
GRACE_S = 10.0
PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def process_table() -> dict[int, tuple[int, int, bytes]]:
    """pid -> (parent pid, process group, state) of every process, from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            out[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return out


def _descendants(skip_zombies: bool = True) -> list[int]:
    me, table = os.getpid(), process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(me, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if not (skip_zombies and table[pid][2] == b"Z"):
            out.append(pid)
    return out


def _reap(keep: int) -> None:
    """Collect the exit status of orphans re-parented to us (never the command's: Popen.wait needs it)."""
    for pid in _descendants(skip_zombies=False):
        if pid != keep:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _signal_all(sig: int) -> None:
    for pid in _descendants():
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_all(keep: int, grace: float = GRACE_S) -> None:
    """SIGTERM to every process below the guard, SIGKILL to what is left after `grace` seconds."""
    _signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(keep)
        if not _descendants():
            return
        time.sleep(0.1)
    _signal_all(signal.SIGKILL)
    _reap(keep)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: guard.py <parent-pid> -- <program> [args...]", file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[2:]
    _become_subreaper()
    env = dict(os.environ, LLMOPS_GUARD_PID=str(os.getpid()))  # tells a guarded workspace command it is guarded
    try:
        child = subprocess.Popen(command, env=env)  # inherits stdin/stdout/stderr, cwd and the process group
    except OSError as exc:
        print(f"[guard] cannot start {command[0]}: {exc}", file=sys.stderr)
        return 127
    leads_group = os.getpgrp() == os.getpid()

    def on_term(sig, _frame):
        # a signal to the guard's whole group (how the workspace stops a child) already reached the command;
        # one sent to the guard alone (the PID its caller knows) is passed on
        if not leads_group:
            try:
                child.send_signal(sig)
            except ProcessLookupError:
                pass

    # set after the command started, and as handlers (not SIG_IGN), so the command inherits no ignored signal;
    # SIGINT (Ctrl-C) reaches the command from the terminal itself
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    signal.signal(signal.SIGINT, lambda *_: None)
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        _reap(child.pid)
        if os.getppid() != parent:  # the parent died (we were re-parented to init or a subreaper)
            try:  # the output may be a pipe whose reader died with the parent
                print(f"[guard] parent {parent} is gone: stopping {command[0]} (PID {child.pid}) and its children",
                      file=sys.stderr, flush=True)
            except OSError:
                pass
            _stop_all(child.pid)
            child.wait()
            return 1
    if _descendants():  # the command ended and left processes behind
        _stop_all(child.pid, grace=2.0)
    if code < 0:  # die by the same signal, so the caller sees -9 as -9
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
