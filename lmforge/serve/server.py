"""An OpenAI-compatible HTTP server on the continuous-batching engine: completions, chat completions (both streamed
or not), models, health and Prometheus metrics.

Run: lmforge serve RUN --port 8000 [--api-key KEY] [--max-num-seqs 64] [--kv-blocks N]
(then point any OpenAI client at http://127.0.0.1:8000/v1; with --api-key, /v1 and /metrics need the key, /health
and the chat page do not)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lmforge import cli_args
from lmforge.errors import LmforgeError
from lmforge.serve.adapters import AdapterSet
from lmforge.serve.chat_page import CHAT_PAGE
from lmforge.serve.engine import Engine, EngineConfig, EngineFull, Output, SamplingParams
from lmforge.serve.engine_thread import EngineThread
from lmforge.serve.generate import prepare_for_decode
from lmforge.serve.guard import Guard
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.offload import stream_layers

MAX_BODY_BYTES = 4 << 20


class SamplingRequest(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    # sampling values are typed here and checked in one place, SamplingParams.validate (a 400 naming the value)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # not in OpenAI's API; vLLM and llama.cpp accept it too
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's extension
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)

    def params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: bool, seed: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=self.stop_token_ids,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0, le=1 << 20)  # OpenAI's default; 0 with echo scores a prompt
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class ApiError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def build_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`, which steps in a background thread for all requests together."""
    tokenizer = engine.tokenizer
    context = engine.context
    metrics = ServerMetrics(engine)
    worker = EngineThread(engine, metrics)
    chat_stops = [tokenizer.eos_id, tokenizer.end_of_turn_id]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start(asyncio.get_running_loop())
        yield
        worker.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(Guard, metrics=metrics, routes=app.routes, max_body_bytes=MAX_BODY_BYTES, api_key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return error_response(ApiError(400, f"{param}: {first['msg']}", param=param or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), type=kind))

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return CHAT_PAGE.replace("MODEL_NAME", json.dumps(model_name))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # the base model and each LoRA adapter are models a request can name (as vLLM lists --lora-modules)
    adapters = engine.adapters.adapters if engine.adapters is not None else []
    served = {model_name: 0} | {a.name: i for i, a in enumerate(adapters, start=1)}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "lmforge", "max_model_len": context}
        cards = [card] + [{**card, "id": a.name, "parent": model_name, "root": str(a.path)} for a in adapters]
        return {"object": "list", "data": cards}

    def check_model(req: SamplingRequest) -> None:
        if req.model not in served:
            raise ApiError(
                404,
                f"model {req.model!r} not found; this server serves {', '.join(map(repr, served))}",
                code="model_not_found",
            )

    async def submit(request: Request, prompts: list[list[int]], req: SamplingRequest, params) -> tuple:
        """Queue every (prompt, choice) pair; returns (queue of Outputs, request ids in choice order)."""
        ids = [f"{uuid.uuid4().hex}-{i}" for i in range(len(prompts) * req.n)]
        queue: asyncio.Queue[Output] = asyncio.Queue()
        try:
            for i, request_id in enumerate(ids):
                seed = None if req.seed is None else req.seed + i % req.n
                await worker.add(request_id, prompts[i // req.n], params(seed), queue, served[req.model])
        except EngineFull as e:
            worker.abort(ids)
            raise ApiError(429, str(e), type="rate_limit_error", code="engine_full") from e
        except LmforgeError as e:
            worker.abort(ids)
            where = getattr(e, "param", None) or ("messages" if isinstance(req, ChatRequest) else "prompt")
            raise ApiError(400, str(e), param=where) from e  # e.param: a SamplingParams.validate refusal
        return queue, ids

    async def collect(request: Request, queue: asyncio.Queue, ids: list[str]) -> dict[str, list[Output]]:
        """Every Output of every choice, aborting them all if the client goes away first."""
        outputs: dict[str, list[Output]] = {i: [] for i in ids}
        left = len(ids)
        try:
            while left:
                try:
                    out = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise ApiError(499, "client closed the request") from None
                    continue
                outputs[out.request_id].append(out)
                left -= out.finished
        finally:
            if left:
                worker.abort(ids)
        return outputs

    async def stream(
        queue: asyncio.Queue, ids: list[str], n: int, opening: list[dict], shape, usage_meta: dict | None
    ) -> AsyncIterator[str]:
        index = {request_id: i for i, request_id in enumerate(ids)}
        left, usage = len(ids), Usage()
        try:
            for chunk in opening:
                yield _sse(chunk)
            while left:
                out = await queue.get()
                left -= out.finished
                if out.text or out.logprobs or out.finished:
                    yield _sse(shape(index[out.request_id], out))
                if out.finished:
                    usage.add(out, count_prompt=index[out.request_id] % n == 0)
        finally:
            if left:  # the client went away mid-stream: free its sequences' blocks now
                worker.abort(ids)
        if usage_meta is not None:
            yield _sse({**usage_meta, "choices": [], "usage": usage.dict()})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req)
        prompts = await run_in_threadpool(encode_prompts, req.prompt, tokenizer, context)  # long texts take a while
        if req.echo and req.stream:
            raise ApiError(400, "echo with stream is not supported; drop one of them", param="echo")
        max_tokens = context if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens: must be >= 1 (0 only with echo)", param="max_tokens")

        def params(seed):
            return req.params(max_tokens, req.logprobs, req.echo and req.logprobs is not None, seed)

        queue, ids = await submit(request, prompts, req, params)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:

            def shape(i: int, out: Output) -> dict:
                choice = {"index": i, "text": out.text, "finish_reason": out.finish_reason}
                choice["logprobs"] = completion_logprobs(out.logprobs, tokenizer) if req.logprobs is not None else None
                return {**meta, "object": "text_completion", "choices": [choice]}

            usage_meta = {**meta, "object": "text_completion"} if include_usage(req) else None
            return StreamingResponse(stream(queue, ids, req.n, [], shape, usage_meta), media_type="text/event-stream")
        outputs = await collect(request, queue, ids)
        choices, usage = [], Usage()
        for i, request_id in enumerate(ids):
            out = merge(outputs[request_id])
            prompt = prompts[i // req.n]
            usage.add(out, count_prompt=i % req.n == 0)
            text = out.text
            logprobs = None
            if req.logprobs is not None:
                entries = out.logprobs
                if req.echo:
                    entries = prompt_entries(prompt, out.prompt_logprobs) + entries
                logprobs = completion_logprobs(entries, tokenizer)
            if req.echo:
                text = tokenizer.decode(prompt[1:]) + text  # the prompt without the BOS the server added
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason})
        return {**meta, "object": "text_completion", "choices": choices, "usage": usage.dict()}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req)
        if not req.messages:
            raise ApiError(400, "messages is empty; send at least one message", param="messages")
        prompt = await run_in_threadpool(encode_messages, req.messages, tokenizer, context)
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = context if req.max_tokens is None else req.max_tokens
        req.stop_token_ids = req.stop_token_ids + chat_stops

        def params(seed):
            return req.params(max_tokens, top, False, seed)

        queue, ids = await submit(request, [prompt], req, params)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            opening = [
                {
                    **meta,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }
                for i in range(req.n)
            ]

            def shape(i: int, out: Output) -> dict:
                choice = {"index": i, "delta": {"content": out.text} if out.text else {}}
                choice["finish_reason"] = out.finish_reason
                if top is not None:
                    choice["logprobs"] = {"content": chat_logprobs(out.logprobs, tokenizer)}
                return {**meta, "object": "chat.completion.chunk", "choices": [choice]}

            usage_meta = {**meta, "object": "chat.completion.chunk"} if include_usage(req) else None
            return StreamingResponse(
                stream(queue, ids, req.n, opening, shape, usage_meta), media_type="text/event-stream"
            )
        outputs = await collect(request, queue, ids)
        choices, usage = [], Usage()
        for i, request_id in enumerate(ids):
            out = merge(outputs[request_id])
            usage.add(out, count_prompt=i == 0)
            choice = {"index": i, "message": {"role": "assistant", "content": out.text}}
            choice["logprobs"] = None if top is None else {"content": chat_logprobs(out.logprobs, tokenizer)}
            choice["finish_reason"] = out.finish_reason
            choices.append(choice)
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage.dict()}

    return app


def include_usage(req: SamplingRequest) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


def encode_prompts(prompt: str | list[str] | list[int] | list[list[int]], tokenizer, context: int) -> list[list[int]]:
    """The completion API's prompt forms (text, texts, token ids, lists of ids) as token lists, each after a BOS."""
    if isinstance(prompt, str) or prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty; send text or token ids", param="prompt")
    encoded = []
    for p in prompt:
        if not p:
            raise ApiError(400, "prompt is empty; send text or token ids", param="prompt")
        if isinstance(p, str):
            check_chars(len(p), tokenizer, context, "prompt")
            try:
                encoded.append(tokenizer.encode(p, bos=True))
            except LmforgeError as e:
                raise ApiError(400, str(e), param="prompt") from e
            continue
        if any(not 0 <= t < tokenizer.vocab_size for t in p):
            raise ApiError(400, f"prompt: token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        encoded.append([*tokenizer.bos, *p])  # as tokenizer.encode(text, bos=True) starts
    return encoded


def encode_messages(messages: list[ChatMessage], tokenizer, context: int) -> list[int]:
    """The chat's token ids after a BOS: the template's markers as special tokens, the contents as plain text."""
    check_chars(sum(len(m.content) for m in messages), tokenizer, context, "messages")
    try:
        return tokenizer.encode_chat([m.model_dump() for m in messages], add_generation_prompt=True, bos=True)
    except LmforgeError as e:
        raise ApiError(400, str(e), param="messages") from e


def check_chars(chars: int, tokenizer, context: int, param: str) -> None:
    """Refuse a text too long for the context before tokenising it: no token stands for more than
    tokenizer.max_token_chars characters."""
    most = context * tokenizer.max_token_chars
    if chars > most:
        message = f"{param} has {chars} characters, more than the context of {context} tokens holds; shorten it"
        raise ApiError(400, message, param=param)


class Usage:
    def __init__(self):
        self.prompt, self.completion = 0, 0

    def add(self, out: Output, count_prompt: bool) -> None:
        self.prompt += out.prompt_tokens if count_prompt else 0
        self.completion += out.completion_tokens

    def dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }


def merge(outputs: list[Output]) -> Output:
    """One request's step outputs as one."""
    last = outputs[-1]
    merged = Output(last.request_id, [], "", prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens)
    for out in outputs:
        merged.token_ids += out.token_ids
        merged.text += out.text
        merged.logprobs += out.logprobs
        merged.prompt_logprobs = out.prompt_logprobs or merged.prompt_logprobs
    merged.finished, merged.finish_reason = last.finished, last.finish_reason
    return merged


def prompt_entries(prompt: list[int], prompt_logprobs: list[dict | None] | None) -> list[dict]:
    """Logprob entries of the prompt's tokens after the BOS (each scored given everything before it)."""
    scored = prompt_logprobs or [None] * len(prompt)
    return [entry or {"token": t, "logprob": None, "top": {}} for t, entry in zip(prompt[1:], scored[1:], strict=True)]


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


def completion_logprobs(entries: list[dict], tokenizer) -> dict:
    """The legacy completions shape: parallel lists of tokens, their logprobs, top alternatives and text offsets."""
    tokens, offsets, offset = [], [], 0
    for e in entries:
        tokens.append(token_text(tokenizer, e["token"]))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{token_text(tokenizer, t): lp for t, lp in e["top"].items()} or None for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[dict], tokenizer) -> list[dict]:
    """The chat shape: one object per token with its bytes and top alternatives."""

    def one(token: int, logprob: float) -> dict:
        raw = tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [
        {**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"].items()]} for e in entries
    ]


def error_response(exc: ApiError) -> JSONResponse:
    message = exc.message.encode("utf-8", "backslashreplace").decode()  # a lone surrogate cannot be sent as UTF-8
    body = {"message": message, "type": exc.type, "param": exc.param, "code": exc.code}
    return JSONResponse({"error": body}, status_code=exc.status)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder, a run name under runs/, or a transformers model folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=cli_args.port, default=8000, help="port to listen on, 0-65535 (default 8000)")
    parser.add_argument("--name", default=None, help="model name clients ask for (default: the run folder's name)")
    parser.add_argument(
        "--api-key", default=None, help="require Authorization: Bearer KEY on /v1 and /metrics (default: open)"
    )
    defaults = EngineConfig()
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="most sequences in a batch")
    parser.add_argument(
        "--kv-blocks", type=int, default=0, help="KV-cache blocks (default: max-num-seqs full contexts)"
    )
    parser.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per KV block")
    parser.add_argument("--max-waiting", type=int, default=defaults.max_waiting, help="queued requests before 429")
    parser.add_argument("--draft", default=None, help="run folder of a smaller model for speculative decoding")
    parser.add_argument("--spec-tokens", type=int, default=4, help="tokens the draft proposes per step (default 4)")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        type=cli_args.name_and_path,
        metavar="NAME=DIR",
        help="serve a LoRA adapter (a PEFT folder) as model NAME beside the base; repeat for more",
    )
    parser.add_argument(
        "--resident-layers",
        type=int,
        default=-1,
        help="keep this many blocks in device memory and stream the rest from host memory per step (default: all)",
    )


def command(args: argparse.Namespace) -> None:
    import uvicorn

    from lmforge.checkpoint import load_run
    from lmforge.interop.hf import import_hf
    from lmforge.run import resolve_run

    for flag in ("max_num_seqs", "block_size", "max_waiting"):
        if getattr(args, flag) < 1:
            raise LmforgeError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    if args.kv_blocks < 0:
        raise LmforgeError(f"--kv-blocks {args.kv_blocks} must be >= 0 (0: the default size)")
    run_dir = resolve_run(args.run)
    if (run_dir / "config.json").is_file() and not (run_dir / "checkpoints").is_dir():  # a transformers folder
        with tempfile.TemporaryDirectory(prefix="lmforge-serve-") as tmp:
            model, tokenizer = load_run(import_hf(run_dir, Path(tmp) / "run"))
    else:
        model, tokenizer = load_run(run_dir)
    cfg = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        kv_blocks=args.kv_blocks,
        block_size=args.block_size,
        max_waiting=args.max_waiting,
    )
    prepare_for_decode(model)
    if args.resident_layers >= 0:
        stream_layers(model, args.resident_layers)
    adapters = None
    if args.lora:
        adapters = AdapterSet(model)
        for name, path in args.lora:
            adapters.load(name, path)
    if args.draft:
        draft, draft_tokenizer = load_run(resolve_run(args.draft))
        if draft_tokenizer.sha256 != tokenizer.sha256:
            raise LmforgeError(f"--draft {args.draft} has another tokenizer; the draft must share the target's")
        engine = Engine(model, tokenizer, cfg, draft=draft, spec_tokens=args.spec_tokens, adapters=adapters)
    else:
        engine = Engine(model, tokenizer, cfg, adapters=adapters)
    app = build_app(engine, args.name or run_dir.resolve().name, args.api_key)
    uvicorn.run(app, host=args.host, port=args.port)
