"""`make serve`: serve models:/<name>@champion with its promoted vLLM configuration until Ctrl-C.

    .venv/bin/python -m flows.serve [--port 8000]
"""
from __future__ import annotations

if __name__ == "__main__":  # a command: re-run under workspace/guard.py first (nothing it starts outlives it)
    from workspace.processes import guard_this_process

    guard_this_process()

import argparse
import signal
import sys
import time

from workspace import offline

offline.apply()

from serving.registry import PromotionError  # noqa: E402
from serving.serve import champion_server, usage  # noqa: E402
from workspace.config import ConfigError, add_cli_args, load_config  # noqa: E402
from workspace.endpoint import EndpointError  # noqa: E402
from workspace.tracking import configure  # noqa: E402
from workspace.vllm_server import ServerError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()
    try:
        loaded = load_config(args.config, args.profile, args.overrides)
        configure(loaded)
        server, info = champion_server(loaded, port=args.port)
        print(f"[serve] starting vLLM for {loaded.config.tracking.registered_model}@champion (v{info['version']}) ...")
        server.start()
    except (ConfigError, PromotionError, ServerError, EndpointError) as exc:
        print(f"[error] {exc}", file=sys.stderr)
        return 2
    print(usage(server, info), flush=True)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while server.running:
            time.sleep(1)
        print(f"[serve] vLLM exited with code {server.proc.returncode if server.proc else '?'}; log: {server.log_path}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[serve] stopping ...")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
