"""`make serve`: serve models:/<name>@champion with its promoted vLLM configuration until Ctrl-C: serving.replicas
processes on PORT, PORT+1, ... (serving/supervisor.py keeps the replicas file the gateway follows and, in merged
mode, replaces the replicas when the champion moves).

    .venv/bin/python -m llmops serve [--port 8000]
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from typing import Optional

from serving.registry import CHAMPION, PromotionError, alias_version
from serving.serve import champion_server, usage, with_serve_key
from serving.supervisor import REPLICAS_FILE, Supervisor
from workspace.config import ConfigError, adapter_mode, add_cli_args, load_config
from workspace.paths import CACHE
from workspace.processes import free_port
from workspace.endpoint import EndpointError
from workspace.tracking import configure
from workspace.vllm_server import ServerError


def launcher(loaded, port: Optional[int]):
    """Start n replicas of the current champion: the first set on PORT, PORT+1, ...; later sets (a merged
    champion replaced while serving) on free ports. Returns (servers, version)."""
    first = [True]

    def launch(n: int):
        servers, version = [], None
        try:
            for i in range(n):
                p = (port or loaded.config.serving.port) + i if first[0] else free_port(loaded.config.serving.host)
                dest = CACHE / "serve" / f"port-{p}"
                shutil.rmtree(dest, ignore_errors=True)  # nothing of an earlier version may stay beside this one
                server, info = champion_server(loaded, port=p, dest=dest)
                if version is not None and info["version"] != version:  # the alias moved between two replicas
                    raise ServerError(f"champion moved to v{info['version']} while v{version} started; retrying later")
                version = info["version"]
                print(f"[serve] starting vLLM replica {i + 1}/{n} for v{version} ({info['adapter_mode']}) on port {p} ...",
                      flush=True)
                server.start()
                servers.append(server)
        except BaseException:
            for s in servers:
                s.stop()
            raise
        first[0] = False
        launch.info = info
        return servers, version

    return launch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        loaded = load_config(args.config, args.profile, args.overrides)
        loaded = with_serve_key(loaded, args.config, args.profile, args.overrides)
        configure(loaded)
        mode, reason = adapter_mode(loaded.config)
        name = loaded.config.tracking.registered_model
        print(f"[serve] {name}@champion, {loaded.config.serving.replicas} replica(s), adapter mode {mode} ({reason})")
        launch = launcher(loaded, args.port)
        sup = Supervisor(loaded, launch, champion=lambda: alias_version(name, CHAMPION))
        group = sup.start()
    except (ConfigError, PromotionError, ServerError, EndpointError) as exc:
        print(f"[error] {exc}", file=sys.stderr)
        return 2
    print(usage(group.replicas[0], launch.info), flush=True)
    if len(group.replicas) > 1:
        print(f"  replicas: {', '.join(r.base_url for r in group.replicas)} (listed in {REPLICAS_FILE}; "
              "`make gateway` balances them)", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            dead = [r for r in sup.current.replicas if not r.running]
            if dead:
                print(f"[serve] vLLM exited with code {dead[0].proc.returncode if dead[0].proc else '?'}; log: "
                      f"{dead[0].log_path}", file=sys.stderr)
                return 1
            time.sleep(sup.poll_s)
            sup.step()
    except KeyboardInterrupt:
        print("\n[serve] stopping ...")
        return 0
    finally:
        sup.stop()

