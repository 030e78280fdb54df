"""The command line shared by every flow module: --config/--profile/--set, errors printed without a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from workspace.config import ConfigError, add_cli_args


def run_flow_cli(description: str, flow: Callable, known_errors: tuple[type[BaseException], ...] = ()) -> int:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--force", action="store_true", help="redo the stage even when its output exists")
    args = ap.parse_args()
    try:
        flow(config=args.config, profile=args.profile, overrides=list(args.overrides), force=args.force)
    except (ConfigError, *known_errors) as exc:
        print(f"\n[error] {exc}", file=sys.stderr)
        return 2
    return 0
