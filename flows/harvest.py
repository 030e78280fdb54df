"""`make harvest [SINCE=2026-11-01 | SINCE_VERSION=3]`: the gateway's ratings, corrections and arena votes as data
the prepare stage reads (serving/gateway/harvest.py), under data.feedback.dir (data/raw/feedback/<date>/).

    .venv/bin/python -m llmops harvest [--since DATE | --since-version N]

With neither, everything collected so far (the prepare stage removes rows that were harvested before).
Turn the harvest into training data with `data.feedback.enabled: true` (`make loop` does it for its own run).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from rich.console import Console
from rich.table import Table

from serving.gateway import GatewayDbError, Harvest, HarvestError, harvest_feedback, parse_since
from workspace.config import ConfigError, LoadedConfig, add_cli_args, load_config
from workspace.paths import resolve


def harvest_table(h: Harvest) -> Table:
    t = Table(title=f"harvest: {h.folder or 'nothing written'}" + (f"  ({h.reason})" if h.reason else ""))
    t.add_column("item")
    t.add_column("value", justify="right")
    m = h.manifest
    t.add_row("since", m["since"] or "the beginning" + (f" (version {m['since_version']})" if m["since_version"] else ""))
    t.add_row("time range of the rows", f"{m['first'] or '-'} .. {m['last'] or '-'}")
    for k, v in m["counts"].items():
        t.add_row(k.replace("_", " "), str(v))
    t.add_row("registry versions (rows)", ", ".join(f"v{k}: {v}" for k, v in m["versions"].items()) or "-")
    return t


def run_harvest(loaded: LoadedConfig, since: Optional[str] = None, since_version: Optional[str] = None,
                console: Optional[Console] = None) -> Harvest:
    h = harvest_feedback(loaded, out_root=resolve(loaded.config.data.feedback.dir), since=parse_since(since),
                         since_version=since_version)
    (console or Console()).print(harvest_table(h))
    return h


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--since", default=None, help="only feedback and votes from this ISO date/time on")
    ap.add_argument("--since-version", default=None, help="only what came after this registry version was registered")
    args = ap.parse_args(argv)
    try:
        run_harvest(load_config(args.config, args.profile, args.overrides), args.since or None,
                    args.since_version or None)
    except (ConfigError, HarvestError, GatewayDbError) as exc:
        print(f"[error] {exc}", file=sys.stderr)
        return 2
    return 0

