"""The command line shared by the per-stage flow modules: --config/--profile/--set (+ --force), errors printed
without a traceback (exit 2; a gate refusal exits 3)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from eval.gate import GateFailed
from flows.runner import KNOWN_ERRORS
from workspace.config import add_cli_args


def run_flow_cli(description: str, flow: Callable, extra: Callable[[argparse.ArgumentParser], None] | None = None,
                 argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--force", action="store_true", help="redo the stage even when its output exists")
    if extra:
        extra(ap)
    args = vars(ap.parse_args(argv))
    try:
        flow(config=args.pop("config"), profile=args.pop("profile"), overrides=list(args.pop("overrides")), **args)
    except GateFailed as exc:
        print(f"\n[gate] {exc}", file=sys.stderr)
        return 3
    except KNOWN_ERRORS as exc:
        print(f"\n[error] {exc}", file=sys.stderr)
        return 2
    return 0
