"""`make harvest`: what people said about answers in the gateway, exported as data the prepare stage reads (the
folder's format is workspace/harvest_format.py, which the prepare stage reads with the same names).

From the gateway's database (feedback and arena votes, already PII-masked when stored, masked again here):
- `sft.jsonl` (OpenAI messages): an answer rated up, and a corrected answer, each with the context it was given in;
- `pref.jsonl` (LLaMA-Factory's ranking format: conversations + chosen + rejected + system): the arena winner over
  the loser, and a correction over the answer it corrects;
- `manifest.json` (written last): counts by kind, the time range, the registry versions the rows came from, what
  was skipped and why, and each file's SHA-256.
under `data/raw/feedback/<date>/` (a second harvest on the same day with other rows gets `<date>.2`, ...; the same
rows again write nothing). The folder appears whole or not at all (workspace/fsutil.staging). Votes that are ties,
thumbs down without a correction, and rows whose text was not kept (`serving.gateway.log_text: false`) are counted
and skipped: they say something is wrong, not what is right.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from serving.gateway.db import GatewayDb, database_url
from workspace.config.load import LoadedConfig
from workspace.harvest_format import MANIFEST, PREF_FILE, SFT_FILE, finished_harvests
from workspace.fsutil import staging
from workspace.pii import mask_pii


class HarvestError(RuntimeError):
    pass


@dataclass
class Harvest:
    folder: Optional[Path]  # None: nothing new (see `reason`)
    manifest: dict
    sft: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    reason: str = ""


def since_of_version(loaded: LoadedConfig, version: str) -> dt.datetime:
    """When registry version `version` was created (feedback after it is about it and what came later)."""
    import mlflow

    from workspace.tracking import configure

    configure(loaded)
    try:
        mv = mlflow.MlflowClient().get_model_version(loaded.config.tracking.registered_model, str(version))
    except mlflow.exceptions.MlflowException as exc:
        raise HarvestError(f"version {version} of {loaded.config.tracking.registered_model} is not in the registry "
                           f"({exc.error_code}); list them with `make leaderboard` or the MLflow UI") from None
    return dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.timezone.utc).replace(tzinfo=None)


def parse_since(text: Optional[str]) -> Optional[dt.datetime]:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text).replace(tzinfo=None)
    except ValueError:
        raise HarvestError(f"SINCE={text!r} is not an ISO date (2026-11-26 or 2026-11-26T10:00)") from None


def _clean(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": mask_pii(m["content"])} for m in messages
            if m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)]


def _ranking(prompt: list[dict], chosen: str, rejected: str) -> dict:
    system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else ""
    turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
             for m in prompt if m["role"] != "system"]
    return {"conversations": turns, "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected}, "system": system}


def collect(db: GatewayDb, since: Optional[dt.datetime]) -> tuple[list[dict], list[dict], dict]:
    """(sft rows, preference rows, counts) from the feedback and the voted arena matches since `since`."""
    counts: Counter = Counter()
    versions: Counter = Counter()
    times: list[str] = []
    sft: list[dict] = []
    pairs: list[dict] = []
    for f in db.feedback(since):
        counts["feedback"] += 1
        times.append(f["updated_at"])
        prompt = _clean(f["messages"] or [])
        answer = mask_pii(f["answer"]) if f["answer"] else None
        if not prompt or prompt[-1]["role"] != "user":
            counts["skipped_no_text"] += 1  # log_text was off, or the context was not kept
            continue
        if f["correction"]:
            correction = mask_pii(f["correction"])
            sft.append({"messages": prompt + [{"role": "assistant", "content": correction}], "source": "correction",
                        "version": f["version"]})
            counts["sft_from_corrections"] += 1
            if answer and answer.strip() != correction.strip():
                pairs.append({**_ranking(prompt, correction, answer), "source": "correction", "version": f["version"]})
                counts["pairs_from_corrections"] += 1
        elif f["rating"] == 1 and answer:
            sft.append({"messages": prompt + [{"role": "assistant", "content": answer}], "source": "rated_up",
                        "version": f["version"]})
            counts["sft_from_ratings"] += 1
        elif f["rating"] == -1:
            counts["skipped_down_without_correction"] += 1
            continue
        else:
            counts["skipped_no_text"] += 1
            continue
        versions[f["version"] or "?"] += 1
    for m in db.matches(since):
        counts["arena_votes"] += 1
        times.append(m["voted_at"] or m["created_at"])
        if m["winner"] == "tie":
            counts["skipped_ties"] += 1
            continue
        prompt = _clean(m["messages"])
        win, lose = ("a", "b") if m["winner"] == "A" else ("b", "a")
        chosen, rejected = mask_pii(m[f"answer_{win}"]), mask_pii(m[f"answer_{lose}"])
        if not prompt or chosen.strip() == rejected.strip():
            counts["skipped_identical_answers" if prompt else "skipped_no_text"] += 1
            continue
        pairs.append({**_ranking(prompt, chosen, rejected), "source": "arena", "winner_version": m[f"version_{win}"],
                      "loser_version": m[f"version_{lose}"]})
        counts["pairs_from_arena"] += 1
        versions[m["version_a"]] += 1
        versions[m["version_b"]] += 1
    counts["sft_rows"], counts["preference_pairs"] = len(sft), len(pairs)
    return sft, pairs, {"counts": dict(sorted(counts.items())), "versions": dict(sorted(versions.items())),
                        "first": min(times) if times else None, "last": max(times) if times else None}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def harvest(loaded: LoadedConfig, *, out_root: Path, since: Optional[dt.datetime] = None,
            since_version: Optional[str] = None, db: Optional[GatewayDb] = None,
            today: Optional[dt.date] = None) -> Harvest:
    """The gateway's rated, corrected and voted answers (since a date or a registry version) as one harvest folder
    under `out_root`: where the prepare stage reads feedback (data.feedback.dir, which the flow passes)."""
    if since is not None and since_version is not None:
        raise HarvestError("give SINCE (a date) or SINCE_VERSION (a registry version), not both")
    if since_version is not None:
        since = since_of_version(loaded, since_version)
    db = db or GatewayDb(database_url(loaded))
    sft, pairs, facts = collect(db, since)
    root = out_root
    files = {SFT_FILE: _jsonl(sft), PREF_FILE: _jsonl(pairs)}
    digests = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in files.items()}
    manifest = {"created_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds"),
                "since": since.isoformat() if since else None, "since_version": since_version,
                "database": db._safe(db.url), **facts, "files": digests}
    if not sft and not pairs:
        return Harvest(None, manifest, reason="no rated, corrected or voted answers in that range")
    for old in finished_harvests(root):
        if json.loads((old / MANIFEST).read_text(encoding="utf-8")).get("files") == digests:
            return Harvest(old, manifest, sft, pairs, reason=f"the same rows were harvested already ({old.name})")
    day = (today or dt.date.today()).isoformat()
    name, n = day, 1
    while (root / name).exists():
        n += 1
        name = f"{day}.{n}"
    root.mkdir(parents=True, exist_ok=True)
    with staging(root / name) as tmp:
        for fname, text in files.items():
            (tmp / fname).write_text(text, encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return Harvest(root / name, manifest, sft, pairs)
