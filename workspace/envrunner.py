"""Run a command inside another virtual environment (train, serve, workspace) as a subprocess.

Output is streamed live (to the terminal, a log file and an optional per-line callback that stages use to
follow a trainer log); a timeout kills the whole process group; a failure raises EnvCommandError with the
exit code, the log file and the last lines of output. Used by finetune/ (llamafactory-cli), serving/ (vLLM's
argument parser, `vllm bench serve`) and doctor; `env_command` hands a server's command line to
workspace.processes, which keeps long-running processes.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from workspace import offline
from workspace.paths import ROOT, VENVS
from workspace.processes import describe_kill, guarded, oom_kill_count, stop_process_group

TAIL_LINES = 40


class EnvCommandError(RuntimeError):
    def __init__(self, message: str, returncode: Optional[int], tail: list[str], log_path: Optional[Path],
                 oom_killed: Optional[bool] = None, killed: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.tail = tail
        self.log_path = log_path
        self.oom_killed = oom_killed  # died by SIGKILL with the OOM killer's counter rising (None: cannot tell)
        self.killed = killed  # the sentence that says which signal ended it and why, "" for a normal exit


class EnvTimeoutError(EnvCommandError):
    pass


class EnvMissingError(EnvCommandError):
    pass


@dataclass
class EnvResult:
    returncode: int
    seconds: float
    tail: list[str]
    log_path: Optional[Path]


def env_bin(env: str, program: str) -> Path:
    """Path of a console script or interpreter inside env; raises EnvMissingError with the fix."""
    if env not in VENVS:
        raise EnvMissingError(f"unknown environment {env!r}; known: {', '.join(VENVS)}", None, [], None)
    path = VENVS[env] / "bin" / program
    if not path.exists():
        raise EnvMissingError(
            f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} not found: the {env} environment is "
            f"missing or incomplete. Run `make setup` (or `python3 workspace/setup_env.py {env} --force`).",
            None, [], None)
    return path


def _child_env(env: str, program: Path, hub_enabled: bool, extra_env: Optional[dict[str, str]]) -> dict[str, str]:
    env_vars = offline.subprocess_env(hub_enabled, extra_env)
    env_vars["PYTHONUNBUFFERED"] = "1"
    # the venv's bin first, so console scripts that spawn helpers find the right interpreter
    env_vars["PATH"] = f"{program.parent}{os.pathsep}{env_vars.get('PATH', '')}"
    env_vars.pop("PYTHONHOME", None)
    # the workspace's own modules that run inside the train/serve envs (e.g. workspace.vllm_launcher)
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env_vars.get("PYTHONPATH", "")) if p)
    env_vars["VIRTUAL_ENV"] = str(VENVS[env])
    return env_vars


def env_command(env: str, argv: Sequence[str], *, hub_enabled: bool = False,
                extra_env: Optional[dict[str, str]] = None) -> tuple[list[str], dict[str, str]]:
    """(argv with its program resolved in env's bin/, the environment to run it with): what
    workspace.processes.ManagedProcess needs to start a long-running server in that environment."""
    program = env_bin(env, argv[0])
    return [str(program), *argv[1:]], _child_env(env, program, hub_enabled, extra_env)


def run_in_env(
    env: str,
    argv: Sequence[str],
    *,
    timeout: Optional[float] = None,
    log_path: Optional[Path] = None,
    cwd: Optional[Path] = None,
    extra_env: Optional[dict[str, str]] = None,
    hub_enabled: bool = False,
    on_line: Optional[Callable[[str], None]] = None,
    echo: bool = True,
    what: Optional[str] = None,
) -> EnvResult:
    """Run argv[0] (a program in env's bin/, e.g. "python" or "llamafactory-cli") with argv[1:].

    Raises EnvTimeoutError after `timeout` seconds (the process group is terminated, then killed) and
    EnvCommandError on a non-zero exit, both carrying the last TAIL_LINES lines and the log file.
    """
    program = env_bin(env, argv[0])
    cmd = [str(program), *argv[1:]]
    what = what or " ".join([argv[0], *argv[1:3]])
    env_vars = _child_env(env, program, hub_enabled, extra_env)

    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    log = None
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", encoding="utf-8")
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()

    t0 = time.time()
    oom_before = oom_kill_count()
    proc = subprocess.Popen(
        guarded(cmd), cwd=cwd or ROOT, env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True, text=True, encoding="utf-8", errors="replace", bufsize=1,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if log:
                log.write(line + "\n")
                log.flush()
            if echo:
                print(line, file=sys.stderr, flush=True)
            if on_line:
                try:
                    on_line(line)
                except Exception as exc:  # a broken follower must not kill the command
                    print(f"[envrunner] line callback failed: {exc}", file=sys.stderr)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_process_group(proc)
    except KeyboardInterrupt:
        stop_process_group(proc)
        raise
    finally:
        reader.join(timeout=10)
        if log:
            log.close()
    seconds = time.time() - t0
    where = f" Log: {log_path}." if log_path else ""
    last = "\n    ".join(list(tail)[-15:])
    if timed_out:
        raise EnvTimeoutError(
            f"{what} (in the {env} environment) did not finish within {timeout:.0f} s and was stopped.{where}\n"
            f"  last lines:\n    {last}", proc.returncode, list(tail), log_path)
    if proc.returncode != 0:
        killed, oom = describe_kill(proc.returncode, oom_before, oom_kill_count())
        hint = f" {killed[0].upper()}{killed[1:]}" if killed else ""
        raise EnvCommandError(
            f"{what} (in the {env} environment) failed with exit code {proc.returncode}.{hint}{where}\n"
            f"  last lines:\n    {last}", proc.returncode, list(tail), log_path, oom_killed=oom, killed=killed)
    return EnvResult(proc.returncode, seconds, list(tail), log_path)
