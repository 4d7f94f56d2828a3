"""The FastAPI app of the OpenAI-compatible server, its middleware, and running it.

Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health,
/metrics (Prometheus), /version, and /openapi.json describing the real request models.
Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
invalid parameters or a prompt that does not fit the context, 401 without the API key, 404 for an
unknown model or route, 413 for a body over the size limit, 503 (with ``Retry-After``) when the
waiting room is full or the server is shutting down, 504 past the request timeout, 500 when the
engine failed (the details go to the log, never to the client). A client that disconnects
aborts its requests, which frees their KV blocks.

Security defaults: the server binds to 127.0.0.1; ``--api-key`` is compared in constant time;
request content is logged only with ``--enable-log-requests``; CORS is off unless
``--allowed-origins`` is given.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

import quickdraft
from quickdraft.entrypoints.async_engine import AsyncLLM
from quickdraft.entrypoints.openai.errors import (APIError, api_error_response, error_body, error_response,
                                                  validation_message)
from quickdraft.entrypoints.openai.limits import ServerLimits
from quickdraft.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                    TokenizeChatRequest, TokenizeCompletionRequest)
from quickdraft.entrypoints.openai.serving_chat import create_chat_completion
from quickdraft.entrypoints.openai.serving_completion import create_completion
from quickdraft.entrypoints.openai.serving_engine import OpenAIServing
from quickdraft.entrypoints.serve_metrics import CONTENT_TYPE, ServeMetrics

logger = logging.getLogger("quickdraft.server")

ASGIApp = Callable[..., Awaitable[None]]


class _APIKeyMiddleware:
    """Every path but /health needs ``Authorization: Bearer <key>`` (pure ASGI: streams pass through)."""

    open_paths = frozenset({"/health"})

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("authorization", "").encode()
        if not secrets.compare_digest(given, self.expected):
            response = error_response(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _InternalErrorMiddleware:
    """Any unexpected exception becomes a 500 in OpenAI's shape, with no details (they go to
    the log). Unlike an ``exception_handler(Exception)``, which Starlette re-raises after
    answering, the error ends here, so the connection stays usable for a client's next request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001
            logger.error("Unhandled error in %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if started:  # a stream already begun: nothing more can be said on it
                return
            response = error_response(500, "Internal server error; see the server log for details.")
            await response(scope, receive, send)


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body past the limit (FastAPI passes HTTPExceptions through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than this server's limit of {limit} bytes.")


class _BodySizeMiddleware:
    """413 for a body over ``max_bytes``: at once from Content-Length, else while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, f"The request body ({int(length)} bytes) is larger than this server's "
                                           f"limit of {self.max_bytes} bytes.")
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def build_app(engine: AsyncLLM, served_model_names: Sequence[str], *, api_key: str | None = None,
              max_logprobs: int | None = None, limits: ServerLimits | None = None,
              metrics: ServeMetrics | None = None, allowed_origins: Sequence[str] | None = None,
              enable_log_requests: bool = False) -> FastAPI:
    """The FastAPI app serving ``engine`` (started and shut down with the app's lifespan).
    ``max_logprobs`` overrides ``limits.max_logprobs``."""
    limits = limits or ServerLimits()
    if max_logprobs is not None:
        limits = ServerLimits(**{**vars(limits), "max_logprobs": max_logprobs})
    serving = OpenAIServing(engine, served_model_names, limits=limits)
    serving.log_requests = enable_log_requests
    if metrics is None:
        metrics = ServeMetrics(serving.served_model_names[0], engine.get_metrics)
    engine.on_finished = metrics.observe_finished

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()
            serving.close()

    app = FastAPI(title="quickdraft", version=quickdraft.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            reason = "crashed (see the server log)" if engine.dead_error is not None else "not running"
            return error_response(503, f"The engine is {reason}.")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": quickdraft.__version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict:
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "quickdraft",
                 "root": serving.model_root, "parent": None, "max_model_len": serving.max_model_len}
                for name in serving.served_model_names]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        serving.model_name(model)
        return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "quickdraft",
                "root": serving.model_root, "parent": None, "max_model_len": serving.max_model_len}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(serving, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(serving, body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest) -> dict:
        serving.model_name(body.model)
        if isinstance(body, TokenizeChatRequest):
            serving.check_messages(body.messages, add_generation_prompt=body.add_generation_prompt,
                                   continue_final_message=body.continue_final_message)
            prompt = await serving.run_blocking(lambda: serving.render_chat(
                body.messages, add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message, chat_template_kwargs=body.chat_template_kwargs,
                add_special_tokens=body.add_special_tokens))
            ids = prompt.token_ids
        else:
            if len(body.prompt) > serving.max_prompt_chars:
                raise APIError(400, f"prompt has {len(body.prompt)} characters, more than this server tokenizes "
                                    f"({serving.max_prompt_chars}).", param="prompt")
            ids = await serving.run_blocking(serving.tokenizer.encode, body.prompt, body.add_special_tokens)
        strs = serving.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        serving.model_name(body.model)
        limit = min(serving.vocab_size, serving.tokenizer.vocab_size)
        bad = [t for t in body.tokens if not 0 <= t < limit]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is out of vocabulary (vocab size {limit}).", param="tokens")
        text = await serving.run_blocking(lambda: serving.tokenizer.decode(body.tokens, skip_special_tokens=False))
        return {"prompt": text}

    # Middleware runs outside-in in reverse order of adding: CORS, the key, the size, the 500s.
    app.add_middleware(_InternalErrorMiddleware)
    app.add_middleware(_BodySizeMiddleware, max_bytes=limits.max_request_body_bytes)
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    return app


# uvicorn's "auto" picks uvloop and httptools whenever they are installed (Ray pulls both in);
# the server is built and tested on the standard asyncio loop and h11, so it runs on those.
UVICORN_LOOP = "asyncio"
UVICORN_HTTP = "h11"


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("QUICKDRAFT_API_KEY") or None


def run_server(llm_kwargs: dict[str, Any], *, served_model_names: Sequence[str], host: str = "127.0.0.1",
               port: int = 8000, api_key: str | None = None, limits: ServerLimits | None = None,
               shutdown_timeout: float = 10.0, allowed_origins: Sequence[str] | None = None,
               enable_log_requests: bool = False, uvicorn_log_level: str = "info", access_log: bool = True) -> None:
    """Load the model, then serve until SIGTERM or SIGINT: the server stops accepting
    connections, lets running requests finish for up to ``shutdown_timeout`` seconds, aborts the
    rest (freeing their KV blocks) and returns."""
    import uvicorn

    from quickdraft.llm import LLM

    api_key = resolve_api_key(api_key)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("Serving on %s without an API key: anyone who can reach it can use it.", host)
    engine = AsyncLLM.load(lambda: LLM(**llm_kwargs))  # built on its engine thread (see AsyncLLM.load)
    app = build_app(engine, served_model_names, api_key=api_key, limits=limits, allowed_origins=allowed_origins,
                    enable_log_requests=enable_log_requests)
    logger.info("Serving %s on http://%s:%d", served_model_names[0], host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level=uvicorn_log_level, access_log=access_log,
                    timeout_graceful_shutdown=shutdown_timeout, loop=UVICORN_LOOP, http=UVICORN_HTTP)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled; the shutdown is done
        pass
