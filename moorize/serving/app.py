"""The HTTP application: OpenAI-shaped routes over the engine, on Starlette.

Starlette is the ASGI toolkit FastAPI is built on, minus pydantic and the OpenAPI
layer: requests are validated by ``protocol`` (so every error is OpenAI's JSON with
the field named), responses stream as server-sent events, and the app stays a few
routes. Authentication is a small ASGI middleware (bearer token, constant-time
comparison); it wraps every route. Every exception ends as JSON: 4xx for the
caller's mistakes, 500 (and a log line) for ours, never a traceback on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .generation import CHAT_DEFAULT_MAX_TOKENS, COMPLETION_DEFAULT_MAX_TOKENS, Generation, TextGenerator
from .protocol import ApiError, model_card, new_id, now, parse_chat, parse_classify, parse_completion, parse_json, usage

log = logging.getLogger(__name__)
MAX_BODY = 4 * 1024 * 1024  # bytes: a request body beyond this is refused (413) before it is parsed


def error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else {}
    if err.close:  # the rest of the request may still be on its way: the connection cannot be reused
        headers["Connection"] = "close"
    return JSONResponse(err.body(), status_code=err.status, headers=headers or None)


class EventStream(StreamingResponse):
    """Server-sent events whose end, however it comes (done, client gone, server stopping), calls ``on_close``."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class BearerAuth:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                err = ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                               "invalid_request_error", None, "invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    """What the routes share: the runtime model, the engine or classifier, metrics."""

    def __init__(self, model, metrics, options, engine=None, classifier=None):
        self.model, self.metrics, self.engine, self.classifier = model, metrics, engine, classifier
        self.body_timeout = options.body_timeout
        self.generator = TextGenerator(model, engine, metrics, options) if engine is not None else None
        self.created = now()

    # ---- plumbing --------------------------------------------------------------------------------
    async def body(self, request: Request) -> dict:
        """The parsed body, read within ``body_timeout`` seconds and at most ``MAX_BODY`` bytes."""
        async def read() -> bytes:
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > MAX_BODY:
                    raise ApiError(413, f"the request body exceeds {MAX_BODY} bytes")
            return bytes(raw)

        try:
            raw = await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s", code="request_timeout",
                           close=True) from None
        return parse_json(raw)

    def route(self, endpoint: str, fn):
        """Wraps a handler: errors become OpenAI JSON, every answer is counted and timed."""

        async def handler(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                response = await fn(request)
            except ApiError as e:
                response = error_response(e)
            except ClientDisconnect:  # the client left while sending its request: nobody to answer
                log.info("%s: the client disconnected during its request", endpoint)
                response = Response(status_code=499)
            except Exception:
                log.exception("%s failed", endpoint)
                response = error_response(ApiError(500, "internal server error", "server_error"))
            self.metrics.inc("moorize_requests_total", endpoint=endpoint, status=str(response.status_code))
            if not isinstance(response, StreamingResponse):
                self.metrics.observe("moorize_request_latency_seconds", time.perf_counter() - t0, endpoint=endpoint)
            return response

        return handler

    def need_decoder(self) -> TextGenerator:
        if self.generator is None:
            raise ApiError(404, "this export is an encoder: it serves /v1/classify, not generation",
                           "invalid_request_error", None, "unsupported_endpoint")
        return self.generator

    # ---- routes ----------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        draining = self.engine is not None and self.engine.draining  # a load balancer takes it out of rotation
        return JSONResponse({"status": "draining" if draining else "ok", "kind": self.model.kind,
                             "models": list(self.model.tasks)}, status_code=503 if draining else 200)

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.text(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(t, self.created) for t in self.model.tasks]})

    async def one_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.model.tasks:
            raise ApiError(404, f"The model '{name}' does not exist", "invalid_request_error", "model",
                           "model_not_found")
        return JSONResponse(model_card(name, self.created))

    async def completions(self, request: Request) -> Response:
        gen = self.need_decoder()
        req = parse_completion(await self.body(request))
        gen.task_id(req.model)
        if req.prompt is not None:
            gen.check_chars(len(req.prompt), "prompt")
            ids = await gen.tokenize(gen.encode_text, req.prompt)
        else:
            ids = req.prompt_ids
        gen.check_ids(ids)
        max_tokens = gen.budget(len(ids), req.sampling, COMPLETION_DEFAULT_MAX_TOKENS)
        return await self._answer(request, gen.start(req.model, ids, req.sampling, max_tokens), req.model,
                                  req.sampling, chat=False)

    async def chat(self, request: Request) -> Response:
        gen = self.need_decoder()
        req = parse_chat(await self.body(request))
        gen.task_id(req.model)
        gen.check_chars(sum(len(m["content"]) for m in req.messages), "messages")
        ids = await gen.tokenize(gen.encode_chat, req.messages)
        gen.check_ids(ids)
        max_tokens = gen.budget(len(ids), req.sampling, CHAT_DEFAULT_MAX_TOKENS, "messages")
        return await self._answer(request, gen.start(req.model, ids, req.sampling, max_tokens), req.model,
                                  req.sampling, chat=True)

    async def classify(self, request: Request) -> Response:
        if self.classifier is None:
            raise ApiError(404, "this export is a decoder: it serves /v1/completions and /v1/chat/completions",
                           "invalid_request_error", None, "unsupported_endpoint")
        task, texts = parse_classify(await self.body(request))
        results = await self.classifier.classify(task, texts)
        return JSONResponse({"object": "list", "model": task, "data": results})

    # ---- generation answers ----------------------------------------------------------------------
    async def _answer(self, request: Request, g: Generation, model: str, sampling, chat: bool) -> Response:
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        obj = "chat.completion" if chat else "text_completion"
        t0 = time.perf_counter()
        if sampling.stream:
            return EventStream(self._sse(g, rid, created, model, chat, sampling.include_usage, t0), g.req.cancel)
        text, reason = await _until_done_or_gone(request, g)
        if reason is None:  # the client left: its row is already cancelled; nobody reads this answer
            return Response(status_code=499)
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                             "usage": usage(g.prompt_tokens, g.completion_tokens)})

    async def _sse(self, g: Generation, rid: str, created: int, model: str, chat: bool, include_usage: bool,
                   t0: float):
        """Server-sent events in OpenAI's chunk shapes; closing the stream early cancels the row."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            async for piece in g.pieces():
                if piece.text:
                    yield chunk(piece.text, None)
                if piece.finish_reason:
                    yield chunk(None, piece.finish_reason)
            if include_usage:
                tail = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": usage(g.prompt_tokens, g.completion_tokens)}
                yield f"data: {json.dumps(tail)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the status line is sent already: report in the stream, as OpenAI does, and end it
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.metrics.observe("moorize_request_latency_seconds", time.perf_counter() - t0,
                                 endpoint="chat" if chat else "completions")

    # ---- the app ---------------------------------------------------------------------------------
    def app(self, api_key: str | None = None, on_startup=None, on_shutdown=None):
        routes = [
            Route("/health", self.route("health", self.health), methods=["GET"]),
            Route("/metrics", self.route("metrics", self.metrics_text), methods=["GET"]),
            Route("/v1/models", self.route("models", self.models), methods=["GET"]),
            Route("/v1/models/{name:path}", self.route("models", self.one_model), methods=["GET"]),
            Route("/v1/completions", self.route("completions", self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self.route("chat", self.chat), methods=["POST"]),
            Route("/v1/classify", self.route("classify", self.classify), methods=["POST"]),
        ]

        async def http_error(request: Request, exc: HTTPException) -> Response:  # unknown path, wrong method
            code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
            return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                           "invalid_request_error", None, code))

        async def server_error(request: Request, exc: Exception) -> Response:
            log.exception("unhandled error")
            return error_response(ApiError(500, "internal server error", "server_error"))

        @contextlib.asynccontextmanager
        async def lifespan(app):
            if on_startup is not None:
                on_startup()
            try:
                yield
            finally:
                if on_shutdown is not None:
                    on_shutdown()

        app = Starlette(routes=routes, lifespan=lifespan,
                        exception_handlers={HTTPException: http_error, Exception: server_error})
        return BearerAuth(app, api_key) if api_key else app


async def _until_done_or_gone(request: Request, g: Generation) -> tuple[str, str | None]:
    """The whole text and finish reason, or ("", None) once the client disconnected (its row is then cancelled)."""

    async def collect():
        parts, reason = [], None
        async for piece in g.pieces():
            parts.append(piece.text)
            reason = piece.finish_reason or reason
        return "".join(parts), reason

    async def gone():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    g.req.cancel()
    return "", None
