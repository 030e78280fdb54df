"""Print the evaluated items that scored lowest on one metric: what a person reads after the gate refused a
candidate (the refusal prints this command with the candidate's items file).

    .venv/bin/python -m llmops inspect-items <items.jsonl> --metric xml_valid [--limit 5]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def lowest_items(items_path: Path, metric: str, limit: int = 5) -> tuple[list[dict], int]:
    """(the `limit` lowest-scoring custom items on `metric`, how many items have that score). `metric` is the last
    part of eval/custom/<task>/<metric> or the whole name."""
    name = metric.rsplit("/", 1)[-1]
    rows = []
    with open(items_path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if name in (row.get("scores") or {}):
                rows.append(row)
    rows.sort(key=lambda r: r["scores"][name])
    return rows[:limit], len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("items", type=Path, help="an evaluation's items.jsonl (data/processed/evals/<model>-<key>/)")
    ap.add_argument("--metric", required=True, help="a custom metric, e.g. xml_valid or eval/custom/screens/field_f1")
    ap.add_argument("--limit", type=int, default=5)
    args = ap.parse_args(argv)
    if not args.items.exists():
        print(f"{args.items}: no such file (the path is printed by the gate's refusal)", file=sys.stderr)
        return 2
    rows, n = lowest_items(args.items, args.metric, args.limit)
    if not rows:
        print(f"{args.items}: no item has a score named {args.metric!r}", file=sys.stderr)
        return 2
    name = args.metric.rsplit("/", 1)[-1]
    below = sum(1 for r in rows if r["scores"][name] < 1)
    print(f"{len(rows)} lowest of {n} items on {name} ({below} shown below 1.0)\n")
    for r in rows:
        print(f"--- {r['id']}  {name}={r['scores'][name]:.3f}  {r.get('reasons', {}).get(name, '')}")
        print(f"prompt:    {r.get('prompt', '')}")
        out = r.get("output", "")
        print(f"output:    {out[:600]}{' ...' if len(out) > 600 else ''}")
        print(f"reference: {r.get('reference', '')[:300]}\n")
    return 0
