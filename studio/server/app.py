"""The ASGI app: routes, token check, CORS, limits. Every model request is one engine job.

Limits answer in OpenAI's error shape: a body over the limit is 413, too many requests in flight
429, a missing or wrong token 401, max_tokens above the limit 400. A client that disconnects (while
its job is queued or running) cancels the engine job.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from studio.client import EngineClient
from studio.protocol import Message
from studio.server import catalog, openai_api
from studio.server.bridge import EngineBridge, JobStream
from studio.server.errors import APIError, bad, from_engine

DEFAULT_PORT = 8420  # not LM Studio's 1234 nor Ollama's 11434, so Studio can run beside them


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str = ""
    cors_origins: list[str] = field(default_factory=list)  # empty: CORS off
    max_body_bytes: int = 4 << 20
    max_tokens: int = 4096  # the most a request may ask for
    max_concurrent: int = 64  # requests in flight (queued in the engine or running); more get 429
    max_images: int = 4

    def check(self) -> None:
        """Refuse a setup that would expose the engine: beyond localhost a token is required."""
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"Listening on {self.host} makes the API reachable from other machines; give it a "
                             "token (--token or the STUDIO_API_TOKEN variable) or listen on 127.0.0.1.")
        if self.token and len(self.token) < 8:
            raise ValueError("The token is too short: use at least 8 characters (e.g. `python -c \"import "
                             "secrets; print(secrets.token_urlsafe())\"`).")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


class Guard:
    """Pure ASGI middleware (it must not buffer SSE): token, body size by Content-Length, concurrency."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app, self.config = app, config
        self.in_flight = 0
        self._expected = f"Bearer {config.token}".encode() if config.token else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        error = self._refuse(headers, scope["method"])
        if error is not None:
            await error.response()(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _refuse(self, headers: dict, method: str) -> APIError | None:
        if self._expected:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):  # constant time: no token guessing by timing
                return APIError(401, "Missing or wrong API key: send the server's token as 'Authorization: "
                                "Bearer <token>' (the api_key of an OpenAI client).", "invalid_request_error",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
            return too_large(self.config.max_body_bytes)
        if method == "POST" and self.in_flight >= self.config.max_concurrent:
            return APIError(429, f"The server is handling {self.in_flight} requests, its limit; retry shortly "
                            "(studio serve --max-concurrent raises the limit).", "rate_limit_error",
                            code="too_many_requests")
        return None


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                    "invalid_request_error", code="request_too_large")


class Api:
    def __init__(self, config: ServerConfig, client: EngineClient) -> None:
        self.config, self.client = config, client
        self.bridge = EngineBridge(client)

    # -- helpers ---------------------------------------------------------------------------------
    async def body(self, request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounded when no Content-Length came (chunked)
            size += len(chunk)
            if size > self.config.max_body_bytes:
                raise too_large(self.config.max_body_bytes)
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad(f"The body is not valid JSON: {exc}.", None, "invalid_json") from None
        if not isinstance(data, dict):
            raise bad("The body must be a JSON object.", None, "invalid_json")
        return data

    def model(self, body: dict, kinds: tuple[str, ...]) -> catalog.ServedModel:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise bad("model is required: one of the ids GET /v1/models lists.", "model", "missing_model")
        models = catalog.served_models()
        found = next((m for m in models if m.id == name), None)
        if found is None:
            ids = ", ".join(m.id for m in models if m.kind in kinds) or "none installed"
            raise APIError(404, f"The model {name!r} does not exist here. Available: {ids}.",
                           "invalid_request_error", "model", "model_not_found")
        if found.kind not in kinds:
            raise bad(f"{name!r} is a {found.kind} model; this endpoint needs a {' or '.join(kinds)} model.",
                      "model", "model_kind")
        return found

    async def first_event(self, request: Request, stream: JobStream) -> Message:
        """The job's first token or its end, or cancel the job if the client leaves while waiting."""
        while True:
            msg = await self.until_disconnect(request, stream)
            if msg.type != "progress":
                return msg

    async def until_disconnect(self, request: Request, stream: JobStream) -> Message:
        watch = asyncio.ensure_future(_disconnected(request))
        nxt = asyncio.ensure_future(self.bridge.next(stream))
        try:
            done, _ = await asyncio.wait({watch, nxt}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.bridge.cancel(stream)
            raise
        finally:
            watch.cancel()
        if nxt in done:
            return nxt.result()
        nxt.cancel()
        self.bridge.cancel(stream)
        raise asyncio.CancelledError("client disconnected")

    async def run_to_end(self, request: Request, job: Any) -> dict:
        stream = await self.bridge.submit(job)
        while True:
            msg = await self.until_disconnect(request, stream)
            if msg.type == "result":
                return msg["result"]
            if msg.type == "error":
                raise from_engine(msg["kind"], msg["message"])
            if msg.type == "cancelled":
                raise APIError(503, "The job was cancelled in the engine (the window may have stopped it).",
                               "server_error", code="cancelled")

    async def sse(self, stream: JobStream, first: Message, chunks: Any) -> AsyncIterator[str]:
        """Server-sent events from the job's messages; `chunks(msg)` turns one message into bodies."""
        msg: Message | None = first
        try:
            while msg is not None:
                for body in chunks(msg):
                    yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
                if msg.type in ("result", "error", "cancelled"):
                    break
                msg = await self.bridge.next(stream)
            yield "data: [DONE]\n\n"
        finally:  # the client went away mid-answer (Starlette cancels us): stop the engine job too
            self.bridge.cancel(stream)

    # -- endpoints -------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "engine": self.client.state, "served": self.bridge.served,
                             "active": self.bridge.active()})

    async def models(self, request: Request) -> Response:
        return JSONResponse(catalog.to_openai(catalog.served_models()))

    async def chat(self, request: Request) -> Response:
        body = await self.body(request)
        model = self.model(body, ("chat",))
        plan = openai_api.Plan("chatcmpl-" + secrets.token_hex(12), model.id)
        job = openai_api.chat_job(body, model, self.config.max_tokens, plan)
        if not body.get("stream"):
            result = await self.run_to_end(request, job)
            if plan.json_mode and (err := openai_api.check_json(result.get("text", ""))) is not None:
                raise err
            return JSONResponse(openai_api.chat_body(result, plan))
        stream = await self.bridge.submit(job)
        first = await self.first_event(request, stream)
        if first.type == "error":
            raise from_engine(first["kind"], first["message"])
        buffered = bool(plan.tool_names) or plan.json_mode  # tool calls and JSON are judged whole
        state = {"started": False, "text": []}

        def chunks(msg: Message) -> list[dict]:
            out = []
            if not state["started"]:
                state["started"] = True
                out.append(openai_api.chat_chunk(plan, {"role": "assistant", "content": ""}))
            if msg.type == "token":
                state["text"].append(msg["text"])
                if not buffered or (plan.json_mode and not plan.tool_names):
                    out.append(openai_api.chat_chunk(plan, {"content": msg["text"]}))
            elif msg.type == "result":
                result = msg["result"]
                finish = result.get("finish_reason", "stop")
                text, calls = openai_api.split_tools("".join(state["text"]), plan)
                if calls:
                    out.append(openai_api.chat_chunk(plan, {"tool_calls": [c.to_openai(i) for i, c in
                                                                           enumerate(calls)]}))
                    finish = "tool_calls"
                elif plan.tool_names and text:
                    out.append(openai_api.chat_chunk(plan, {"content": text}))
                if plan.json_mode and (err := openai_api.check_json(text)) is not None:
                    out.append(err.body())
                out.append(openai_api.chat_chunk(plan, {}, finish))
                if plan.include_usage:
                    out.append({**openai_api.chat_chunk(plan, {}), "choices": [], "usage": openai_api.usage(result)})
            elif msg.type == "error":
                out.append(from_engine(msg["kind"], msg["message"]).body())
            elif msg.type == "cancelled":
                out.append(APIError(503, "The job was cancelled in the engine.", "server_error",
                                    code="cancelled").body())
            return out

        return _event_stream(self.sse(stream, first, chunks))

    async def completions(self, request: Request) -> Response:
        body = await self.body(request)
        model = self.model(body, ("chat",))
        plan = openai_api.Plan("cmpl-" + secrets.token_hex(12), model.id)
        job = openai_api.completion_job(body, model, self.config.max_tokens, plan)
        if not body.get("stream"):
            return JSONResponse(openai_api.completion_body(await self.run_to_end(request, job), plan))
        stream = await self.bridge.submit(job)
        first = await self.first_event(request, stream)
        if first.type == "error":
            raise from_engine(first["kind"], first["message"])
        echo = [plan.echo_prompt]

        def chunks(msg: Message) -> list[dict]:
            out = []
            if echo[0]:
                out.append(openai_api.completion_chunk(plan, echo.pop()))
                echo.append("")
            if msg.type == "token":
                out.append(openai_api.completion_chunk(plan, msg["text"]))
            elif msg.type == "result":
                out.append(openai_api.completion_chunk(plan, "", msg["result"].get("finish_reason", "stop")))
            elif msg.type == "error":
                out.append(from_engine(msg["kind"], msg["message"]).body())
            return out

        return _event_stream(self.sse(stream, first, chunks))

    async def embeddings(self, request: Request) -> Response:
        body = await self.body(request)
        model = self.model(body, ("chat",))
        result = await self.run_to_end(request, openai_api.embed_job(body, model))
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, vec in enumerate(result["embeddings"]):
            emb: Any = vec
            if b64:  # little-endian float32, as OpenAI's clients decode it
                import array

                emb = base64.b64encode(array.array("f", vec).tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(result["token_counts"])
        return JSONResponse({"object": "list", "data": data, "model": model.id,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def images(self, request: Request) -> Response:
        body = await self.body(request)
        model = self.model(body, ("image",))
        job, _ = openai_api.image_job(body, model, self.config.max_images)
        result = await self.run_to_end(request, job)
        data = [{"b64_json": base64.b64encode(Path(img["path"]).read_bytes()).decode(),
                 "revised_prompt": job.prompt} for img in result["images"]]
        return JSONResponse({"created": openai_api.Plan("", "").created, "data": data})


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _event_stream(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _wrap(handler: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as exc:
            return exc.response()

    return endpoint


async def _not_found(request: Request, exc: Exception) -> Response:
    return APIError(404, f"No endpoint {request.method} {request.url.path}. This server offers /v1/models, "
                    "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/images/generations and /health.",
                    code="unknown_url").response()


async def _method(request: Request, exc: Exception) -> Response:
    return APIError(405, f"{request.method} is not allowed on {request.url.path}.", code="method_not_allowed").response()


def create_app(config: ServerConfig, client: EngineClient, own_client: bool = False) -> Starlette:
    """The app for `config`, submitting to `client`. With own_client the app starts the engine at
    startup and closes it at shutdown; otherwise whoever made the client does (the window, tests)."""
    config.check()
    api = Api(config, client)
    routes = [
        Route("/health", _wrap(api.health)),
        Route("/v1/models", _wrap(api.models)),
        Route("/v1/chat/completions", _wrap(api.chat), methods=["POST"]),
        Route("/v1/completions", _wrap(api.completions), methods=["POST"]),
        Route("/v1/embeddings", _wrap(api.embeddings), methods=["POST"]),
        Route("/v1/images/generations", _wrap(api.images), methods=["POST"]),
    ]
    middleware = [Middleware(Guard, config=config)]
    if config.cors_origins:  # outermost: a browser's preflight needs no token
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=config.cors_origins,
                                        allow_methods=["GET", "POST", "OPTIONS"],
                                        allow_headers=["Authorization", "Content-Type"]))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if own_client:
            client.start(wait=False)  # the first request waits for it; /health says when it is ready
        try:
            yield
        finally:
            if own_client:
                await asyncio.to_thread(client.close)

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _method})
    app.state.api = api
    return app
