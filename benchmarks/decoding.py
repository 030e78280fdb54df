"""`make bench-decoding`: what one decoding setting does to adapters already trained. Each adapter given (and each
base model they name, alone) is evaluated on the custom suite by the in-process scorer (eval.evaluate, cached by its
keys) twice: with the configured serving.decoding, and with one setting taken away (`--without grammar`, the
default; or `stop`, or `penalty`). xml_valid and the gate's target metric side by side, per adapter, and the minimum.

    .venv/bin/python -m llmops bench decoding models/adapters/screen-xml-* [--without grammar] [--no-write]

For the adapters `make bench-gate` trains (the recipe on each seed and base build): a decoding change is measured on
the same adapters, without training them again. An adapter's base is the one its adapter_config.json names; its seed
is read from the LLaMA-Factory config beside it. Writes docs/BENCHMARKS.md (section decoding).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.report import update_section
from eval.evaluate import evaluate
from finetune.prepare import prepare_dataset
from flows.segments import as_served
from workspace.config import add_cli_args, load_from_args
from workspace.model_ref import ModelRef
from workspace.paths import ROOT

XML = "eval/custom/screens/xml_valid"
WITHOUT = {"grammar": ["serving.decoding.grammar=null"], "stop": ["serving.decoding.stop=[]"],
           "penalty": ["serving.decoding.frequency_penalty=0", "serving.decoding.presence_penalty=0"]}


def describe(adapter: Path) -> tuple[str, int | None]:
    """(base folder, training seed) of an adapter folder."""
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    lf = adapter / "llamafactory_train.yaml"
    seed = re.search(r"^seed: (\d+)", lf.read_text(), re.M) if lf.exists() else None
    return base, int(seed.group(1)) if seed else None


def _short(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else str(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("adapters", nargs="+", type=Path, help="adapter folders (finetune outputs)")
    ap.add_argument("--without", choices=sorted(WITHOUT), default="grammar", help="the setting taken away")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    configured = load_from_args(args)
    args.overrides = list(args.overrides) + WITHOUT[args.without]
    without = load_from_args(args)
    target = configured.config.gate.target_metric
    test = prepare_dataset(configured).path / "test.jsonl"

    models: list[tuple[str, ModelRef]] = []
    for base in sorted({describe(a)[0] for a in args.adapters}):
        models.append((f"{_short(base)} (no adapter)", ModelRef("base", base)))
    for a in sorted(args.adapters, key=lambda a: (describe(a)[0], describe(a)[1] or 0)):
        base, seed = describe(a)
        models.append((f"{_short(base)}, seed {seed}", ModelRef(f"decoding-{a.name}", base, str(a))))

    rows, adapters_min = [], {"with": 1.0, "without": 1.0}
    for label, ref in models:
        out = {}
        for name, loaded in (("without", without), ("with", configured)):
            res = evaluate(loaded, ref, suites=("custom",), test_file=test, backend="hf", **as_served(loaded))
            out[name] = (res.metrics[XML], res.metrics[target])
            if ref.adapter:
                adapters_min[name] = min(adapters_min[name], res.metrics[XML])
        print(f"[bench-decoding] {label}: xml_valid {out['without'][0]:.2f} -> {out['with'][0]:.2f}, "
              f"{target.rsplit('/', 1)[-1]} {out['without'][1]:.4f} -> {out['with'][1]:.4f}", flush=True)
        rows.append(f"| {label} | {out['without'][0]:.2f} | {out['with'][0]:.2f} | {out['without'][1]:.4f} | "
                    f"{out['with'][1]:.4f} |")
    metric = target.rsplit("/", 1)[-1]
    body = "\n".join([
        f"{len(args.adapters)} adapters (and their bases alone) evaluated on the custom suite ({test.name}, the first "
        f"eval.custom_limit items) by the in-process scorer, without `{args.without}` "
        f"({', '.join(WITHOUT[args.without])}) and with the configured serving.decoding.", "",
        f"| model | xml_valid without | xml_valid with | {metric} without | {metric} with |",
        "|---|---|---|---|---|", *rows, "",
        f"Lowest xml_valid of an adapter: **{adapters_min['without']:.2f} without, {adapters_min['with']:.2f} with** "
        f"`{args.without}`."])
    print(body)
    if not args.no_write:
        command = f"make bench-decoding ADAPTERS=\"...\" ARGS=\"--without {args.without}\""
        update_section("decoding", f"Decoding: with and without the {args.without}, on trained adapters", command, body)
    return 0

