"""A stand-in for a vLLM replica, for the gateway's tests (the gateway is what they test; real vLLM behind the
gateway is tests/test_gateway_vllm.py): the same routes the gateway uses (/health, /v1/models,
/v1/load_lora_adapter, /v1/chat/completions streamed and not, with usage), answering with words that name the
adapter it loaded for the requested model, so a test sees which version answered. It records what happened:
requests, loaded adapters, streams that were cut before their end (a client gone), and can be told to fail
(500) or be stopped to play a dead replica. Runs uvicorn in a thread on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from workspace.processes import free_port


@dataclass
class UpstreamState:
    loaded: dict[str, str] = field(default_factory=dict)  # lora_name -> adapter weights' text
    requests: list[dict] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)  # each chat request's Authorization header ("" if none)
    cut: int = 0  # streams whose client went away before the last token
    completed: int = 0
    fail: bool = False
    token_delay_s: float = 0.0
    max_model_len: int = 64
    active: int = 0  # requests being answered now
    allow_load: bool = True  # False: like vLLM without run-time LoRA updating (a merged-weights replica)


def make_app(state: UpstreamState) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return JSONResponse({}, status_code=500 if state.fail else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in ["base", *state.loaded]]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        if not state.allow_load:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        body = await request.json()
        if body["lora_name"] in state.loaded:
            return JSONResponse({"error": {"message": f"The lora adapter '{body['lora_name']}' has already been loaded."}},
                                status_code=400)
        raw = (Path(body["lora_path"]) / "adapter_model.safetensors").read_bytes()
        try:
            weights = raw.decode()
        except UnicodeDecodeError:  # a real adapter (binary): named by the version folder it was fetched into
            weights = f"lora-{Path(body['lora_path']).parent.name}"
        state.loaded[body["lora_name"]] = weights
        return f"Success: LoRA adapter '{body['lora_name']}' added successfully."

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.requests.append(body)
        state.authorization.append(request.headers.get("authorization", ""))
        if state.fail:
            return JSONResponse({"error": {"message": "engine dead"}}, status_code=500)
        model = body["model"]
        if model not in state.loaded and model != "base":
            return JSONResponse({"error": {"message": f"The model `{model}` does not exist.", "code": 404}}, status_code=404)
        if float(body.get("temperature") or 0) > 2:  # vLLM's validation errors echo the request's input
            return JSONResponse({"error": {"message": f"temperature must be <= 2; input: {json.dumps(body, ensure_ascii=False)}",
                                           "type": "BadRequestError", "code": 400}}, status_code=400)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        if prompt_tokens > state.max_model_len:
            return JSONResponse({"error": {"message": f"This model's maximum context length is {state.max_model_len} "
                                           f"tokens. However, your request has {prompt_tokens} input tokens.",
                                           "type": "BadRequestError", "code": 400}}, status_code=400)
        n = int(body.get("max_tokens") or 8)
        words = [f"{state.loaded.get(model, 'base')}-{i}" for i in range(n)]
        stops = [(text.find(s), s) for text in [" ".join(words)] for s in body.get("stop") or [] if s in text]
        if stops:  # like vLLM: the text ends at the first stop string, kept with include_stop_str_in_output
            at, s = min(stops, key=lambda p: p[0] + len(p[1]))
            words = " ".join(words)[:at + (len(s) if body.get("include_stop_str_in_output") else 0)].split(" ")
            n = len(words)
        created = int(time.time())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        if not body.get("stream"):
            for _ in range(n):  # like vLLM: a client that went away aborts the request
                await asyncio.sleep(state.token_delay_s)
                if state.token_delay_s and await request.is_disconnected():
                    state.cut += 1
                    return JSONResponse({}, status_code=499)
            state.completed += 1
            return {"id": "up", "object": "chat.completion", "created": created, "model": model, "usage": usage,
                    "choices": [{"index": 0, "finish_reason": "length",
                                 "message": {"role": "assistant", "content": " ".join(words)}}]}

        async def gen():
            finished = False
            state.active += 1
            try:
                for i, w in enumerate(words):
                    await asyncio.sleep(state.token_delay_s)
                    chunk = {"id": "up", "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [{"index": 0, "delta": {"content": (" " if i else "") + w}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps({'id': 'up', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
                finished = True
                state.completed += 1
            finally:
                state.active -= 1
                if not finished:
                    state.cut += 1

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def _wait_started(server: uvicorn.Server, thread: threading.Thread, what: str, timeout: float) -> None:
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)


class Upstream:
    """`with Upstream() as up:` a replica stand-in at up.base_url (.../v1)."""

    def __init__(self, port: int | None = None):
        self.state = UpstreamState()
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "Upstream":
        self._server = uvicorn.Server(uvicorn.Config(make_app(self.state), host="127.0.0.1", port=self.port,
                                                     log_level="error", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        _wait_started(self._server, self._thread, f"the upstream stand-in on port {self.port}", 20)
        return self

    def stop(self) -> None:
        if self._server:
            self._server.should_exit = True
            self._server.force_exit = True
            self._thread.join(10)
            self._server = None

    def __enter__(self) -> "Upstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServeApp:
    """An ASGI app (the gateway) served by uvicorn in a thread on 127.0.0.1, for tests that need real HTTP (client
    disconnects, the browser)."""

    def __init__(self, app, port: int | None = None):
        self.app, self.port = app, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "ServeApp":
        _wait_started(self._server, self._thread, f"the app on port {self.port}", 30)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(15)
