"""`make monitoring`: Prometheus for the served model, on the service plan's KPIs (serving/monitoring.py): writes
.cache/monitoring/ (prometheus.yml, rules.yml, rules_test.yml and the credential files the scrape jobs read: a fresh
admin token of the gateway named `prometheus`, and vLLM's key), checks them with promtool when it is installed
(`make setup` installs Debian's prometheus), and prints the command that starts Prometheus.

    .venv/bin/python -m llmops monitoring [--profile l4x1_qwen7b_qlora] [--out DIR]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from serving.monitoring import CONFIG, TESTS, write, write_credentials
from workspace.config import ConfigError, add_cli_args, load_config
from workspace.paths import CACHE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--out", type=Path, default=CACHE / "monitoring")
    args = ap.parse_args(argv)
    try:
        loaded = load_config(args.config, args.profile, args.overrides)
        write_credentials(loaded, args.out)
    except (ConfigError, ValueError) as exc:
        print(f"[error] {exc}", file=sys.stderr)
        return 2
    for path in write(loaded, args.out, loaded.config.gate.slo):
        print(f"[monitoring] wrote {path}")
    promtool = shutil.which("promtool")
    if promtool:
        for argv_ in ([promtool, "check", "config", str(args.out / CONFIG)], [promtool, "test", "rules", str(args.out / TESTS)]):
            done = subprocess.run(argv_, cwd=args.out, capture_output=True, text=True)
            print(f"[monitoring] {' '.join(argv_[1:3])}: {'ok' if done.returncode == 0 else 'FAILED'}")
            if done.returncode:
                print(done.stdout + done.stderr, file=sys.stderr)
                return 2
    else:
        print("[monitoring] promtool not found: `make setup` installs Debian's prometheus (apt-get install prometheus)")
    print(f"start it:  prometheus --config.file={args.out / CONFIG} --storage.tsdb.path={args.out / 'data'} "
          "--web.listen-address=127.0.0.1:9090\n(the gateway's KPIs: http://127.0.0.1:9090/alerts and /graph, "
          "e.g. gateway:ttft_seconds:p50_5m)")
    return 0

