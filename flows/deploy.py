"""A local Prefect server + process worker for the deployments in prefect.yaml (`make prefect-up`, `make deploy-run`).

    .venv/bin/python -m llmops deploy up        # server on 127.0.0.1:4200, work pool, deployments, worker (background)
    .venv/bin/python -m llmops deploy run pipeline/default --param profile=cpu_smoke --param 'overrides=["finetune.lora_rank=16"]'
    .venv/bin/python -m llmops deploy status
    .venv/bin/python -m llmops deploy down      # stops the worker and the server, by the PIDs this module recorded

The server keeps its database under PREFECT_HOME (.prefect/ in the workspace); the worker runs each flow run as
a subprocess with this workspace as its working directory. A team's Prefect server is the same prefect.yaml
with PREFECT_API_URL pointing at it and the work pool switched (README: Docker and Kubernetes pools).
Stopping is by PID (recorded in .prefect/*.pid and checked against the process's command line), never by name.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from workspace import offline

import httpx

from workspace.paths import ROOT
from workspace.processes import ManagedProcess, ProcessError, recorded_pid, stop_recorded

POOL = "local-process"


class DeployError(RuntimeError):
    pass


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", ROOT / ".prefect"))


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def _env(port: int) -> dict[str, str]:
    env = offline.subprocess_env()
    env.update({"PREFECT_API_URL": api_url(port), "WORKSPACE_ROOT": str(ROOT),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})
    return env


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"{api_url(port)}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _pidfile(name: str) -> Path:
    return prefect_home() / f"{name}.pid"


def _alive(name: str) -> Optional[int]:
    """The PID recorded for `name` if that process still runs and is the one we started (its command line)."""
    return recorded_pid(_pidfile(name))


def _process(name: str, argv: list[str], port: int, marker: str, health_url: Optional[str] = None,
             healthy=None) -> ManagedProcess:
    return ManagedProcess(argv, log_path=prefect_home() / f"{name}.log", env=_env(port), cwd=ROOT,
                          pidfile=_pidfile(name), marker=marker, health_url=health_url, healthy=healthy,
                          what=f"the Prefect {name}", record={"port": port})


def _stop(name: str, grace: float = 15.0) -> bool:
    return stop_recorded(_pidfile(name), grace)


def _run(argv: list[str], port: int, what: str, timeout: float = 300) -> str:
    proc = subprocess.run(argv, cwd=ROOT, env=_env(port), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise DeployError(f"{what} failed (exit {proc.returncode}): {' '.join(argv[2:])}\n{tail}")
    return proc.stdout


def use_local_server_if_up() -> Optional[str]:
    """Point this process at the server `make prefect-up` started (so `make pipeline` shows in its UI), if it runs
    and PREFECT_API_URL is not set already. Call before importing prefect. Returns the API URL used, or None."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    f = _pidfile("server")
    if _alive("server") is None:
        return None
    try:
        port = json.loads(f.read_text())["port"]
    except (OSError, ValueError, KeyError):
        return None
    os.environ["PREFECT_API_URL"] = api_url(port)
    return os.environ["PREFECT_API_URL"]


def start_server(port: int, timeout: float = 120) -> None:
    if healthy(port):
        print(f"[prefect] server already up at {api_url(port)}")
        return
    server = _process("server", _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port)), port,
                      marker="server start", health_url=f"{api_url(port)}/health")
    try:
        server.start(timeout)
    except ProcessError as exc:
        raise DeployError(str(exc)) from None
    print(f"[prefect] server up at http://127.0.0.1:{port} (PID {server.pid}; log {server.log_path})")
    server.detach()  # it outlives this command: `make prefect-down` stops it by its recorded PID


def deploy(port: int) -> None:
    exists = subprocess.run(_prefect("work-pool", "inspect", POOL), cwd=ROOT, env=_env(port), capture_output=True,
                            text=True, timeout=120).returncode == 0
    if not exists:
        _run(_prefect("work-pool", "create", POOL, "--type", "process"), port, f"creating work pool {POOL}")
    _run(_prefect("--no-prompt", "deploy", "--all"), port, "prefect deploy --all (prefect.yaml)")
    print(f"[prefect] deployments from prefect.yaml registered on pool '{POOL}'")


def start_worker(port: int) -> None:
    if _alive("worker"):
        print(f"[prefect] worker already running (PID {_alive('worker')})")
        return
    started = time.monotonic()
    # a worker has no health endpoint: healthy once it has run for 2 s without exiting
    worker = _process("worker", _prefect("worker", "start", "--pool", POOL, "--name", "workspace-worker", "--limit", "1"),
                      port, marker="worker start", healthy=lambda: time.monotonic() - started > 2)
    try:
        worker.start(timeout=30)
    except ProcessError as exc:
        raise DeployError(str(exc)) from None
    print(f"[prefect] worker polling '{POOL}' (PID {worker.pid}; log {worker.log_path})")
    worker.detach()  # it outlives this command: `make prefect-down` stops it by its recorded PID


def up(port: int) -> None:
    start_server(port)
    deploy(port)
    start_worker(port)
    print(f"[prefect] UI: http://127.0.0.1:{port}   run: make deploy-run DEPLOYMENT=pipeline/default")


def down() -> None:
    for name in ("worker", "server"):
        print(f"[prefect] {name}: {'stopped' if _stop(name) else 'not running'}")


def run_deployment(port: int, name: str, params: list[str], timeout: float) -> int:
    """`prefect deployment run NAME --param k=v --watch`; returns 0 when the flow run completed."""
    if not healthy(port):
        raise DeployError(f"no Prefect server at {api_url(port)}: run `make prefect-up` first")
    argv = _prefect("deployment", "run", name, *[a for p in params for a in ("--param", p)], "--watch",
                    "--watch-timeout", str(int(timeout)))
    print("[prefect] " + " ".join(argv[2:]), flush=True)
    proc = subprocess.run(argv, cwd=ROOT, env=_env(port), timeout=timeout + 60)
    return proc.returncode


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "down", "status", "run", "server"])
    ap.add_argument("deployment", nargs="?", default="pipeline/default")
    ap.add_argument("--param", action="append", default=[], help="k=v, as `prefect deployment run --param`")
    ap.add_argument("--port", type=int, default=int(os.environ.get("ORCH_PORT", 4200)))
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args(argv)
    try:
        if args.command == "up":
            up(args.port)
        elif args.command == "server":
            start_server(args.port)
            print(f"[prefect] UI: http://127.0.0.1:{args.port}   (`make prefect-down` stops it)")
        elif args.command == "down":
            down()
        elif args.command == "status":
            print(f"server: {'up' if healthy(args.port) else 'down'} at http://127.0.0.1:{args.port} (PID {_alive('server')})")
            print(f"worker: {'running, PID ' + str(_alive('worker')) if _alive('worker') else 'not running'}")
        elif args.command == "run":
            return run_deployment(args.port, args.deployment, args.param, args.timeout)
    except (DeployError, subprocess.TimeoutExpired) as exc:
        print(f"[error] {exc}", file=sys.stderr)
        return 2
    return 0

