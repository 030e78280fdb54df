"""Benchmark of the loop on the default profile (`make bench-loop`; needs a champion: `make pipeline` first):

1. harvest: the gateway database filled with N corrections (the champion's real answers to training prompts,
   corrected to the reference screen) and M arena votes, then `make harvest` timed;
2. DPO: `make loop` on that harvest (LLaMA-Factory DPO from the champion's adapter, which is also the reference
   model), wall time per stage, the DPO reward accuracy, and the candidate against the champion on the gate's items
   (the gate table: every metric with its interval);
3. leaderboard: base + the registered versions, first run (evaluates) and again (cached).

Everything runs in a temporary registry, gateway database and data folder: the user's registry is only read (its
champion is copied in as v1). Writes docs/BENCHMARKS.md (section loop).

    .venv/bin/python -m llmops bench loop [--rows 10000] [--pairs 120] [--steps 100]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from eval.evaluate import evaluate
from eval.gate import GateFailed
from flows.leaderboard import leaderboard_flow
from flows.loop import loop_flow
from flows.segments import as_served
from serving.card import gate_rows
from serving.gateway import GatewayDb, harvest_feedback
from serving.registry import champion_info, fetch_version_cached, promote
from benchmarks.report import update_section
from workspace.config import add_cli_args, load_config
from workspace.model_ref import base_model
from workspace.paths import resolve
from workspace.tracking import configure, stage_run


def _fill_gateway(db: GatewayDb, items: list[dict], rows: int, votes: int) -> None:
    """`rows` corrections and `votes` arena votes, cycling over the champion's real answers (through the gateway
    database's public methods, the ones its routes call)."""
    for i in range(rows):
        it = items[i % len(items)]
        rid = f"chatcmpl-bench-{uuid.uuid4().hex[:20]}"
        db.add_usage(request_id=rid, token_name="bench", requested_model="champion", alias="champion", version="1",
                     status=200, prompt=it["messages"][-1]["content"], answer=it["output"])
        db.add_exchange(rid, "bench", it["messages"])
        db.set_feedback("bench", rid, alias="champion", version="1", rating=-1, correction=it["reference"], comment=None)
    for i in range(votes):
        it = items[i % len(items)]
        m = db.create_match("bench", it["messages"],
                            {"model": "champion", "version": "1", "answer": it["output"], "request_id": "a"},
                            {"model": "reference", "version": "0", "answer": it["reference"], "request_id": "b"})
        db.vote("bench", m["id"], "B")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--rows", type=int, default=10_000, help="corrections in the gateway database")
    ap.add_argument("--votes", type=int, default=2_000, help="arena votes in the gateway database")
    ap.add_argument("--pairs", type=int, default=120, help="training prompts the champion answers (distinct pairs)")
    ap.add_argument("--steps", type=int, default=None, help="DPO steps (default: loop.max_steps)")
    ap.add_argument("--lr", type=float, default=None, help="DPO learning rate (default: loop.learning_rate)")
    ap.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                    help="run the loop at three settings (the SFT recipe's rate; a DPO-sized rate; the same with "
                         "pref_ftx 1) instead of once with loop.* (default: on)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    user = load_config(args.config, args.profile, args.overrides)
    configure(user)
    name = user.config.tracking.registered_model
    champ = champion_info(name)
    if champ is None:
        print(f"[bench-loop] {name} has no champion in {user.config.tracking.uri}: run `make pipeline` first")
        return 2
    src = fetch_version_cached(name, champ["version"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    sets = list(args.overrides) + [
        f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/artifacts", "tracking.experiment=bench-loop",
        f"data.output_dir={tmp}/processed", f"finetune.output_dir={tmp}/adapters", f"data.feedback.dir={tmp}/feedback",
        f"serving.gateway.database_url=sqlite:///{tmp}/gw.db", "rag.enabled=false",
        "serving.adapter_mode=lora"] + ([f"loop.max_steps={args.steps}"] if args.steps else []) + \
        ([f"loop.learning_rate={args.lr}"] if args.lr else [])
    loaded = load_config(args.config, args.profile, sets)
    configure(loaded)
    with stage_run(loaded, "promote") as run:  # the user's champion, copied in as v1
        bundle = tmp / "champion"
        shutil.copytree(src, bundle, ignore=shutil.ignore_patterns("merged"))
        promote(loaded.config.tracking.registered_model, run.info.run_id, bundle, {
            **{k: v for k, v in champ["tags"].items() if k in ("finetune_run_key", "base_model", "dataset_hash")},
            "adapter_mode": "lora"})
    lines: list[str] = []

    # 1. the champion's real answers to training prompts (the rejected side), the references (the chosen side)
    train = [json.loads(x) for x in resolve(loaded.config.data.sources[0].path).read_text(encoding="utf-8").splitlines()]
    prompts = tmp / "prompts.jsonl"
    with open(prompts, "w", encoding="utf-8") as fh:
        for row in train[: args.pairs]:
            user_text = f"{row['instruction']}\n{row['input']}" if row.get("input") else row["instruction"]
            fh.write(json.dumps({"messages": [{"role": "user", "content": user_text},
                                              {"role": "assistant", "content": row["output"]}]}, ensure_ascii=False) + "\n")
    t0 = time.monotonic()
    champion = base_model(loaded).with_adapter("champion", str(src / "adapter"))
    answering = load_config(args.config, args.profile, sets + [f"eval.custom_limit={args.pairs}"])
    gen = evaluate(answering, champion, ("custom",), test_file=prompts,
                   **{**as_served(answering), "out_root": tmp / "answers"})
    gen_s = time.monotonic() - t0
    msgs = {f"prompts:{i}": json.loads(x)["messages"][:-1] for i, x in enumerate(prompts.read_text().splitlines(), 1)}
    items = []
    for x in Path(gen.items_path).read_text(encoding="utf-8").splitlines():
        it = json.loads(x)
        if it.get("suite") == "custom" and it["output"].strip() != it["reference"].strip():
            items.append({"messages": msgs[it["id"]], "output": it["output"], "reference": it["reference"]})
    db = GatewayDb(f"sqlite:///{tmp}/gw.db")
    t0 = time.monotonic()
    _fill_gateway(db, items, args.rows, args.votes)
    fill_s = time.monotonic() - t0

    # 2. harvest
    t0 = time.monotonic()
    got = harvest_feedback(loaded, out_root=resolve(loaded.config.data.feedback.dir))
    harvest_s = time.monotonic() - t0
    c = got.manifest["counts"]
    lines += ["### Harvest", "",
              f"The gateway database (SQLite) held {args.rows:,} corrections (the champion v{champ['version']}'s real "
              f"answers to {len(items)} training prompts, corrected to the reference screen; {args.pairs - len(items)} "
              f"answers were already exact) and {args.votes:,} arena votes (the reference answer against the "
              f"champion's), written in {fill_s:.1f} s. Answering the {args.pairs} prompts took {gen_s:.0f} s.", "",
              "| rows read | supervised rows | preference pairs | files | seconds | rows/s |", "|---|---|---|---|---|---|",
              f"| {c['feedback'] + c['arena_votes']:,} | {c['sft_rows']:,} | {c['preference_pairs']:,} | "
              f"{', '.join(sorted(got.manifest['files']))} | {harvest_s:.2f} | "
              f"{(c['feedback'] + c['arena_votes']) / harvest_s:,.0f} |", ""]

    # 3. the loop, once with its own settings (loop.learning_rate, loop.max_steps) and once with the SFT recipe's
    # learning rate and more steps (what the loop did before it had its own): prepare (the harvest mixed in, pairs
    # deduplicated) -> DPO -> evaluate -> gate -> register
    ft, lp = loaded.config.finetune, loaded.config.loop
    settings = [(f"the loop's settings (lr {lp.learning_rate:g}, {lp.max_steps} steps, pref_ftx {lp.pref_ftx:g})"
                 if lp.pref_ftx is not None else f"the loop's settings (lr {lp.learning_rate:g}, {lp.max_steps} steps)", [])]
    if args.compare:  # what the loop's settings are chosen against
        settings = [(f"the SFT recipe's rate (lr {ft.learning_rate:g}, 100 steps, pref_ftx 0)",
                     [f"loop.learning_rate={ft.learning_rate:g}", "loop.max_steps=100", "loop.pref_ftx=0"]),
                    ("a DPO-sized rate, plain DPO (lr 5e-05, 50 steps, pref_ftx 0)",
                     ["loop.learning_rate=5e-05", "loop.max_steps=50", "loop.pref_ftx=0"]),
                    ("the same with the SFT loss on the chosen answers (lr 5e-05, 50 steps, pref_ftx 1)",
                     ["loop.learning_rate=5e-05", "loop.max_steps=50", "loop.pref_ftx=1"])]
    lines += ["### DPO from the champion on the harvest (`make loop`)", "",
              "Each row is one `make loop` on that harvest: prepare (the harvest mixed in: pairs deduplicated, prompts "
              "of the test and validation splits quarantined), LLaMA-Factory DPO from the champion's adapter (which is "
              "also the frozen reference model), evaluation, the gate against the champion.", "",
              "| setting | pairs | steps | loop wall s | DPO train s | final loss | reward accuracy | "
              "reward margin | well-formed XML | gate |", "|---|---|---|---|---|---|---|---|---|---|"]
    effects: list[str] = []
    for label, extra in settings:
        t0 = time.monotonic()
        failed = None
        try:
            loop_flow(config=args.config, profile=args.profile, overrides=sets + extra)
        except GateFailed as exc:
            failed = exc
        loop_s = time.monotonic() - t0
        newest = max((p for p in (tmp / "adapters").iterdir() if (p / "manifest.json").exists()),
                     key=lambda p: (p / "manifest.json").stat().st_mtime)
        run = json.loads((newest / "manifest.json").read_text())
        stats = json.loads((Path(run["dataset_dir"]) / "stats.json").read_text())
        gate_json = max(newest.glob("promotion/gate-*/gate.json"), key=lambda p: p.stat().st_mtime, default=None)
        gate = json.loads(gate_json.read_text()) if gate_json else {}
        verdict = "PASS: registered as @candidate" if gate.get("passed") else "FAIL: " + gate.get("decided_by", str(failed))
        acc, margin = run.get("dpo_reward_accuracy"), run.get("dpo_reward_margin")
        xml = next((r["value"] for r in gate.get("rules", []) if r["metric"].endswith("/xml_valid")
                    and r.get("value") is not None), None)
        lines.append(f"| {label} | {(stats.get('feedback') or {}).get('preference_pairs', '?')} | {run.get('global_step')} | "
                     f"{loop_s:.0f} | {run.get('train_runtime_s') or 0:.0f} | "
                     f"{run.get('final_train_loss') or 0:.3f} | {'-' if acc is None else f'{acc:.2f}'} | "
                     f"{'-' if margin is None else f'{margin:.2f}'} | {'-' if xml is None else f'{xml:.2f}'} | {verdict} |")
        effects += ["", f"Effect of the {label} run, candidate against the champion on the gate's items (estimate = "
                    "mean(candidate - champion), with the gate's interval):", "",
                    *gate_rows(gate)]
    champ_eval = evaluate(loaded, champion, test_file=Path(run["dataset_dir"]) / "test.jsonl",  # cached by the gate
                          **as_served(loaded))
    lines += ["", f"The champion on the same items: well-formed XML "
              f"{champ_eval.metrics.get('eval/custom/screens/xml_valid', float('nan')):.2f}, char_ngram_f1 "
              f"{champ_eval.metrics.get('eval/custom/screens/char_ngram_f1', float('nan')):.3f}."]
    lines += effects

    # 4. leaderboard: first (evaluates what is not cached) and again (all cached)
    t0 = time.monotonic()
    first = leaderboard_flow(config=args.config, profile=args.profile, overrides=sets)
    first_s = time.monotonic() - t0
    t0 = time.monotonic()
    again = leaderboard_flow(config=args.config, profile=args.profile, overrides=sets)
    again_s = time.monotonic() - t0
    lines += ["", "### Leaderboard", "",
              "| run | models | evaluated now | seconds |", "|---|---|---|---|",
              f"| first | {', '.join(first['models'])} | {', '.join(first['evaluated_now']) or 'none'} | {first_s:.0f} |",
              f"| again | {', '.join(again['models'])} | {', '.join(again['evaluated_now']) or 'none'} | {again_s:.0f} |",
              "", "The table it wrote:", "", Path(first["markdown"]).read_text(encoding="utf-8").split("\n", 2)[2].strip()]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("loop", "The loop: harvest, DPO from the champion, leaderboard",
                       "make bench-loop" + (f" ARGS='{' '.join(shown)}'" if (shown := argv if argv is not None else sys.argv[1:]) else ""),
                       body)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0

