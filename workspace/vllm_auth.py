"""vLLM's own API-key check (VLLM_API_KEY / --api-key) guards only the /v1, /v2, /inference and /cohere routes;
/metrics (Prometheus: request counts, model names, adapter names, latencies), /tokenize, /detokenize, /load and the
OpenAPI docs answer anyone. This ASGI middleware, loaded by vLLM itself (`--middleware
workspace.vllm_auth.RequireKey`, added by workspace/vllm_server.py when `serving.api_key_env` is set), asks for
the same Bearer key on every route but the liveness probes (/health, /ping), which carry nothing and which
health checks and load balancers call without credentials.

Runs inside the serve environment (starlette comes with vLLM); imports nothing else from the workspace.
"""
from __future__ import annotations

import hashlib
import os
import secrets

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

OPEN_PATHS = ("/health", "/ping")


class RequireKey:
    """Pure ASGI: 401 in OpenAI's error shape unless `Authorization: Bearer <VLLM_API_KEY>` (OPTIONS passes, for CORS)."""

    def __init__(self, app) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    def _authorised(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(hashlib.sha256(token.encode()).digest(), self.digest)

    async def __call__(self, scope, receive, send) -> None:
        if (self.digest is None or scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS"
                or scope["path"].removeprefix(scope.get("root_path", "")) in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        if not self._authorised(Headers(scope=scope)):
            response = JSONResponse({"error": {"message": "a valid API key is required (Authorization: Bearer <key>)",
                                               "type": "invalid_request_error", "code": "invalid_api_key"}},
                                    status_code=401)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
