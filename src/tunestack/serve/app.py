"""The OpenAI-compatible FastAPI app of `tunestack serve` and its web chat page.

    GET  /                     the chat page (static, offline)    GET /health
    GET  /v1/models            POST /v1/chat/completions          POST /v1/completions
    POST /v1/score             (with --reward_model) one reward per conversation

Streams are server-sent events: `data: {chunk}` lines and a final `data: [DONE]`. Every error is OpenAI's
error JSON; an unexpected one is a 500 whose body names the request id and never carries a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tunestack.config.infer import GenerationArguments
from tunestack.infer.tool_calls import openai_tool_calls
from tunestack.serve.generation import Generation, Limits, plan
from tunestack.serve.guard import Capacity, Guard
from tunestack.serve.models import RewardScorer, ServedModel, prompt_for
from tunestack.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ScoreRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    usage,
    usage_chunk,
)

logger = logging.getLogger("tunestack.serve")
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}  # the only files the app reads, fixed names


class Stats:
    """Totals for the periodic throughput line."""

    def __init__(self) -> None:
        self.requests = self.tokens = 0
        self.since = time.perf_counter()

    def record(self, tokens: int) -> None:
        self.requests += 1
        self.tokens += tokens

    def line(self, in_use: int) -> str | None:
        elapsed = time.perf_counter() - self.since
        if not self.requests and not in_use:
            self.since = time.perf_counter()
            return None
        line = (
            f"throughput: {self.requests} requests, {self.tokens} tokens in {elapsed:.0f}s "
            f"({self.tokens / max(elapsed, 1e-9):.1f} tokens/s), {in_use} in flight"
        )
        self.requests = self.tokens = 0
        self.since = time.perf_counter()
        return line


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(
    models: dict[str, ServedModel],
    defaults: GenerationArguments,
    limits: Limits,
    *,
    capacity: int = 80,
    api_keys: Sequence[str] = (),
    max_body_bytes: int = 1 << 20,
    cors_origins: Sequence[str] = (),
    reward: RewardScorer | None = None,
    log_interval: float = 60.0,
) -> Any:
    slots = Capacity(capacity)
    stats = Stats()

    async def report() -> None:
        while True:
            await asyncio.sleep(log_interval)
            line = stats.line(slots.in_use)
            if line:
                logger.info(line)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(report()) if log_interval > 0 else None
        yield
        if task is not None:
            task.cancel()

    app = FastAPI(title="tunestack", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    page = resources.files("tunestack.serve").joinpath("static")
    assets = {name: page.joinpath(name).read_text(encoding="utf-8") for name in ("index.html", *STATIC)}

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        rid = new_id("err")
        logger.error("%s: %s %s failed", rid, request.method, request.url.path, exc_info=exc)
        body = error_body(f"internal server error ({rid}); the server log has the details", "server_error")
        return JSONResponse(body, status_code=500)

    def served_model(name: str) -> ServedModel:
        if name not in models:
            raise APIError(
                404,
                f"The model '{name}' does not exist; served: {', '.join(models)}",
                param="model",
                code="model_not_found",
            )
        return models[name]

    def take_slots(n: int) -> None:
        if not slots.acquire(n):
            raise APIError(
                429,
                f"the server is at capacity ({slots.limit} requests in flight); retry shortly",
                kind="requests",
                code="rate_limit_exceeded",
            )

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(assets["index.html"])

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            raise APIError(404, f"no such file: {name}", kind="not_found_error")
        return Response(assets[name], media_type=STATIC[name])

    @app.get("/health")
    async def health() -> JSONResponse:
        engines = {name: m.engine.name for name, m in models.items()}
        alive = all(getattr(m.engine, "alive", True) for m in models.values())
        body = {
            "status": "ok" if alive else "engine stopped",
            "models": list(models),
            "engines": engines,
            "in_flight": slots.in_use,
            "capacity": slots.limit,
            "score": reward is not None,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [m.card() for m in models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        return served_model(name).card()

    async def answer(request: Request, body: Any, served: ServedModel, ids: list[int], kind: str) -> Any:
        body.check(limits.max_n)
        decoding = plan(body, served, defaults, limits, len(ids))
        take_slots(body.n)
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        read_calls = kind == "chat" and body.calls_wanted
        gen = Generation(served, ids, decoding, body.n, limits.request_timeout, rid, stats, read_calls)
        try:
            gen.start()
        except BaseException:
            slots.release(body.n)
            raise
        if body.stream:
            return StreamingResponse(
                stream(request, gen, body, kind),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts, outcome = [""] * body.n, "ok"
        try:
            async for index, piece, _ in gen.pieces(request):
                texts[index] += piece
        except TimeoutError:
            outcome = "timeout"
            raise APIError(
                504,
                f"no answer within {limits.request_timeout:g}s (--request_timeout)",
                kind="timeout_error",
                code="timeout",
            ) from None
        except ConnectionAbortedError:
            outcome = "client gone"
            return Response(status_code=499)
        finally:
            gen.close(outcome)
            slots.release(body.n)
        reasons = [c.reason or "length" for c in gen.choices]
        use = usage(len(ids), gen.completion_tokens)
        if kind == "chat":
            calls = [openai_tool_calls(c.tool_calls) if c.tool_calls else None for c in gen.choices]
            return chat_response(rid, served.name, texts, reasons, use, calls)
        return completion_response(rid, served.name, texts, reasons, use)

    async def stream(request: Request, gen: Generation, body: Any, kind: str) -> AsyncIterator[str]:
        name, outcome = gen.served.name, "ok"
        try:
            if kind == "chat":
                for i in range(body.n):
                    yield sse(chat_chunk(gen.rid, name, i, {"role": "assistant", "content": ""}))
            async for index, piece, reason in gen.pieces(request):
                if kind == "chat":
                    if piece:
                        yield sse(chat_chunk(gen.rid, name, index, {"content": piece}))
                    calls = gen.choices[index].tool_calls if reason == "tool_calls" else ()
                    if calls:
                        deltas = [{"index": k, **c} for k, c in enumerate(openai_tool_calls(calls))]
                        yield sse(chat_chunk(gen.rid, name, index, {"tool_calls": deltas}))
                    if reason:
                        yield sse(chat_chunk(gen.rid, name, index, {}, reason))
                else:
                    yield sse(completion_chunk(gen.rid, name, index, piece, reason))
            if body.include_usage:
                yield sse(usage_chunk(gen.rid, name, kind, usage(len(gen.prompt_ids), gen.completion_tokens)))
            yield "data: [DONE]\n\n"
        except TimeoutError:
            outcome = "timeout"
            message = f"no answer within {limits.request_timeout:g}s (--request_timeout)"
            yield sse(error_body(message, "timeout_error", None, "timeout"))
            yield "data: [DONE]\n\n"
        except ConnectionAbortedError:  # seen while waiting: end the stream quietly
            outcome = "client gone"
        except (asyncio.CancelledError, GeneratorExit):  # seen by the server on a send
            outcome = "client gone"
            raise
        except Exception as exc:
            outcome, rid = "failed", new_id("err")
            logger.error("%s: stream %s failed", rid, gen.rid, exc_info=exc)
            yield sse(error_body(f"internal server error ({rid}); the server log has the details", "server_error"))
            yield "data: [DONE]\n\n"
        finally:
            gen.close(outcome)
            slots.release(body.n)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        served = served_model(body.model)
        system, turns = body.conversation(limits.max_messages)
        ids = prompt_for(served.chat_model, system, turns, defaults, body.tool_list())
        return await answer(request, body, served, ids, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        served = served_model(body.model)
        ids = served.chat_model.encode(body.text())
        return await answer(request, body, served, ids, "text")

    @app.post("/v1/score")
    async def score(body: ScoreRequest) -> dict[str, Any]:
        if reward is None:
            raise APIError(
                404, "no reward model is loaded (start the server with --reward_model)", kind="not_found_error"
            )
        if body.model not in (None, reward.name):
            raise APIError(
                404,
                f"The model '{body.model}' does not exist; the reward model is '{reward.name}'",
                param="model",
                code="model_not_found",
            )
        take_slots(1)
        try:
            scores = await asyncio.to_thread(reward.score, body.conversations, limits.max_messages)
        finally:
            slots.release(1)
        data = [{"object": "score", "index": i, "score": s} for i, s in enumerate(scores)]
        return {"object": "list", "model": reward.name, "data": data}

    wrapped: Any = Guard(app, api_keys, max_body_bytes)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        wrapped = CORSMiddleware(
            wrapped,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    wrapped.fastapi = app
    return wrapped
