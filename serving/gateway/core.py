"""The gateway: an OpenAI-compatible front door for the served models (FastAPI, run by uvicorn: `make gateway`).
This module is the `Gateway` (auth, limits, the proxy with retries and failover, usage, feedback and arena); its HTTP
surface (routers, auth dependencies, request models, error handlers, `create_app`) is serving/gateway/app.py.

    POST /v1/chat/completions   streamed (SSE) or not; `model` is an alias (champion, candidate, previous),
                                name@version, vN or auto (the routing table); `conversation_id` (extra_body) appends
                                the exchange to a saved conversation
    GET  /v1/models             the aliases set in the registry (and `auto` when routes exist)
    /v1/conversations[/{id}]    create, list, load, retitle (each token sees its own)
    POST /v1/feedback           thumbs up/down and/or a corrected answer on an answered request (by its id)
    POST /v1/arena              one prompt answered by two models (default champion vs candidate), shown blind as A
                                and B in random order; POST /v1/arena/{id}/vote {"winner": "A"|"B"|"tie"} reveals them
    GET  /admin/usage[.csv]     usage rows (admin); /admin/tokens (list, create, revoke); POST /admin/reload;
                                /admin/feedback, /admin/arena (votes and per-version win rates)
    GET  /healthz               the replicas and the registry, no token;  GET /metrics (Prometheus, admin token)
    GET  /                      the chat page (serving/gateway/static/index.html, no external resources)

Every request but /healthz and / carries `Authorization: Bearer <token>` (tokens from `make token`; stored as
SHA-256 digests). Per token: requests/min and tokens/min through the `limits` library (memory, or Redis when several
gateways share the counters); over the limit is 429 with Retry-After. One usage row per chat request (request id,
token name, requested model, alias, resolved version, replica, canary, tokens, TTFT, latency, status, error; every
text PII-masked by workspace/pii.py in the database layer, off the event loop). A client that disconnects cancels its upstream request (the upstream
connection is closed, and vLLM aborts the request). Errors are OpenAI-shaped JSON: 400 (empty or malformed
messages, context too long: the upstream's own message), 401/403, 404 (unknown model), 429, 502 (upstream down),
503 (no healthy replica), 504 (upstream timeout).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.aio.strategies import MovingWindowRateLimiter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.concurrency import run_in_threadpool

from serving.gateway import LATENCY_BUCKETS
from serving.gateway.db import GatewayDb, database_url
from serving.gateway.routing import Catalog, GatewayError, ReplicaPool, Target
from serving.supervisor import REPLICAS_FILE, read_replicas
from workspace.config.load import LoadedConfig

STATIC = Path(__file__).parent / "static"
# what a voter may not set in the arena (a pinned seed or temperature 0 makes a match replayable through the chat)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "n", "frequency_penalty", "presence_penalty",
                 "repetition_penalty", "logit_bias", "logprobs", "top_logprobs")


@dataclass
class Principal:
    name: str
    role: str


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gateway_requests", "chat requests by answering alias and HTTP status",
                                ["alias", "status"], registry=r)
        self.errors = Counter("gateway_errors", "failed requests by error code", ["code"], registry=r)
        self.latency = Histogram("gateway_request_latency_seconds", "request latency", ["alias"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gateway_time_to_first_token_seconds", "time to the first streamed token", ["alias"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("gateway_tokens", "tokens by direction", ["direction"], registry=r)
        self.inflight = Gauge("gateway_inflight_requests", "requests in flight per replica", ["replica"], registry=r)
        self.retries = Counter("gateway_retries", "requests retried on another replica", registry=r)
        self.cancelled = Counter("gateway_cancelled", "requests whose client disconnected", registry=r)
        self.feedback = Counter("gateway_feedback", "feedback by rating and whether it carries a correction",
                                ["rating", "correction"], registry=r)
        self.votes = Counter("gateway_arena_votes", "arena votes by winner (A, B, tie)", ["winner"], registry=r)


class Limiter:
    """Per-token requests/min and tokens/min (moving windows) from the `limits` library. A chat request's token budget
    (prompt characters + n x max_tokens, an upper bound) is reserved before it goes upstream and settled with the real
    usage when it ends, so parallel requests cannot together exceed the window. The reservations live in this
    process (the `limits` windows have no refund); gateways sharing Redis share the charged usage, not the holds."""

    def __init__(self, uri: str, requests_per_min: int, tokens_per_min: int):
        # redis-py (already in the lock) as the client, not the library's default coredis
        self.storage = storage_from_string("async+" + uri, **({"implementation": "redispy"} if uri.startswith("redis") else {}))
        self.strategy = MovingWindowRateLimiter(self.storage)
        self.req = RateLimitItemPerMinute(requests_per_min, namespace="requests")
        self.tok = RateLimitItemPerMinute(tokens_per_min, namespace="tokens")
        self._held: dict[str, int] = {}  # token name -> tokens reserved by requests in flight
        self._holds: dict[str, tuple[str, int]] = {}  # request id -> (token name, tokens reserved)
        self._lock = asyncio.Lock()

    async def _retry_after(self, item, key: str) -> int:
        stats = await self.strategy.get_window_stats(item, key)
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def hit(self, key: str) -> None:
        """Count one request (every endpoint that writes); 429 over requests_per_min."""
        if not await self.strategy.hit(self.req, key):
            wait = await self._retry_after(self.req, key)
            raise GatewayError(429, f"token {key!r} sent its {self.req.amount} requests per minute; retry in {wait} s",
                               "rate_limit_exceeded", "rate_limit_error", {"Retry-After": str(wait)})

    async def admit(self, key: str) -> None:
        """A model request: refused while the token's tokens/min window is used up, then counted."""
        if not await self.strategy.test(self.tok, key):
            wait = await self._retry_after(self.tok, key)
            raise GatewayError(429, f"token {key!r} used its {self.tok.amount} tokens per minute; retry in {wait} s",
                               "rate_limit_exceeded", "rate_limit_error", {"Retry-After": str(wait)})
        await self.hit(key)

    async def reserve(self, key: str, request_id: str, tokens: int) -> None:
        """Hold `tokens` of the token's budget for `request_id`: 429 when what is left in the window, less what
        requests in flight hold, is smaller (400 when the request could never fit)."""
        if tokens > self.tok.amount:
            raise GatewayError(400, f"this request may use up to {tokens:,} tokens (prompt + n x max_tokens), over the "
                               f"{self.tok.amount:,} tokens per minute of token {key!r}: lower max_tokens or n",
                               "request_over_budget")
        async with self._lock:  # the check and the hold together: two requests cannot both take the last tokens
            left = (await self.strategy.get_window_stats(self.tok, key)).remaining - self._held.get(key, 0)
            if left < tokens:
                wait = await self._retry_after(self.tok, key)
                raise GatewayError(429, f"token {key!r} has {max(left, 0):,} of its {self.tok.amount:,} tokens per "
                                   f"minute free and this request may use {tokens:,}; retry in {wait} s",
                                   "rate_limit_exceeded", "rate_limit_error", {"Retry-After": str(wait)})
            self._held[key] = self._held.get(key, 0) + tokens
            self._holds[request_id] = (key, tokens)

    async def settle(self, key: str, request_id: str, tokens: int) -> None:
        """Release the request's hold (if any; once) and charge what it really used."""
        key_held = self._holds.pop(request_id, None)
        if key_held:
            self._held[key_held[0]] -= key_held[1]
            if not self._held[key_held[0]]:
                del self._held[key_held[0]]
        if tokens > 0:
            remaining = (await self.strategy.get_window_stats(self.tok, key)).remaining
            if remaining > 0:  # a request larger than what is left fills the window (the next one waits)
                await self.strategy.hit(self.tok, key, cost=min(tokens, remaining))


def _error(exc: GatewayError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class BodyTooLarge(GatewayError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over {limit:,} bytes (serving.gateway.max_body_bytes)",
                         "request_too_large")


class BodyLimit:
    """413 for a request body over `max_bytes`: by its Content-Length before a byte of it is read, and by counting
    while a chunked body is read (the read stops at the limit). Pure ASGI rather than Starlette's BaseHTTPMiddleware,
    which would buffer every response stream."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _error(BodyTooLarge(self.max_bytes))(scope, receive, send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except BodyTooLarge as exc:
            if not started:
                await _error(exc)(scope, receive, send)


def _validate(body: Any, max_prompt_chars: Optional[int] = None) -> list[dict]:
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object", "invalid_request")
    if "model" in body and body["model"] is not None and not isinstance(body["model"], str):
        raise GatewayError(400, f"'model' must be a string (an alias, name@version, vN or auto); got "
                           f"{type(body['model']).__name__}", "invalid_model")
    if "stream_options" in body and body["stream_options"] is not None and not isinstance(body["stream_options"], dict):
        raise GatewayError(400, "'stream_options' must be an object, e.g. {\"include_usage\": true}", "invalid_request")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise GatewayError(400, "'messages' must be a non-empty list of {role, content} objects", "empty_messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise GatewayError(400, f"messages[{i}] needs a role of system, user or assistant", "invalid_message")
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or (m["role"] == "user" and not content.strip()):
            raise GatewayError(400, f"messages[{i}] ({m['role']}) has empty content", "empty_messages")
    if max_prompt_chars is not None:
        total = sum(len(_text(m)) for m in msgs)
        if total > max_prompt_chars:
            raise GatewayError(413, f"the messages hold {total:,} characters, over {max_prompt_chars:,} "
                               "(serving.gateway.max_prompt_chars)", "prompt_too_large")
    return msgs


def _capped(body: dict, gw) -> int:
    """Check `n` and `max_tokens` (or `max_completion_tokens`) against the configured caps and return the request's
    token budget to reserve: the prompt's characters (an estimate of its tokens; the settlement charges the real
    count) + n x max_tokens (serving.gateway.max_tokens when the request leaves it unset)."""
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= gw.max_n:
        raise GatewayError(400, f"'n' must be a whole number from 1 to {gw.max_n} (serving.gateway.max_n); got {n!r}",
                           "invalid_n")
    most = gw.max_tokens
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= gw.max_tokens:
            raise GatewayError(400, f"{key!r} must be a whole number from 1 to {gw.max_tokens} "
                               f"(serving.gateway.max_tokens); got {v!r}", "invalid_max_tokens")
        most = min(most, v)
    return sum(len(_text(m)) for m in body["messages"]) + n * most


def _text(m: dict) -> str:
    c = m.get("content")
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c or [] if isinstance(p, dict))


class Gateway:
    def __init__(self, loaded: LoadedConfig, *, upstreams: Optional[list[str]] = None, catalog: Optional[Catalog] = None,
                 db: Optional[GatewayDb] = None, replicas_file: Optional[Path] = None):
        import os

        cfg = loaded.config
        self.loaded, self.gw = loaded, cfg.serving.gateway
        # serving.decoding's stop strings and grammar: vLLM has no server-side default for them, so every request
        # that sets no `stop` (no constraint) of its own gets them here (the evaluation decodes with the same: what is
        # evaluated is what is served)
        self.decoding = cfg.serving.decoding
        self.db = db or GatewayDb(database_url(loaded))
        self.catalog = catalog or Catalog(loaded)
        self.metrics = Metrics()
        self.limiter = Limiter(self.gw.limits_storage, self.gw.requests_per_min, self.gw.tokens_per_min)
        key_env = cfg.serving.api_key_env
        self.upstream_headers = {"Authorization": f"Bearer {os.environ[key_env]}"} if key_env and os.environ.get(key_env) else {}
        self.upstream_urls = upstreams or self.gw.upstreams or [
            f"http://{cfg.serving.host}:{cfg.serving.port + i}/v1" for i in range(cfg.serving.replicas)]
        # no replicas named: follow the list `make serve` keeps (it changes when a merged champion is replaced)
        self.replicas_source = (None if upstreams or self.gw.upstreams else
                                (lambda: read_replicas(replicas_file or REPLICAS_FILE)))
        self.client: Optional[httpx.AsyncClient] = None
        self.pool: Optional[ReplicaPool] = None
        self._auth_cache: dict[str, tuple[float, Principal]] = {}
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ---
    async def start(self) -> None:
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.gw.upstream_timeout_s, connect=5.0),
                                        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        self.pool = ReplicaPool(self.upstream_urls, self.client, self.upstream_headers, source=self.replicas_source)
        await asyncio.gather(self.catalog.refresh(), self.pool.check_all())
        self._tasks = [asyncio.create_task(self._every(self.gw.registry_refresh_s, self.catalog.refresh)),
                       asyncio.create_task(self._every(self.gw.health_interval_s, self.pool.check_all))]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*self._tasks)
        if self.client:
            await self.client.aclose()

    @staticmethod
    async def _every(seconds: float, fn) -> None:
        while True:
            await asyncio.sleep(seconds)
            with contextlib.suppress(Exception):
                await fn()

    # --- auth ---
    async def principal(self, request: Request, admin: bool = False) -> Principal:
        """The token of the request's `Authorization: Bearer` header (routes.py's dependencies read it through
        FastAPI's HTTPBearer; the chat, feedback and arena handlers here read it themselves)."""
        header = request.headers.get("authorization", "")
        return await self.authenticate(header[7:].strip() if header.lower().startswith("bearer ") else "", admin)

    def forget_tokens(self) -> None:
        """Drop the auth cache (a revoked token is refused at once by this gateway, within 5 s by the others)."""
        self._auth_cache.clear()

    async def authenticate(self, token: str, admin: bool = False) -> Principal:
        if not token:
            raise GatewayError(401, "no API token: send `Authorization: Bearer <token>` (create one with "
                               "`make token NAME=you ROLE=user`)", "invalid_api_key", "authentication_error")
        hit = self._auth_cache.get(token)
        if hit and hit[0] > time.monotonic():
            p = hit[1]
        else:
            row = await run_in_threadpool(self.db.check_token, token)
            if row is None:
                raise GatewayError(401, "the API token is unknown, revoked or expired", "invalid_api_key",
                                   "authentication_error")
            p = Principal(row.name, row.role)
            self._auth_cache[token] = (time.monotonic() + 5.0, p)  # a revocation takes effect within 5 s
        if admin and p.role != "admin":
            raise GatewayError(403, f"token {p.name!r} has role {p.role}; this endpoint needs an admin token",
                               "forbidden", "permission_error")
        return p

    # --- chat ---
    async def chat(self, request: Request) -> Response:
        rid = "chatcmpl-gw-" + uuid.uuid4().hex[:24]
        t0 = time.monotonic()
        row: dict[str, Any] = {"request_id": rid, "status": 200, "stream": False}
        target: Optional[Target] = None
        try:
            p = await self.principal(request)
            row["token_name"] = p.name
            await self.limiter.admit(p.name)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise GatewayError(400, "the request body is not valid JSON", "invalid_json") from None
            msgs = _validate(body, self.gw.max_prompt_chars)
            await self.limiter.reserve(p.name, rid, _capped(body, self.gw))
            conv_id = body.pop("conversation_id", None)
            if conv_id is not None and (not isinstance(conv_id, int) or isinstance(conv_id, bool)
                                        or not 0 < conv_id < 2 ** 63 or
                                        await run_in_threadpool(self.db.conversation, p.name, conv_id) is None):
                raise _no_conversation(conv_id, p.name)
            prompt = next((_text(m) for m in reversed(msgs) if m["role"] == "user"), "")
            row.update(requested_model=body.get("model") or self.gw.default_model, stream=bool(body.get("stream")))
            if self.gw.log_text:
                row["prompt"] = prompt  # masked by the database layer, in a worker thread
            target = self.catalog.resolve(body.get("model"), prompt)
            if p.role != "admin" and self.catalog.hidden(target):
                raise _hidden(target)
            row.update(alias=target.alias, version=target.version, upstream_model=target.upstream_model,
                       canary=target.canary, route=target.route)
            # the request's own fields first (vLLM echoes the request in its errors: the stored error starts with what the
            # user sent, not with the grammar), then the defaults it did not set
            upstream_body = {**body, **self.decoding.defaults_for(body), "model": target.upstream_model}
            if row["stream"]:
                upstream_body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            opened = await self._unless_disconnected(request, self._open(upstream_body, target, row))
            if opened is None:  # the client left before the upstream answered (a long prefill, a non-streamed answer)
                row.update(status=499, error="client disconnected", latency_ms=(time.monotonic() - t0) * 1000)
                self.metrics.cancelled.inc()
                await self._finish_error(row, t0)
                return Response(status_code=499)
            resp, replica, attempts = opened
            row.update(replica=replica.base_url, attempts=attempts)
            if resp.status_code >= 400:  # the upstream's own error (context too long, bad parameter): relayed as is
                content = await resp.aread()
                await resp.aclose()
                replica.inflight -= 1
                self.metrics.inflight.labels(replica.base_url).set(replica.inflight)
                try:
                    err = json.loads(content)
                    message = (err.get("error") or {}).get("message") or err.get("message") or str(err)
                except ValueError:
                    message = content.decode("utf-8", "replace")[:500]
                raise GatewayError(resp.status_code, message, "upstream_error" if resp.status_code >= 500 else
                                   "invalid_request", "invalid_request_error" if resp.status_code < 500 else "server_error")
            if row["stream"]:
                return StreamingResponse(self._relay(resp, replica, row, t0, p, target, msgs, conv_id),
                                         media_type="text/event-stream", headers={"X-Request-Id": rid})
            return await self._whole(request, resp, replica, row, t0, p, target, msgs, conv_id)
        except GatewayError as exc:
            row.update(status=exc.status, error=exc.message, latency_ms=(time.monotonic() - t0) * 1000)
            self.metrics.errors.labels(exc.code).inc()
            self.metrics.requests.labels(row.get("alias") or "-", str(exc.status)).inc()
            if "token_name" in row:  # unauthenticated noise is counted, not stored
                await self.limiter.settle(row["token_name"], rid, 0)
                await self._record(row)
            return _error(exc)

    async def _open(self, body: dict, target: Target, row: dict) -> tuple[httpx.Response, Any, int]:
        """Send the request to the least busy healthy replica; a replica that fails before answering (connection
        refused, 5xx, timeout to the first byte) is marked unhealthy and the next one is tried, up to `retries`
        failures. A replica that cannot serve the model (merged weights of another version) is skipped."""
        tried: set[str] = set()
        last, failures, attempt, refused = "no replica is configured", 0, 0, None
        while failures <= self.gw.retries:
            replica = self.pool.pick(tried, target.upstream_model)
            if replica is None:
                break
            attempt += 1
            tried.add(replica.base_url)
            replica.inflight += 1
            self.metrics.inflight.labels(replica.base_url).set(replica.inflight)
            try:
                await self.pool.ensure_model(replica, target, self.catalog)
                req = self.client.build_request("POST", f"{replica.base_url}/chat/completions", json=body,
                                                headers=self.upstream_headers)
                resp = await self.client.send(req, stream=True)
                if resp.status_code < 500:
                    replica.served += 1
                    return resp, replica, attempt
                last = f"{replica.base_url} answered {resp.status_code}: {(await resp.aread())[:200].decode('utf-8', 'replace')}"
                await resp.aclose()
            except httpx.TimeoutException as exc:
                last = f"{replica.base_url} timed out ({type(exc).__name__})"
                if failures >= self.gw.retries:
                    replica.inflight -= 1
                    raise GatewayError(504, f"the upstream model server timed out: {last}", "upstream_timeout",
                                       "server_error") from exc
            except httpx.HTTPError as exc:
                last = f"{replica.base_url}: {type(exc).__name__}: {exc}"
            except GatewayError as exc:
                replica.inflight -= 1
                self.metrics.inflight.labels(replica.base_url).set(replica.inflight)
                if exc.code != "model_not_served":
                    raise
                refused = exc  # this replica serves other weights: another may serve the model
                continue
            except asyncio.CancelledError:
                replica.inflight -= 1
                self.metrics.inflight.labels(replica.base_url).set(replica.inflight)
                raise
            replica.inflight -= 1
            self.metrics.inflight.labels(replica.base_url).set(replica.inflight)
            replica.healthy, replica.last_error = False, last  # the health loop brings it back
            failures += 1
            if failures <= self.gw.retries:
                self.metrics.retries.inc()
        if refused is not None and failures == 0:
            raise refused
        if not tried:
            fixed = [r for r in self.pool.replicas if r.healthy and r.fixed_models]
            if fixed:
                served = ", ".join(sorted({m for r in fixed for m in r.models}))
                raise GatewayError(503, f"no replica serves {target.registered_model} v{target.version} ({target.alias}):"
                                   f" the running replicas serve merged weights of other versions ({served}) and cannot "
                                   "load another at run time; serve several versions from one vLLM with "
                                   "serving.adapter_mode: lora", "model_not_served", "server_error")
            down = "; ".join(f"{r.base_url}: {r.last_error or 'unhealthy'}" for r in self.pool.replicas)
            raise GatewayError(503, f"no healthy model server replica ({down}); is `make serve` running?",
                               "no_healthy_replica", "server_error")
        raise GatewayError(502, f"the upstream model server failed: {last}", "upstream_unavailable", "server_error")

    async def _whole(self, request: Request, resp: httpx.Response, replica, row: dict, t0: float, p: Principal,
                     target: Target, msgs: list[dict], conv_id: Optional[int]) -> Response:
        try:
            content = await self._unless_disconnected(request, resp.aread())
            if content is None:  # the client left: stop the upstream request too
                self.metrics.cancelled.inc()
                row.update(status=499, error="client disconnected")
                return Response(status_code=499)
            data = json.loads(content)
            usage = data.get("usage") or {}
            answer = "".join((c.get("message") or {}).get("content") or "" for c in data.get("choices", []))
            data["id"] = row["request_id"]
            data["model"] = target.alias  # the client sees what it asked for, the row records the version
            row.update(input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens"))
            await self._finish(row, t0, p, target, msgs, answer, conv_id)
            return JSONResponse(data, headers={"X-Request-Id": row["request_id"]})
        finally:
            await resp.aclose()
            replica.inflight -= 1
            self.metrics.inflight.labels(replica.base_url).set(replica.inflight)
            if row["status"] != 200:
                await self._finish_error(row, t0)

    @staticmethod
    async def _unless_disconnected(request: Request, coro):
        """Await `coro` unless the client disconnects first: then it is cancelled (closing its upstream connection,
        which makes vLLM abort the request) and None is returned."""
        work = asyncio.ensure_future(coro)

        async def gone() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)

        watch = asyncio.ensure_future(gone())
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if work in done:
            return work.result()
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        return None

    async def _relay(self, resp: httpx.Response, replica, row: dict, t0: float, p: Principal, target: Target,
                     msgs: list[dict], conv_id: Optional[int]) -> AsyncIterator[bytes]:
        parts: list[str] = []
        ttft: Optional[float] = None
        finished = closed = False
        try:
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line[6:].strip() == "[DONE]":
                    # the usage row (and the exchange) are written before the client sees the end, so feedback
                    # posted right after the answer finds its request
                    finished = closed = True
                    await asyncio.shield(self._close_stream(resp, replica, row, t0, p, target, msgs, parts, ttft,
                                                            conv_id, True))
                    yield (line + "\n\n").encode("utf-8")
                    break  # (the upstream response is closed; nothing follows [DONE])
                if line.startswith("data: "):
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        chunk = {}
                    for c in chunk.get("choices") or []:
                        text = (c.get("delta") or {}).get("content") or ""
                        if text:
                            ttft = ttft if ttft is not None else time.monotonic() - t0
                            parts.append(text)
                    if chunk.get("usage"):
                        row.update(input_tokens=chunk["usage"].get("prompt_tokens"),
                                   output_tokens=chunk["usage"].get("completion_tokens"))
                    chunk["id"], chunk["model"] = row["request_id"], target.alias
                    line = "data: " + json.dumps(chunk, ensure_ascii=False)
                yield (line + "\n").encode("utf-8")
            finished = True
        except httpx.HTTPError as exc:  # the replica died mid-stream: the client already has tokens, so no retry
            row.update(status=502, error=f"upstream stream broke: {type(exc).__name__}: {exc}")
            err = GatewayError(502, row["error"], "upstream_stream_broken", "server_error")
            yield f"data: {json.dumps(err.body())}\n\n".encode("utf-8")
        finally:
            # runs on normal end, on an upstream error, and when the client disconnected (the task is cancelled)
            if not closed:
                await asyncio.shield(self._close_stream(resp, replica, row, t0, p, target, msgs, parts, ttft, conv_id,
                                                        finished))

    async def _close_stream(self, resp, replica, row, t0, p, target, msgs, parts, ttft, conv_id, finished) -> None:
        await resp.aclose()  # closes the upstream connection: vLLM aborts a request whose client is gone
        replica.inflight -= 1
        self.metrics.inflight.labels(replica.base_url).set(replica.inflight)
        row["ttft_ms"] = ttft * 1000 if ttft is not None else None
        if ttft is not None:
            self.metrics.ttft.labels(target.alias).observe(ttft)
        if not finished and row["status"] == 200:
            self.metrics.cancelled.inc()
            row.update(status=499, error="client disconnected")
        if row["status"] == 200:
            await self._finish(row, t0, p, target, msgs, "".join(parts), conv_id)
        else:
            if self.gw.log_text:
                row["answer"] = "".join(parts)
            await self._finish_error(row, t0)

    async def _finish(self, row: dict, t0: float, p: Principal, target: Target, msgs: list[dict], answer: str,
                      conv_id: Optional[int]) -> None:
        latency = time.monotonic() - t0
        row["latency_ms"] = latency * 1000
        if self.gw.log_text:
            row["answer"] = answer
        m = self.metrics
        m.requests.labels(target.alias, "200").inc()
        m.latency.labels(target.alias).observe(latency)
        m.tokens.labels("input").inc(row.get("input_tokens") or 0)
        m.tokens.labels("output").inc(row.get("output_tokens") or 0)
        await self.limiter.settle(p.name, row["request_id"], (row.get("input_tokens") or 0) + (row.get("output_tokens") or 0))
        await self._record(row)
        if self.gw.log_text:  # the context an answer was given in, for feedback on it (make harvest)
            with contextlib.suppress(Exception):
                await run_in_threadpool(self.db.add_exchange, row["request_id"], p.name, _plain(msgs))
        if conv_id is not None:
            user = next((m for m in reversed(msgs) if m["role"] == "user"), None)
            system = next((_text(m) for m in msgs if m["role"] == "system"), None)
            new = ([{"role": "user", "content": _text(user)}] if user else []) + [{"role": "assistant", "content": answer}]
            await run_in_threadpool(self.db.add_messages, conv_id, new, row["request_id"], model=row["requested_model"],
                                    system_prompt=system)

    async def _finish_error(self, row: dict, t0: float) -> None:
        row.setdefault("latency_ms", (time.monotonic() - t0) * 1000)
        if row.get("token_name"):  # what a cut or failed request used is charged; its hold is released
            await self.limiter.settle(row["token_name"], row["request_id"],
                                      (row.get("input_tokens") or 0) + (row.get("output_tokens") or 0))
        self.metrics.requests.labels(row.get("alias") or "-", str(row["status"])).inc()
        self.metrics.errors.labels("client_disconnected" if row["status"] == 499 else "upstream").inc()
        await self._record(row)

    async def _record(self, row: dict) -> None:
        try:
            await run_in_threadpool(self.db.add_usage, **row)
        except Exception as exc:  # noqa: BLE001 - a usage row lost is reported, the answer still goes out
            import sys

            print(f"[gateway] usage row {row.get('request_id')} not written: {type(exc).__name__}: {exc}", file=sys.stderr)

    # --- feedback and arena ---
    async def feedback(self, request: Request) -> dict:
        p = await self.principal(request)
        await self.limiter.hit(p.name)
        body = await _json(request)
        rid = body.get("request_id")
        if not isinstance(rid, str) or not rid:
            raise GatewayError(400, "feedback needs `request_id`: the `id` of the chat completion it is about",
                               "invalid_feedback")
        rating = body.get("rating")
        if rating not in (None, "up", "down", 1, -1):
            raise GatewayError(400, f"rating {rating!r}: use \"up\", \"down\" or leave it out", "invalid_feedback")
        correction = body.get("correction")
        if correction is not None and (not isinstance(correction, str) or not correction.strip()):
            raise GatewayError(400, "correction must be the corrected answer's text (non-empty)", "invalid_feedback")
        if rating is None and correction is None:
            raise GatewayError(400, "feedback needs a rating (up/down), a correction, or both", "invalid_feedback")
        used = await run_in_threadpool(self.db.answered, p.name, rid)
        if used is None:
            raise GatewayError(404, f"no answered request {rid!r} for token {p.name!r}", "request_not_found")
        comment = body.get("comment")
        row = await run_in_threadpool(
            self.db.set_feedback, p.name, rid, alias=used["alias"], version=used["version"],
            rating={"up": 1, "down": -1}.get(rating, rating), correction=correction or None,
            comment=str(comment) if comment else None)
        self.metrics.feedback.labels("up" if row["rating"] == 1 else "down" if row["rating"] == -1 else "none",
                                     str(bool(row["correction"])).lower()).inc()
        return {"object": "feedback", **{k: row[k] for k in ("request_id", "alias", "version", "rating", "correction",
                                                               "comment", "updated_at")}}

    async def arena(self, request: Request) -> dict:
        p = await self.principal(request)
        await self.limiter.admit(p.name)
        body = await _json(request)
        msgs = _validate(body, self.gw.max_prompt_chars)
        models = body.get("models") or list(self.gw.arena.models)
        if not (isinstance(models, list) and len(models) == 2 and all(isinstance(m, str) for m in models)):
            raise GatewayError(400, f"models: two model names, e.g. [\"champion\", \"candidate\"]; got {models!r}",
                               "invalid_arena")
        prompt = next((_text(m) for m in reversed(msgs) if m["role"] == "user"), "")
        targets = [self.catalog.resolve(m, prompt, canary_split=False) for m in models]
        if targets[0].version == targets[1].version:
            raise GatewayError(409, f"{models[0]} and {models[1]} are the same version (v{targets[0].version}): the "
                               "arena needs two different models (register a candidate with `make loop`)",
                               "arena_same_model")
        per_pair = self.gw.arena.votes_per_pair
        if await run_in_threadpool(self.db.pair_votes, p.name, targets[0].version, targets[1].version) >= per_pair:
            raise GatewayError(409, f"token {p.name!r} already voted on v{targets[0].version} vs v{targets[1].version} "
                               f"({per_pair} vote(s) per token per pair: serving.gateway.arena.votes_per_pair); the "
                               "arena opens again for the next candidate", "arena_pair_voted")
        secrets.SystemRandom().shuffle(targets)  # blind: which side is which is drawn per match, never shown
        arena = self.gw.arena
        pinned = sorted(k for k in body if k in SAMPLING_KEYS)
        if pinned:
            raise GatewayError(400, f"the arena samples every match with the same settings (serving.gateway.arena: "
                               f"temperature {arena.temperature}, top_p {arena.top_p}); leave out {', '.join(pinned)}",
                               "invalid_arena")
        most = body.get("max_tokens", arena.max_tokens)
        if not isinstance(most, int) or isinstance(most, bool) or not 1 <= most <= arena.max_tokens:
            raise GatewayError(400, f"max_tokens must be a whole number from 1 to {arena.max_tokens} "
                               "(serving.gateway.arena.max_tokens)", "invalid_arena")
        params = {"temperature": arena.temperature, "top_p": arena.top_p, "max_tokens": most, **self.decoding.request_defaults()}
        hold = "arena-" + uuid.uuid4().hex[:24]
        await self.limiter.reserve(p.name, hold, 2 * (sum(len(_text(m)) for m in msgs) + most))
        try:
            answers = await asyncio.gather(*(self._answer(p, msgs, t, params) for t in targets))
        finally:  # each answer charged its own usage
            await self.limiter.settle(p.name, hold, 0)
        a, b = ({"model": t.alias, "version": t.version, "answer": ans, "request_id": rid}
                for t, (ans, rid) in zip(targets, answers))
        match = await run_in_threadpool(self.db.create_match, p.name, _plain(msgs), a, b)
        return {"id": match["id"], "object": "arena.match",
                "answers": [{"label": "A", "content": answers[0][0]}, {"label": "B", "content": answers[1][0]}]}

    async def _answer(self, p: Principal, msgs: list[dict], target: Target, params: dict) -> tuple[str, str]:
        """One non-streamed completion through the replicas, recorded as a usage row: (answer, request id)."""
        rid = "chatcmpl-gw-" + uuid.uuid4().hex[:24]
        t0 = time.monotonic()
        row: dict[str, Any] = {"request_id": rid, "status": 200, "stream": False, "token_name": p.name,
                               "requested_model": f"arena:{target.alias}", "alias": target.alias,
                               "version": target.version, "upstream_model": target.upstream_model}
        if self.gw.log_text:
            row["prompt"] = next((_text(m) for m in reversed(msgs) if m["role"] == "user"), "")
        try:
            resp, replica, attempts = await self._open({"messages": msgs, **params, "model": target.upstream_model},
                                                       target, row)
        except GatewayError as exc:
            row.update(status=exc.status, error=exc.message)
            await self._finish_error(row, t0)
            raise
        row.update(replica=replica.base_url, attempts=attempts)
        try:
            content = await resp.aread()
            if resp.status_code >= 400:
                raise GatewayError(resp.status_code, content.decode("utf-8", "replace")[:500], "upstream_error",
                                   "server_error" if resp.status_code >= 500 else "invalid_request_error")
            data = json.loads(content)
        except GatewayError as exc:
            row.update(status=exc.status, error=exc.message)
            await self._finish_error(row, t0)
            raise
        finally:
            await resp.aclose()
            replica.inflight -= 1
            self.metrics.inflight.labels(replica.base_url).set(replica.inflight)
        usage = data.get("usage") or {}
        answer = "".join((c.get("message") or {}).get("content") or "" for c in data.get("choices", []))
        row.update(input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens"))
        await self._finish(row, t0, p, target, msgs, answer, None)
        return answer, rid

    async def vote(self, request: Request, match_id: int) -> dict:
        from serving.gateway.db import GatewayDbError

        p = await self.principal(request)
        await self.limiter.hit(p.name)
        body = await _json(request)
        try:
            m = await run_in_threadpool(self.db.vote, p.name, match_id, str(body.get("winner")),
                                        self.gw.arena.votes_per_pair)
        except GatewayDbError as exc:
            raise GatewayError(409 if "already" in str(exc) else 400, str(exc), "invalid_vote") from None
        if m is None:
            raise GatewayError(404, f"arena match {match_id} does not exist for token {p.name!r}", "match_not_found")
        self.metrics.votes.labels(m["winner"]).inc()
        return {"id": m["id"], "object": "arena.vote", "winner": m["winner"],
                "A": {"model": m["model_a"], "version": m["version_a"]},
                "B": {"model": m["model_b"], "version": m["version_b"]}}

    def health(self) -> dict:
        reps = [{"url": r.base_url, "healthy": r.healthy, "inflight": r.inflight, "served": r.served,
                 "models": sorted(r.models), "error": r.last_error} for r in self.pool.replicas]
        ok = any(r["healthy"] for r in reps) and bool(self.catalog.aliases)
        return {"status": "ok" if ok else "degraded", "replicas": reps, "aliases": self.catalog.aliases,
                "registry": {"model": self.catalog.name, "error": self.catalog.error,
                             "refreshed_at": self.catalog.refreshed_at}}


def _plain(msgs: list[dict]) -> list[dict]:
    """The messages as text (the database layer masks them)."""
    return [{"role": m["role"], "content": _text(m)} for m in msgs]


def _hidden(target: Target) -> GatewayError:
    return GatewayError(403, f"{target.requested!r} (v{target.version}) is in the arena's blind comparison: a user token "
                        "may not ask for it directly (an admin token may; serving.gateway.arena.hide_models)",
                        "model_hidden")


def _no_conversation(conv_id, token_name: str) -> GatewayError:
    """Another token's conversation is not found, not forbidden (its existence is not revealed)."""
    return GatewayError(404, f"conversation {conv_id!r} does not exist for token {token_name!r}", "conversation_not_found")


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise GatewayError(400, "the request body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object", "invalid_request")
    return body
