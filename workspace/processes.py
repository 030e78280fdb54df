"""The one process manager for everything the workspace spawns and keeps running: vLLM, `transformers serve`,
the Prefect server and worker, the MLflow UI.

A ManagedProcess starts its command in its own process group (output appended to a log file), waits until it is
healthy while checking that it is still alive, shows the log's tail when it dies or never gets healthy, and is
stopped by its PID (SIGTERM to the group, SIGKILL after a grace period), never by name and never twice. A
process meant to outlive the command that started it (`make prefect-up`) records its PID, port and a marker of
its command line in a pid file; `stop_recorded` stops it later, after checking /proc/<pid>/cmdline, so a
recycled PID is never signalled. One-shot commands (training, export, a benchmark run) go through
workspace.envrunner.run_in_env instead.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence


GUARD = Path(__file__).with_name("guard.py")


def guarded(argv: Sequence[str], parent: Optional[int] = None) -> list[str]:
    """argv run under workspace/guard.py: it dies with `parent` (default: this process), even when that is killed
    by SIGKILL (the guard stops every process below it when its parent is gone)."""
    return [sys.executable, "-I", str(GUARD), str(parent or os.getpid()), "--", *argv]


def guard_this_process() -> None:
    """Called first by the workspace's one command line (llmops/cli.py): re-run this very command line under the
    guard, once, so what it starts that the workspace does not manage itself (Prefect's temporary API server, a
    uvicorn process) also dies when the command is killed, by SIGKILL too. The guard takes this PID (exec) and stays
    the child of whoever started the command (make, a shell, a test). LLMOPS_NO_GUARD=1 turns it off."""
    if os.environ.get("LLMOPS_GUARD_PID") == str(os.getppid()) or os.environ.get("LLMOPS_NO_GUARD") == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, guarded([sys.executable, *sys.orig_argv[1:]], parent=os.getppid()))


class ProcessError(RuntimeError):
    """A managed process could not start, died during start-up, or never became healthy (the message has the log)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Nothing listens there. SO_REUSEADDR as servers (uvicorn, vLLM) set it: connections of a stopped server that
    linger in TIME_WAIT do not count, a listening socket does."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group of proc (started with start_new_session), SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        _kill_group(proc.pid, signal.SIGKILL)  # the leader is gone; reap what it left in its group
        return
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    _kill_group(proc.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def oom_kill_count() -> Optional[tuple[str, int]]:
    """(where, count) of the kernel's OOM-killer kills that can see this process: its cgroup v2 memory.events, its
    cgroup v1 memory.oom_control, else the machine's /proc/vmstat; None when none is readable. Compared before and
    after a child dies by SIGKILL, it tells an out-of-memory kill from a kill -9 by a person or a scheduler."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                candidates.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events")
            elif "memory" in controllers.split(","):
                candidates.append(Path("/sys/fs/cgroup/memory/memory.oom_control"))
    except (OSError, ValueError):
        pass
    candidates.append(Path("/proc/vmstat"))
    for path in candidates:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return str(path), int(value)
        except OSError:
            continue
    return None


def describe_kill(returncode: Optional[int], oom_before: Optional[tuple[str, int]],
                  oom_after: Optional[tuple[str, int]]) -> tuple[str, Optional[bool]]:
    """For a child that died by a signal: the sentence that says so, and whether the OOM killer did it (None:
    cannot tell). ("", None) for a normal exit."""
    if returncode is None or returncode >= 0:
        return "", None
    sig = -returncode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    text = f"it was killed by signal {sig} ({name})"
    if sig != signal.SIGKILL:
        return text + ".", False
    if oom_before and oom_after and oom_before[0] == oom_after[0]:
        if oom_after[1] > oom_before[1]:
            return (text + f"; the kernel's OOM killer is the likely cause (oom_kill in {oom_after[0]} went from "
                    f"{oom_before[1]} to {oom_after[1]} while it ran): it ran out of memory."), True
        return (text + f"; no out-of-memory kill was recorded while it ran (oom_kill in {oom_after[0]} stayed at "
                f"{oom_after[1]}), so something else sent SIGKILL: a person, a job scheduler or a time limit."), False
    return text + "; whether the kernel's OOM killer did it cannot be told here (no oom_kill counter readable).", None


def http_ok(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class ManagedProcess:
    """`with ManagedProcess(...) as p:` or `p.start()` / `p.stop()`. Subclasses build argv/env in `command()`."""

    what = "process"
    stop_grace = 20.0

    def __init__(self, argv: Sequence[str] = (), *, log_path: Path, env: Optional[dict[str, str]] = None,
                 cwd: Optional[Path] = None, health_url: Optional[str] = None,
                 healthy: Optional[Callable[[], bool]] = None, pidfile: Optional[Path] = None,
                 marker: Optional[str] = None, what: Optional[str] = None, record: Optional[dict] = None):
        self._argv, self._env = list(argv), env
        self.log_path, self.cwd = Path(log_path), cwd
        self.health_url, self._healthy = health_url, healthy
        self.pidfile, self.marker, self.record = pidfile, marker, record or {}
        self.what = what or self.what
        self.proc: Optional[subprocess.Popen] = None

    # ---------------------------------------------------------------------------------------------- hooks
    def command(self) -> tuple[list[str], Optional[dict[str, str]]]:
        return self._argv, self._env

    def is_healthy(self) -> bool:
        if self._healthy is not None:
            return self._healthy()
        return http_ok(self.health_url) if self.health_url else True

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 300) -> "ManagedProcess":
        if self.running:  # a second start would orphan the first process
            raise ProcessError(f"this {self.what} is already running (PID {self.proc.pid})")
        if self.pidfile is not None and recorded_pid(self.pidfile) is not None:
            raise ProcessError(f"a {self.what} recorded in {self.pidfile} is already running "
                               f"(PID {recorded_pid(self.pidfile)}); stop it first")
        argv, env = self.command()
        self._oom_before = oom_kill_count()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            # a process that is meant to outlive this command (pid file) runs unguarded; every other one dies with us
            run = argv if self.pidfile is not None else guarded(argv)
            self.proc = subprocess.Popen(run, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        if self.pidfile is not None:
            self.pidfile.parent.mkdir(parents=True, exist_ok=True)
            self.pidfile.write_text(json.dumps({**self.record, "pid": self.proc.pid, "marker": self.marker or argv[-1],
                                                "started": time.time(), "log": str(self.log_path),
                                                "health_url": self.health_url}))
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        """Poll until healthy; a process that exits or stays unhealthy is stopped and named with its log."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                killed, _ = describe_kill(code, getattr(self, "_oom_before", None), oom_kill_count())
                self.stop()
                raise ProcessError(f"{self.what} exited with code {code} before it was ready"
                                   f"{'; ' + killed if killed else ''}; log: {self.log_path}\n{self.tail()}")
            if self.is_healthy():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessError(f"{self.what} did not become healthy within {timeout:.0f} s"
                                   f"{' at ' + self.health_url if self.health_url else ''}; log: {self.log_path}\n"
                                   f"{self.tail()}")
            time.sleep(1)

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> bool:
        """Stop the process group; True when something was running. Safe to call twice."""
        if self.proc is None:
            return False
        was_running = self.proc.poll() is None
        stop_process_group(self.proc, grace=self.stop_grace)
        self.proc = None
        if self.pidfile is not None:
            self.pidfile.unlink(missing_ok=True)
        return was_running

    def detach(self) -> None:
        """Let the process outlive this object (and this command): it is stopped later by `stop_recorded(pidfile)`."""
        if self.pidfile is None:
            raise ProcessError(f"this {self.what} has no pid file: detached, nothing could stop it")
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------ processes that outlive us
def recorded_pid(pidfile: Path) -> Optional[int]:
    """The PID in `pidfile` if that process still runs and its command line carries the recorded marker."""
    try:
        rec = json.loads(pidfile.read_text())
        cmdline = Path(f"/proc/{rec['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, KeyError):
        return None
    return rec["pid"] if rec.get("marker", "\0") in cmdline else None


def stop_recorded(pidfile: Path, grace: float = 15.0) -> bool:
    """Stop the process group recorded in `pidfile` (started by an earlier command); True when one was running."""
    pid = recorded_pid(pidfile)
    pidfile.unlink(missing_ok=True)
    if pid is None or not _kill_group(pid, signal.SIGTERM):
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _kill_group(pid, 0):
            return True
        time.sleep(0.3)
    _kill_group(pid, signal.SIGKILL)
    return True
