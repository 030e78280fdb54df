"""The gateway's HTTP surface in FastAPI's own terms: one router per concern (the OpenAI API, conversations,
feedback and arena, admin, the page), auth as dependencies on an `HTTPBearer` scheme, pydantic models for the
request bodies the gateway itself owns, and exception handlers that turn every error into OpenAI's shape.

The chat body is the exception: it is the OpenAI request, passed on to vLLM with every key the client set, so the
gateway checks only what it relies on (serving/gateway/core.py: `_validate`) instead of modelling the whole API.

    app = create_app(loaded)                # build_app(Gateway(loaded)): what `make gateway` serves
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import re
from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.gateway.core import STATIC, BodyLimit, Gateway, Principal, _error, _no_conversation
from serving.gateway.harvest import HarvestError, parse_since
from serving.gateway.routing import GatewayError
from workspace.config.load import LoadedConfig

# the scheme (documented in /openapi.json); auto_error off: a missing token is the gateway's own OpenAI-shaped 401
bearer = HTTPBearer(auto_error=False, description="a gateway API token: `make token NAME=you ROLE=user`")


# ------------------------------------------------------------------------------------------------ dependencies
def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def user(gw: Gateway = Depends(gateway),
               creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> Principal:
    """Any valid token (401 without one, or with one unknown, revoked or expired)."""
    return await gw.authenticate(creds.credentials if creds else "")


async def admin(gw: Gateway = Depends(gateway),
                creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> Principal:
    """An admin token (403 for a user token)."""
    return await gw.authenticate(creds.credentials if creds else "", admin=True)


async def user_write(p: Principal = Depends(user), gw: Gateway = Depends(gateway)) -> Principal:
    """A user token within its requests/min: every endpoint that writes counts against it (429 over it)."""
    await gw.limiter.hit(p.name)
    return p


async def admin_write(p: Principal = Depends(admin), gw: Gateway = Depends(gateway)) -> Principal:
    await gw.limiter.hit(p.name)
    return p


# ------------------------------------------------------------------------------------------------ request bodies
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelled key is a 400 naming it, not silently ignored


class NewConversation(Body):
    title: Optional[str] = Field(None, description="masked, then cut to the stored length")
    model: Optional[str] = None
    system_prompt: Optional[str] = None


class ConversationUpdate(Body):
    title: Optional[str] = None
    model: Optional[str] = None


class NewToken(Body):
    name: Optional[str] = None  # checked by the database layer (names it refuses are named in the 400)
    role: Literal["user", "admin"] = "user"
    # 30d, 12h or 45m; none: until revoked (a number is let through to be refused with the lifetime's own message)
    expires_in: Optional[str | int | float] = None


# ------------------------------------------------------------------------------------------------ routers
openai_api = APIRouter(prefix="/v1", tags=["OpenAI API"])
conversations = APIRouter(prefix="/v1/conversations", tags=["conversations"])
feedback = APIRouter(prefix="/v1", tags=["feedback and arena"])
admin_api = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin)])
service = APIRouter(tags=["service"])


@openai_api.post("/chat/completions")
async def chat(request: Request, gw: Gateway = Depends(gateway)) -> Response:
    # authenticates inside: a refused request still leaves its usage row (who, what, why)
    return await gw.chat(request)


@openai_api.get("/models")
async def models(p: Principal = Depends(user), gw: Gateway = Depends(gateway)) -> dict:
    return {"object": "list", "data": gw.catalog.models(admin=p.role == "admin")}


@conversations.post("")
async def new_conversation(body: NewConversation, p: Principal = Depends(user_write),
                           gw: Gateway = Depends(gateway)) -> dict:
    return await run_in_threadpool(gw.db.create_conversation, p.name, body.title or "new conversation", body.model,
                                   body.system_prompt or None)


@conversations.get("")
async def list_conversations(p: Principal = Depends(user), gw: Gateway = Depends(gateway)) -> dict:
    return {"object": "list", "data": await run_in_threadpool(gw.db.conversations, p.name)}


@conversations.get("/{conv_id}")
async def get_conversation(conv_id: int, p: Principal = Depends(user), gw: Gateway = Depends(gateway)) -> dict:
    c = await run_in_threadpool(gw.db.conversation, p.name, conv_id)
    if c is None:
        raise _no_conversation(conv_id, p.name)
    return c


@conversations.patch("/{conv_id}")
async def retitle(conv_id: int, body: ConversationUpdate, p: Principal = Depends(user_write),
                  gw: Gateway = Depends(gateway)) -> dict:
    c = await run_in_threadpool(gw.db.update_conversation, p.name, conv_id, title=body.title or None, model=body.model)
    if c is None:
        raise _no_conversation(conv_id, p.name)
    return c


@feedback.post("/feedback")
async def post_feedback(request: Request, gw: Gateway = Depends(gateway)) -> dict:
    return await gw.feedback(request)


@feedback.post("/arena")
async def arena(request: Request, gw: Gateway = Depends(gateway)) -> dict:
    return await gw.arena(request)


@feedback.post("/arena/{match_id}/vote")
async def vote(match_id: int, request: Request, gw: Gateway = Depends(gateway)) -> dict:
    return await gw.vote(request, match_id)


@admin_api.get("/usage")
async def usage(since: Optional[str] = None, token: Optional[str] = None, gw: Gateway = Depends(gateway)) -> dict:
    return {"object": "list", "data": await run_in_threadpool(gw.db.usage, _since(since), token),
            "summary": await run_in_threadpool(gw.db.usage_summary)}


@admin_api.get("/usage.csv")
async def usage_csv(since: Optional[str] = None, token: Optional[str] = None,
                    gw: Gateway = Depends(gateway)) -> Response:
    rows = await run_in_threadpool(gw.db.usage, _since(since), token)
    return PlainTextResponse(gw.db.usage_csv(rows), media_type="text/csv",
                             headers={"Content-Disposition": "attachment; filename=usage.csv"})


@admin_api.get("/tokens")
async def tokens(gw: Gateway = Depends(gateway)) -> dict:
    return {"object": "list", "data": await run_in_threadpool(gw.db.tokens)}


@admin_api.post("/tokens")
async def create_token(body: NewToken, _: Principal = Depends(admin_write), gw: Gateway = Depends(gateway)) -> dict:
    from serving.gateway.db import GatewayDbError, parse_lifetime

    try:
        lifetime = parse_lifetime(body.expires_in) if body.expires_in is not None else None
        token = await run_in_threadpool(gw.db.create_token, body.name, body.role, lifetime)
    except GatewayDbError as exc:
        raise GatewayError(400, str(exc), "invalid_token_request") from None
    return {"name": body.name, "role": body.role, "token": token}


@admin_api.delete("/tokens/{name}")
async def revoke(name: str, _: Principal = Depends(admin_write), gw: Gateway = Depends(gateway)) -> dict:
    if not await run_in_threadpool(gw.db.revoke_token, name):
        raise GatewayError(404, f"no token named {name!r}", "token_not_found")
    gw.forget_tokens()
    return {"name": name, "revoked": True}


@admin_api.post("/reload")
async def reload(_: Principal = Depends(admin_write), gw: Gateway = Depends(gateway)) -> dict:
    aliases = await gw.catalog.refresh()
    await gw.pool.check_all()
    return {"aliases": aliases, "error": gw.catalog.error}


@admin_api.get("/feedback")
async def feedback_rows(since: Optional[str] = None, gw: Gateway = Depends(gateway)) -> dict:
    return {"object": "list", "data": await run_in_threadpool(gw.db.feedback, _since(since))}


@admin_api.get("/arena")
async def arena_rows(since: Optional[str] = None, gw: Gateway = Depends(gateway)) -> dict:
    return {"object": "list", "data": await run_in_threadpool(gw.db.matches, _since(since)),
            "summary": await run_in_threadpool(gw.db.arena_summary)}


@service.get("/healthz")
async def healthz(request: Request, gw: Gateway = Depends(gateway),
                  creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> JSONResponse:
    """Up or down for anyone (a load balancer's probe); the replicas, aliases and registry for an admin token."""
    h = gw.health()
    code = 200 if h["status"] == "ok" else 503
    if not request.headers.get("authorization"):
        return JSONResponse({"status": h["status"]}, status_code=code)
    await gw.authenticate(creds.credentials if creds else "", admin=True)
    return JSONResponse(h, status_code=code)


@service.get("/metrics", dependencies=[Depends(admin)])
async def metrics(gw: Gateway = Depends(gateway)) -> Response:
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@service.get("/openapi.json", dependencies=[Depends(admin)], include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    """The API's schema, for admin tokens only (no Swagger page: it would load its assets from a CDN)."""
    return JSONResponse(request.app.openapi())


@service.get("/", include_in_schema=False)
async def page(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=request.app.state.page_headers)


# ------------------------------------------------------------------------------------------------ errors
async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
    return _error(exc)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body or parameter that does not fit its model: OpenAI's 400 naming the field, not FastAPI's 422."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
    return _error(GatewayError(400, f"{where}: {first.get('msg', 'invalid')}", "invalid_request"))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 for an unknown path, 405 for a wrong method, in OpenAI's shape too. FastAPI reports any failure while it
    reads a body model as a 400; the one that is the body limit's stays a 413."""
    if isinstance(exc.__cause__, GatewayError):
        return _error(exc.__cause__)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(GatewayError(exc.status_code, str(exc.detail), code))


# ------------------------------------------------------------------------------------------------ the app
def _since(value: Optional[str]):
    """A `since` query parameter: the harvest's ISO-date parser, its error as a 400 in OpenAI's shape."""
    try:
        return parse_since(value)
    except HarvestError:
        raise GatewayError(400, f"since={value!r} is not an ISO date (2026-11-26 or 2026-11-26T10:00)",
                           "invalid_since") from None


def create_app(loaded: LoadedConfig, **kw) -> FastAPI:
    """The gateway as an ASGI app (`kw`: Gateway's options, e.g. upstreams=[...] for tests)."""
    return build_app(Gateway(loaded, **kw))


def build_app(gw: Gateway) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    # no /docs or /redoc (their pages load Swagger/ReDoc from a CDN, blank offline); /openapi.json: admin only
    app = FastAPI(title="LLMOps gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw
    app.state.page_headers = page_headers(STATIC / "index.html")
    app.add_middleware(BodyLimit, max_bytes=gw.gw.max_body_bytes)
    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for router in (openai_api, conversations, feedback, admin_api, service):
        app.include_router(router)
    return app


def page_headers(html: Path) -> dict[str, str]:
    """The chat page keeps its token in localStorage, so nothing but its own inline script and style may run:
    a Content-Security-Policy that allows exactly those (by their SHA-256) and requests to this origin."""
    text = html.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
        if not found:
            raise RuntimeError(f"{html}: no inline <{tag}> to allow in the Content-Security-Policy")
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'" for b in found)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           "img-src 'self' data:; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY"}
