"""`make ui`: the MLflow UI on the configured store, on 127.0.0.1 with one worker, until Ctrl-C.

    .venv/bin/python -m llmops ui [--port 5000] [--config ...]

Compare pipeline runs: open the experiment, tick two `pipeline-*` parent runs, Compare (their params are the
flattened config, their metrics the candidate's scores, the gate and the registry version).
"""
from __future__ import annotations

import argparse
import os
import sys

from workspace import offline
from workspace.config import ConfigError, add_cli_args, load_config
from workspace.tracking import artifact_location, tracking_uri


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--port", type=int, default=5000)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.profile, args.overrides).config.tracking
    except ConfigError as exc:
        print(f"[error] {exc}", file=sys.stderr)
        return 2
    uri = tracking_uri(cfg)
    if "://" in uri and not uri.startswith("sqlite:"):
        print(f"[ui] tracking.uri is a server ({uri}): open it in a browser; nothing to start here")
        return 0
    offline.apply()
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--default-artifact-root",
            artifact_location(cfg), "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    print(f"[ui] MLflow UI for {uri}\n[ui] open http://127.0.0.1:{args.port}  (starting takes about 20-60 s; Ctrl-C stops it)",
          flush=True)
    # under workspace/guard.py: the UI's worker processes go with it, even when it is killed by SIGKILL
    from workspace.processes import guarded

    os.execv(sys.executable, guarded(argv, parent=os.getppid()))
