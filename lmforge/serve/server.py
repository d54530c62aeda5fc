"""An OpenAI-compatible HTTP server (completions, chat completions, models, health, Prometheus metrics) for one run.

Run: lmforge serve RUN --host 127.0.0.1 --port 8000   (then point any OpenAI client at http://127.0.0.1:8000/v1)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from lmforge.errors import LmforgeError
from lmforge.serve.generate import generate_tokens, prepare_for_decode, stream_text


class SamplingRequest(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # not in OpenAI's API; vLLM and llama.cpp accept it too
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)


class CompletionRequest(SamplingRequest):
    prompt: str
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for legacy completions


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]


class ApiError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)  # (path, status code) -> count
    tokens: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0

    def render(self) -> str:
        lines = ["# TYPE lmforge_requests_total counter"]
        for (path, code), count in sorted(self.requests.items()):
            lines.append(f'lmforge_requests_total{{path="{path}",code="{code}"}} {count}')
        lines += [
            "# TYPE lmforge_generated_tokens_total counter",
            f"lmforge_generated_tokens_total {self.tokens}",
            "# TYPE lmforge_request_latency_seconds summary",
            f"lmforge_request_latency_seconds_sum {self.latency_sum}",
            f"lmforge_request_latency_seconds_count {self.latency_count}",
        ]
        return "\n".join(lines) + "\n"


class Generation:
    """One request's text pieces; after the last, `tokens` and `finish_reason` say what happened."""

    def __init__(self, ids: Iterator[int], budget: int, tokenizer, stops: list[str]):
        self.tokens, self.budget, self.exhausted = 0, budget, False
        self.pieces = stream_text(self._count(ids), tokenizer, stops)

    def _count(self, ids: Iterator[int]) -> Iterator[int]:
        for token in ids:
            self.tokens += 1
            yield token
        self.exhausted = True

    @property
    def finish_reason(self) -> str:
        # stream_text stops pulling ids at a stop string, so only a drained stream can have hit the limit
        return "length" if self.exhausted and self.tokens == self.budget else "stop"


def build_app(model, tokenizer, model_name: str) -> FastAPI:
    """The FastAPI app serving `model`; generation runs one request at a time in a worker thread."""
    app = FastAPI(title="lmforge")
    context = model.cfg.max_seq_len
    lock = asyncio.Lock()
    metrics = Metrics()
    chat_stops = {tokenizer.eos_id, tokenizer.token_id("<|end|>")}

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        metrics.requests[request.url.path, response.status_code] += 1
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
        return JSONResponse({"error": body}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return await api_error(request, ApiError(400, f"{param}: {first['msg']}", param=param or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return await api_error(request, ApiError(exc.status_code, str(exc.detail), type=kind))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "lmforge", "max_model_len": context}
        return {"object": "list", "data": [card]}

    def start(req: SamplingRequest, prompt_ids: list[int], stop_ids: set[int]) -> Generation:
        if req.model != model_name:
            raise ApiError(
                404, f"model {req.model!r} not found; this server serves {model_name!r}", code="model_not_found"
            )
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        max_tokens = context if req.max_tokens is None else req.max_tokens
        try:
            ids = generate_tokens(
                model, prompt_ids, max_tokens, req.temperature, req.top_k, req.top_p, stop_ids, req.seed
            )
        except LmforgeError as e:
            raise ApiError(400, str(e), param="messages" if isinstance(req, ChatRequest) else "prompt") from e
        return Generation(ids, min(max_tokens, context - len(prompt_ids)), tokenizer, stops)

    async def respond(req: SamplingRequest, prompt_ids: list[int], stop_ids: set[int], shape) -> object:
        began = time.perf_counter()
        gen = start(req, prompt_ids, stop_ids)
        meta = {"id": f"{shape.prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def usage() -> dict:
            return {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": gen.tokens,
                "total_tokens": len(prompt_ids) + gen.tokens,
            }

        def done() -> None:
            metrics.tokens += gen.tokens
            metrics.latency_sum += time.perf_counter() - began
            metrics.latency_count += 1

        if not req.stream:
            async with lock:
                text = await asyncio.to_thread(lambda: "".join(gen.pieces))
            done()
            return {**meta, **shape.full(text, gen.finish_reason), "usage": usage()}

        async def events() -> AsyncIterator[str]:
            async with lock:
                for chunk in shape.opening():
                    yield _sse({**meta, **chunk})
                while (piece := await asyncio.to_thread(next, gen.pieces, None)) is not None:
                    yield _sse({**meta, **shape.piece(piece, None)})
            done()
            yield _sse({**meta, **shape.piece("", gen.finish_reason)})
            if (req.stream_options or {}).get("include_usage"):
                yield _sse({**meta, "object": shape.chunk_object, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await respond(req, tokenizer.encode(req.prompt, bos=True), {tokenizer.eos_id}, TextShape)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if not req.messages:
            raise ApiError(400, "messages is empty; send at least one message", param="messages")
        try:
            text = tokenizer.render_chat([m.model_dump() for m in req.messages], add_generation_prompt=True)
        except LmforgeError as e:
            raise ApiError(400, str(e), param="messages") from e
        return await respond(req, tokenizer.encode(text, bos=True), chat_stops, ChatShape)

    return app


class TextShape:
    """Response bodies of /v1/completions."""

    prefix, chunk_object = "cmpl", "text_completion"

    @staticmethod
    def full(text: str, finish_reason: str) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"object": "text_completion", "choices": [choice]}

    @staticmethod
    def opening() -> list[dict]:
        return []

    @staticmethod
    def piece(text: str, finish_reason: str | None) -> dict:
        return TextShape.full(text, finish_reason)


class ChatShape:
    """Response bodies of /v1/chat/completions."""

    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    @staticmethod
    def full(text: str, finish_reason: str) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        return {"object": "chat.completion", "choices": [choice]}

    @staticmethod
    def opening() -> list[dict]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return [{"object": "chat.completion.chunk", "choices": [choice]}]

    @staticmethod
    def piece(text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder, or a run name under runs/")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--name", default=None, help="model name clients ask for (default: the run folder's name)")


def command(args: argparse.Namespace) -> None:
    import uvicorn

    from lmforge.checkpoint import load_run
    from lmforge.run import resolve_run

    run_dir = resolve_run(args.run)
    model, tokenizer = load_run(run_dir)
    prepare_for_decode(model)
    app = build_app(model, tokenizer, args.name or run_dir.resolve().name)
    uvicorn.run(app, host=args.host, port=args.port)
