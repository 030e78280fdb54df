"""What a request reaches: model names (aliases) to registry versions, versions to served models, and replicas.

- `Catalog`: `champion`, `candidate`, `previous` (re-read from the MLflow registry every `registry_refresh_s`, and at
  once on POST /admin/reload), `name@version` / `name@alias` / `vN`, `auto` (the routing table: keywords or a
  regex on the last user message), and the optional canary (a seeded share of `champion` requests answered by
  another alias). A version N of registered model M is served under the upstream name `M-vN`.
- `ReplicaPool`: the vLLM replicas (health-checked in the background), least-busy choice among the healthy ones
  that can serve the model; in LoRA mode a version a replica does not serve yet is loaded into it at run time
  (vLLM's /v1/load_lora_adapter; `make serve` starts vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING), so `make
  promote` / `make rollback` move traffic without restarting anything, and requests in flight keep the adapter
  they started with (nothing is unloaded).
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx

from workspace.config.load import LoadedConfig
from workspace.paths import CACHE
from workspace.tracking import tracking_uri

ALIASES = ("champion", "candidate", "previous")


class GatewayError(Exception):
    """An error the client gets in OpenAI's shape: {"error": {"message", "type", "code"}} with `status`."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.headers = status, message, code, type_, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


@dataclass
class Target:
    requested: str
    alias: str  # what answered: an alias, or name@version
    version: str
    registered_model: str
    upstream_model: str
    canary: bool = False
    route: Optional[str] = None


class Catalog:
    def __init__(self, loaded: LoadedConfig, *, fetch=None, versions=None):
        cfg = loaded.config
        self.gw = cfg.serving.gateway
        self.name = cfg.tracking.registered_model
        self.allowed = tuple(cfg.serving.registered_models or [self.name])  # serving.registered_models
        self.aliases: dict[str, str] = {}
        self.refreshed_at = 0.0
        self.error: Optional[str] = None
        self.rng = random.Random(cfg.project.seed)  # the canary split: seeded, so a test measures a real split
        self._lock = asyncio.Lock()
        self._fetch = fetch  # (name, version, dest) -> folder; the registry's fetch_version by default
        self._versions = versions  # (name, alias) -> version or None; the registry's alias_version by default
        self.routes = [(r, re.compile(r.regex) if r.regex else None) for r in self.gw.routes]
        # its own store, not the process's current MLflow URI (which anything else in the process may move)
        self.tracking_uri = tracking_uri(cfg.tracking)

    def _alias_version(self, name: str, alias: str) -> Optional[str]:
        if self._versions:
            return self._versions(name, alias)
        from serving.registry import alias_version

        return alias_version(name, alias, strict=True, tracking_uri=self.tracking_uri)

    def refresh_sync(self) -> dict[str, str]:
        found = {}
        for alias in ALIASES:
            v = self._alias_version(self.name, alias)
            if v is not None:
                found[alias] = v
        self.aliases, self.refreshed_at, self.error = found, time.time(), None
        return found

    async def refresh(self) -> dict[str, str]:
        try:
            return await asyncio.to_thread(self.refresh_sync)
        except Exception as exc:  # noqa: BLE001 - the registry down: keep the last known aliases, report it
            self.error = f"{type(exc).__name__}: {exc}"
            return self.aliases

    def upstream_name(self, name: str, version: str) -> str:
        return f"{name}-v{version}"

    def hidden_versions(self) -> set[str]:
        """Versions of the registered model that user tokens may not ask for (serving.gateway.arena.hide_models):
        those under an arena alias other than the champion and under no other alias."""
        arena = set(self.gw.arena.models) - {"champion"} if self.gw.arena.hide_models else set()
        shown = {v for a, v in self.aliases.items() if a not in arena}
        return {v for a, v in self.aliases.items() if a in arena} - shown

    def hidden(self, target: Target) -> bool:
        """Whether a user asked, by name, for a version the arena keeps blind."""
        return (not target.canary and target.route is None and target.registered_model == self.name
                and target.version in self.hidden_versions())

    def models(self, admin: bool = True) -> list[dict]:
        hidden = set() if admin else self.hidden_versions()
        out = [{"id": a, "object": "model", "owned_by": self.name, "version": v, "created": 0}
               for a, v in self.aliases.items() if v not in hidden]
        if self.routes:
            out.append({"id": "auto", "object": "model", "owned_by": "gateway-routes", "created": 0,
                        "routes": [r.name for r, _ in self.routes]})
        return out

    def _route(self, prompt: str) -> tuple[str, Optional[str]]:
        for rule, rx in self.routes:
            if any(k in prompt for k in rule.keywords) or (rx is not None and rx.search(prompt)):
                return rule.model, rule.name
        return self.gw.default_model, None

    def resolve(self, requested: Optional[str], prompt: str = "", *, canary_split: bool = True) -> Target:
        """`canary_split=False`: exactly the model asked for (the arena compares named aliases)."""
        requested = requested or self.gw.default_model
        model, route = (self._route(prompt) if requested == "auto" else (requested, None))
        canary = False
        c = self.gw.canary
        if canary_split and c and c.percent > 0 and model == "champion" and c.alias != "champion":
            if self.rng.random() * 100 < c.percent and self._version_of(c.alias, quiet=True):
                model, canary = c.alias, True
        name, version = self._version_of(model)
        return Target(requested, model, version, name, self.upstream_name(name, version), canary, route)

    def _version_of(self, model: str, quiet: bool = False) -> Optional[tuple[str, str]]:
        name, version = self.name, None
        if model in ALIASES:
            version = self.aliases.get(model)
            if version is None and not quiet:
                raise GatewayError(404, f"the alias {model!r} is not set in the registry for {self.name} "
                                   f"(set: {', '.join(self.aliases) or 'none yet: run `make promote`'})",
                                   "model_not_found")
        elif "@" in model:
            name, _, ref = model.partition("@")
            name = name or self.name
            if name not in self.allowed:  # never looked up, never a path: only the allow-list is served
                if quiet:
                    return None
                raise GatewayError(404, f"the model {model!r} does not exist here: this gateway serves "
                                   f"{', '.join(self.allowed)} (serving.registered_models)", "model_not_found")
            version = ref if ref.isdigit() else (self._alias_version(name, ref) if ref in ALIASES else None)
        elif re.fullmatch(r"v\d+", model):
            version = model[1:]
        if version is None:
            if quiet:
                return None
            raise GatewayError(404, f"the model {model!r} does not exist: ask for one of {', '.join(self.aliases) or '(none set)'}"
                               f", name@version (e.g. {self.name}@1), vN, or auto (the routing table)", "model_not_found")
        return name, version

    def fetch(self, name: str, version: str) -> Path:
        """The version's registered files, downloaded once into <cache>/gateway/versions/<name>/<version>."""
        root = (CACHE / "gateway" / "versions").resolve()
        dest = root / name / version
        if name not in self.allowed or not version.isdigit() or dest.resolve().parent.parent != root:
            raise GatewayError(404, f"the model {name}@{version} is not one this gateway serves", "model_not_found")
        if (dest / "serving.yaml").exists():
            return dest
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a server log, not a terminal
        tmp = dest.with_name(dest.name + ".part")
        tmp.mkdir(parents=True, exist_ok=True)
        if self._fetch:
            folder = self._fetch(name, version, tmp)
        else:
            from serving.registry import PromotionError, fetch_version

            try:
                folder = fetch_version(name, version, tmp, tracking_uri=self.tracking_uri)
            except PromotionError as exc:
                shutil.rmtree(tmp, ignore_errors=True)  # an unknown version leaves nothing behind
                raise GatewayError(404, str(exc), "model_not_found") from exc
        folder.rename(dest)  # whole or not at all: a half download stays a .part folder
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


@dataclass
class Replica:
    base_url: str  # .../v1
    healthy: bool = True
    inflight: int = 0
    served: int = 0
    models: set[str] = field(default_factory=set)
    last_error: str = ""
    fixed_models: bool = False  # refused a run-time LoRA load: serves only what it lists
    loading: dict[str, asyncio.Lock] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url


class ReplicaPool:
    def __init__(self, urls: list[str], client: httpx.AsyncClient, headers: dict[str, str], source=None):
        """`source`: a function returning the current replica URLs (or None: keep the list), read before each
        health check."""
        self.source = source
        self.replicas = [Replica(u.rstrip("/")) for u in (source and source()) or urls]
        self.client, self.headers = client, headers
        self._rr = 0

    async def check(self, r: Replica) -> bool:
        try:
            h = await self.client.get(f"{r.root}/health", timeout=3, headers=self.headers)
            ok = h.status_code == 200
            if ok:
                m = await self.client.get(f"{r.base_url}/models", timeout=5, headers=self.headers)
                r.models = {d["id"] for d in m.json().get("data", [])} if m.status_code == 200 else r.models
            r.healthy, r.last_error = ok, ("" if ok else f"/health answered {h.status_code}")
        except (httpx.HTTPError, ValueError) as exc:
            r.healthy, r.last_error = False, f"{type(exc).__name__}: {exc}"
        return r.healthy

    def reconcile(self, urls: list[str]) -> None:
        """Follow a changed replica list (`make serve`'s replicas file): new URLs join, gone ones leave; a replica
        that stays keeps its state (in flight, loaded models)."""
        known = {r.base_url: r for r in self.replicas}
        self.replicas = [known.get(u.rstrip("/")) or Replica(u.rstrip("/")) for u in urls]

    async def check_all(self) -> None:
        if self.source is not None:
            urls = self.source()
            if urls is not None:
                self.reconcile(urls)
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    def pick(self, exclude: set[str], model: Optional[str] = None) -> Optional[Replica]:
        """The healthy replica with the fewest requests in flight (round robin among equals), among those that
        already serve `model` when any does (else one that can load it at run time)."""
        ready = [r for r in self.replicas if r.healthy and r.base_url not in exclude]
        if not ready:
            return None
        # a replica that cannot load adapters at run time (merged weights) only gets the models it lists
        ready = [r for r in ready if model in r.models or not r.fixed_models]
        if not ready:
            return None
        self._rr += 1
        least = min(r.inflight for r in ready)
        tied = [r for r in ready if r.inflight == least]
        return tied[self._rr % len(tied)]

    async def ensure_model(self, r: Replica, target: Target, catalog: Catalog) -> None:
        """Make `target.upstream_model` available on replica `r`: in LoRA mode load the version's adapter at run
        time; a plain (merged) version must already be served there."""
        if target.upstream_model in r.models:
            return
        lock = r.loading.setdefault(target.upstream_model, asyncio.Lock())
        async with lock:
            if target.upstream_model in r.models:
                return
            folder = await asyncio.to_thread(catalog.fetch, target.registered_model, target.version)
            adapter = folder / "adapter"
            if r.fixed_models or not (adapter / "adapter_config.json").exists():
                raise GatewayError(503, f"no replica serves {target.registered_model} v{target.version} "
                                   f"({target.alias}): {r.base_url} serves merged weights of one version and cannot "
                                   "load another at run time. Serve several versions from one vLLM with "
                                   "serving.adapter_mode: lora, or point serving.gateway.upstreams at a server of "
                                   "that version", "model_not_served", "server_error")
            resp = await self.client.post(f"{r.base_url}/load_lora_adapter", headers=self.headers, timeout=120,
                                          json={"lora_name": target.upstream_model, "lora_path": str(adapter.resolve())})
            if resp.status_code in (404, 405):  # no run-time LoRA loading there: merged weights, or another server
                r.fixed_models = True
                raise GatewayError(503, f"no replica serves {target.registered_model} v{target.version} "
                                   f"({target.alias}): {r.base_url} cannot load adapters at run time (merged weights, "
                                   "or vLLM started without VLLM_ALLOW_RUNTIME_LORA_UPDATING, which `make serve` sets "
                                   "in LoRA mode)", "model_not_served", "server_error")
            if resp.status_code != 200 and "already been loaded" not in resp.text:
                raise GatewayError(503, f"replica {r.base_url} could not load {target.upstream_model} "
                                   f"({resp.status_code}: {resp.text[:200]})", "model_not_served", "server_error")
            r.models.add(target.upstream_model)
