"""Prefect flow for the gate and promotion (`make gate`, `make promote`, `make promote VERSION=n`, `make rollback`,
`make card VERSION=n`).

The candidate (the finished finetune run of this config) and its reference (the registry's champion, or the
base model when there is none) are evaluated on identical items (cache hits after `make eval`), the serving SLOs
are measured when `gate.slo.required`, the gate decides (eval/gate_stage.py), and a passing candidate is
registered with its serving configuration, `champion` moving last (serving/promote_stage.py).

`--version N` promotes a registered version (a candidate `make loop` registered, served meanwhile by the gateway's
canary and arena): it is gated against the champion on the same items, with the arena votes between the two when
a `preference` rule is configured, the canary's usage and votes are printed, and a pass moves `champion` to it
(`previous` to the old champion) and appends the decision to its model card.

    .venv/bin/python -m llmops promote [--gate-only] [--rollback] [--version N] [--card N]
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import flow
from rich.console import Console
from rich.table import Table

from eval.gate_stage import GATE, GateInputs, Reference

from finetune.finetune_stage import FINETUNE
from finetune.prepare_stage import PREPARE
from flows._cli import run_flow_cli
from flows.champion import resolve_init_adapter
from flows.segments import arena_tally, as_served, evaluate_candidate, gate_candidate, promote_candidate, test_file
from flows.runner import StageRunner
from serving.card import CARD, model_card, with_promotion
from serving.promote_stage import floors_only_over_full
from serving.registry import (MAX_DESCRIPTION, PromotionError, champion_info, fetch_version_cached,
                              promote_version, rollback, version_info)
from workspace.config import load_config
from workspace.locks import workspace_lock
from workspace.tracking import configure


@flow(name="promote")
def promote_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                 gate_only: bool = False, force: bool = False, version: str | None = None) -> dict:
    if version:
        return promote_version_flow(config, profile, overrides, version=version, gate_only=gate_only, force=force)
    loaded = resolve_init_adapter(load_config(config, profile, overrides or []))
    runner = StageRunner(loaded, force=force)
    with workspace_lock("promote"):
        prepared = runner.run(PREPARE)
        tuned = FINETUNE.finished(loaded, prepared.content_hash)
        evaluate_candidate(runner, prepared, tuned)
        gate = gate_candidate(runner, loaded, prepared, tuned)
        if gate_only:
            return {"gate": gate.model_dump()}
        return promote_candidate(runner, gate).model_dump()


def promote_version_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                         *, version: str, gate_only: bool = False, force: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    configure(loaded)
    name = loaded.config.tracking.registered_model
    runner = StageRunner(loaded, force=force)
    console = Console()
    with workspace_lock("promote"):
        info = version_info(name, version)
        champ = champion_info(name)
        if champ and champ["version"] == str(version):
            raise PromotionError(f"{name} v{version} already is the champion")
        folder = fetch_version_cached(name, str(version))
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        prepared = runner.run(PREPARE)  # the shipped test items, as for every other gate
        ref = Reference(version=champ["version"], run_key=champ["tags"].get("finetune_run_key", ""),
                        artifact_uri=f"models:/{name}/{champ['version']}") if champ else None
        arena = arena_tally(loaded, str(version), champ["version"] if champ else None)
        console.print(canary_table(loaded, str(version), champ["version"] if champ else None))
        gate = runner.run(GATE, GateInputs(adapter_dir=str(folder / "adapter"), run_key=manifest["run_key"],
                                           verification=manifest.get("verification") or {},
                                           test_file=test_file(prepared), reference=ref, arena=arena,
                                           **as_served(loaded)))
        if gate_only:
            return {"gate": gate.model_dump()}
        gate_mode = json.loads(Path(gate.gate_json).read_text(encoding="utf-8")).get("mode", "full")
        if floors_only_over_full(gate_mode, champ):
            raise PromotionError(f"{name} v{version} passed a floors-only gate and v{champ['version']}@champion passed "
                                 "the statistical gate: a floors-only candidate never replaces it; champion unchanged")
        old = promote_version(name, str(version))
        mlflow.MlflowClient().set_model_version_tag(name, str(version), "gate_mode", gate_mode)
        card = info["description"] or ((folder / CARD).read_text(encoding="utf-8") if (folder / CARD).exists() else "")
        card = with_promotion(card, str(version), json.loads(Path(gate.gate_json).read_text(encoding="utf-8")), old,
                              limit=MAX_DESCRIPTION)
        mlflow.MlflowClient().update_model_version(name, str(version), description=card)
    console.print(f"[promote] {name} v{version} is now @champion" + (f" (v{old} is @previous; `make rollback` "
                                                                      "restores it)" if old else ""))
    return {"version": str(version), "previous": old, "gate": gate.model_dump()}


def canary_table(loaded, version: str, champion: str | None) -> Table:
    """What the gateway saw of the version so far: requests, errors, latency, ratings, and arena votes."""
    from serving.gateway import GatewayDb, database_url

    db = GatewayDb(database_url(loaded))
    t = Table(title=f"gateway evidence: v{version}" + (f" vs champion v{champion}" if champion else ""))
    for col in ("version", "requests", "errors", "p50 latency ms", "rated up", "rated down", "corrected"):
        t.add_column(col, justify="right")
    for v in [version] + ([champion] if champion else []):
        u = db.version_usage(v)
        t.add_row(f"v{v}", str(u["requests"]), str(u["errors"]), f"{u['latency_p50_ms']:.0f}" if u["latency_p50_ms"]
                  else "-", str(u["up"]), str(u["down"]), str(u["corrected"]))
    if champion:
        a = db.arena_tally(version, champion)
        n = sum(a.values())
        t.caption = (f"arena v{version} vs v{champion}: {a['wins']} won, {a['losses']} lost, {a['ties']} tied"
                     + (f" (win rate {(a['wins'] + a['ties'] / 2) / n:.2f})" if n else ""))
    return t


def card_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
              card: str = "", **_) -> None:
    loaded = load_config(config, profile, overrides or [])
    configure(loaded)
    name = loaded.config.tracking.registered_model
    info = version_info(name, card)
    text = info["description"]
    if not text:
        folder = fetch_version_cached(name, card)
        text = (folder / CARD).read_text(encoding="utf-8") if (folder / CARD).exists() else \
            model_card(folder, registered_model=name, version=card, alias=", ".join(info["aliases"]) or "none")
    print(text)


def rollback_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
                  **_) -> None:
    loaded = load_config(config, profile, overrides or [])
    configure(loaded)
    with workspace_lock("rollback"):
        demoted, restored = rollback(loaded.config.tracking.registered_model)
    print(f"[rollback] @champion: v{demoted} -> v{restored} (v{demoted} is now @previous)")


def _options(ap) -> None:
    ap.add_argument("--gate-only", action="store_true", help="decide, do not promote")
    ap.add_argument("--rollback", action="store_true", help="move @champion back to @previous")
    ap.add_argument("--version", default=None, help="promote this registered version (a loop's candidate)")
    ap.add_argument("--card", default=None, help="print the model card of this registered version and exit")


def main(argv: list[str] | None = None) -> int:
    def dispatch(rollback: bool = False, card: str | None = None, **kw):
        if card:
            return card_flow(card=card, **kw)
        return rollback_flow(**kw) if rollback else promote_flow(**kw)

    return run_flow_cli(__doc__, dispatch, _options, argv)

