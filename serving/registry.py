"""Promotion in the MLflow model registry, all or nothing, and rollback.

`promote()` logs the adapter (or merged model), the manifest, the evaluation report, the gate decision and the
serving configuration as artifacts of the promote run, registers them as a new version of the registered model
(`create_model_version(source=<artifact folder>)`: MLflow 3 cannot register a plain folder through
`register_model("runs:/...")`), sets the alias `candidate`, checks that every artifact is really there, and only
then moves `previous` to the old champion and `champion` to the new version. A failure before that last step
leaves the champion where it was. `rollback()` moves `champion` back to `previous`.
`gate_reference()` says what a candidate is gated against. Called by serving/promote_stage.py, serving/serve.py and
flows/ (the gate's reference); tests call it directly.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

CHAMPION, PREVIOUS, CANDIDATE = "champion", "previous", "candidate"
REQUIRED = ("manifest.json", "gate.json", "serving.yaml")
MAX_DESCRIPTION = 5000  # characters of the model card kept as the version's description (the artifact has it all)


class PromotionError(RuntimeError):
    pass


@dataclass
class Promotion:
    name: str
    version: str
    previous: Optional[str]
    run_id: str
    source: str


def _client(tracking_uri: Optional[str] = None):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def alias_version(name: str, alias: str, *, strict: bool = False, tracking_uri: Optional[str] = None) -> Optional[str]:
    """The version an alias points at, or None (no model, no alias). `strict`: any other registry failure (a locked
    database, a server down) raises instead of reading as "no alias" (the gateway keeps what it knew).
    `tracking_uri`: this store, not the process's current one (a long-running server names its own)."""
    import mlflow

    try:
        return str(_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as exc:
        if strict and exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None


def champion_info(name: str) -> Optional[dict]:
    """{version, source, run_id, tags} of models:/<name>@champion, or None when there is none yet."""
    v = alias_version(name, CHAMPION)
    if v is None:
        return None
    mv = _client().get_model_version(name, v)
    return {"version": str(mv.version), "source": mv.source, "run_id": mv.run_id, "tags": dict(mv.tags)}


def promote(name: str, run_id: str, bundle: Path, tags: dict[str, str], *, champion: bool = True,
            describe: Optional[Callable[[str], str]] = None,
            _after_step: Callable[[str], None] = lambda step: None) -> Promotion:
    """Register `bundle` (a folder with the model files and REQUIRED files) from the active run `run_id`.
    `champion=False` stops at the alias `candidate` (the loop's registration: the gateway's canary and arena serve
    it; `promote_version` makes it the champion later). `describe(version)` gives the version's description (its
    model card).

    `_after_step` is a test hook called after each step (artifacts, version, candidate, verify, previous)."""
    import mlflow

    missing = [f for f in REQUIRED if not (bundle / f).exists()]
    if missing:
        raise PromotionError(f"promotion bundle {bundle} lacks {missing}; nothing was registered")
    client = _client()
    mlflow.log_artifacts(str(bundle), "model")
    _after_step("artifacts")
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri}/model"
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="Finetuned adapters promoted by the workspace's gate.")
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    for _ in range(60):
        mv = client.get_model_version(name, mv.version)
        if mv.status == "READY":
            break
        time.sleep(0.5)
    if mv.status != "READY":
        raise PromotionError(f"model version {name}/{mv.version} is {mv.status}, not READY; champion unchanged")
    _after_step("version")
    client.set_registered_model_alias(name, CANDIDATE, mv.version)
    _after_step("candidate")
    listed = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "model")}
    absent = [f for f in REQUIRED if f not in listed]
    if absent:
        raise PromotionError(f"registered version {mv.version} lacks artifacts {absent}; champion unchanged")
    _after_step("verify")
    if describe is not None:
        client.update_model_version(name, mv.version, description=describe(str(mv.version))[:MAX_DESCRIPTION])
    if not champion:
        client.set_model_version_tag(name, mv.version, "registered_as", CANDIDATE)
        return Promotion(name, str(mv.version), alias_version(name, CHAMPION), run_id, source)
    old = alias_version(name, CHAMPION)
    if old is not None and old != str(mv.version):
        client.set_registered_model_alias(name, PREVIOUS, old)
    _after_step("previous")
    client.set_registered_model_alias(name, CHAMPION, mv.version)  # the one step that changes what is served
    client.set_model_version_tag(name, mv.version, "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return Promotion(name, str(mv.version), old, run_id, source)


def promote_version(name: str, version: str) -> Optional[str]:
    """Make the registered `version` (a loop's candidate, already served by the canary) the champion: `previous`
    moves to the old champion first, `champion` last; the `candidate` alias is removed when it pointed at
    `version` (the arena would otherwise compare the champion with itself). Returns the old champion."""
    client = _client()
    try:
        client.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001
        raise PromotionError(f"{name} has no version {version}: {exc}") from None
    old = alias_version(name, CHAMPION)
    if old == str(version):
        raise PromotionError(f"{name} v{version} already is the champion")
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "promoted_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if alias_version(name, CANDIDATE) == str(version):
        client.delete_registered_model_alias(name, CANDIDATE)
    return old


def version_info(name: str, version: str) -> dict:
    """{version, source, run_id, tags, description, aliases, created} of one registered version."""
    try:
        mv = _client().get_model_version(name, str(version))
    except Exception as exc:  # noqa: BLE001
        raise PromotionError(f"{name} has no version {version} ({type(exc).__name__})") from None
    return {"version": str(mv.version), "source": mv.source, "run_id": mv.run_id, "tags": dict(mv.tags),
            "description": mv.description or "", "aliases": list(mv.aliases or []),
            "created": mv.creation_timestamp}


def list_versions(name: str) -> list[dict]:
    """Every registered version of `name`, oldest first ([] when the model does not exist yet)."""
    import mlflow

    try:
        found = _client().search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return []
    return sorted(({"version": str(v.version), "tags": dict(v.tags), "aliases": list(v.aliases or []),
                    "created": v.creation_timestamp, "run_id": v.run_id} for v in found), key=lambda v: int(v["version"]))


def rollback(name: str) -> tuple[str, str]:
    """champion <- previous; the demoted version keeps the alias `previous` (so a rollback can be undone)."""
    cur, prev = alias_version(name, CHAMPION), alias_version(name, PREVIOUS)
    if cur is None:
        raise PromotionError(f"registered model '{name}' has no champion: nothing to roll back")
    if prev is None:
        raise PromotionError(f"registered model '{name}' has no 'previous' version to roll back to (champion is v{cur})")
    client = _client()
    client.set_registered_model_alias(name, CHAMPION, prev)
    client.set_registered_model_alias(name, PREVIOUS, cur)
    client.set_model_version_tag(name, cur, "rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return cur, prev


def fetch_champion(name: str, dest: Optional[Path] = None) -> tuple[dict, Path]:
    """Download the champion's artifacts: the alias is resolved once, then that VERSION is fetched (an alias that
    moves meanwhile cannot make the files differ from the version reported). Errors name the cause."""
    info = champion_info(name)
    if info is None:
        raise PromotionError(f"registered model '{name}' has no champion yet: run `make promote` after a passing gate")
    return info, fetch_version(name, info["version"], dest)


def fetch_version(name: str, version: str, dest: Optional[Path] = None, tracking_uri: Optional[str] = None) -> Path:
    import mlflow

    dest = dest or Path(tempfile.mkdtemp(prefix=f"model-v{version}-"))
    try:
        # models:/ URIs resolve through the process's registry URI; with a store of its own, resolve the version's
        # files through a client bound to that store
        uri = _client(tracking_uri).get_model_version_download_uri(name, version) if tracking_uri else \
            f"models:/{name}/{version}"
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest), tracking_uri=tracking_uri))
    except mlflow.exceptions.MlflowException as exc:
        raise PromotionError(f"models:/{name}/{version} cannot be fetched: {exc}") from exc


def fetch_version_cached(name: str, version: str) -> Path:
    """The version's files in <cache>/registry/<name>/v<version> (downloaded once, whole or not at all: a version's
    files never change once registered)."""
    from workspace.paths import CACHE

    dest = CACHE / "registry" / name / f"v{version}"
    if (dest / "manifest.json").exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    folder = fetch_version(name, version, part)
    if dest.exists():
        shutil.rmtree(dest)
    folder.rename(dest)
    shutil.rmtree(part, ignore_errors=True)
    return dest


def version_of_run(name: str, run_key: str) -> Optional[str]:
    """The newest registered version trained by finetune run `run_key`, or None."""
    for v in reversed(list_versions(name)):
        if v["tags"].get("finetune_run_key") == run_key:
            return v["version"]
    return None


def gate_reference(name: str, run_key: str) -> Optional[dict]:
    """What the candidate with `run_key` is gated against: {version, run_key, artifact_uri} of the champion; when
    the candidate already IS the champion, the version it was compared with when it was promoted (so an unchanged
    rerun asks the same question and finds its cached answer); None for the base model."""
    champ = champion_info(name)
    if champ is None:
        return None
    if champ["tags"].get("finetune_run_key") != run_key:
        return {"version": champ["version"], "run_key": champ["tags"].get("finetune_run_key", ""),
                "artifact_uri": f"models:/{name}/{champ['version']}"}
    earlier = champ["tags"].get("gate_reference_version", "")
    if not earlier:
        return None
    try:
        mv = _client().get_model_version(name, earlier)
    except Exception:  # noqa: BLE001 - a deleted reference version: compare with the base model
        return None
    return {"version": str(mv.version), "run_key": dict(mv.tags).get("finetune_run_key", ""),
            "artifact_uri": f"models:/{name}/{mv.version}"}


def build_bundle(out: Path, adapter_dir: Path, files: dict[str, Path | str | dict], merged: Optional[Path] = None) -> Path:
    """A folder with the adapter files and the promotion records (manifest, gate, report, serving config); with
    `merged` (serving.adapter_mode merged) also the full model merged from it, under merged/."""
    if out.exists():
        shutil.rmtree(out)
    (out / "adapter").mkdir(parents=True)
    if merged is not None:
        shutil.copytree(merged, out / "merged")
    for p in adapter_dir.iterdir():
        if p.is_file() and (p.name.startswith("adapter_") or p.name.startswith("tokenizer") or
                            p.name in ("chat_template.jinja", "special_tokens_map.json")):
            shutil.copy2(p, out / "adapter" / p.name)
    for name, content in files.items():
        target = out / name
        if isinstance(content, Path):
            shutil.copy2(content, target)
        elif isinstance(content, dict):
            target.write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
        else:
            target.write_text(content, encoding="utf-8")
    return out
