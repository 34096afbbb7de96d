"""The HTTP API: OpenAI-compatible completions on top of the shared engine.

    POST /v1/completions      prompt(s) as text or token ids; streaming as server-sent events
    POST /v1/chat/completions messages rendered with the chat template (binarylm/data/chat.py)
    GET  /v1/models           the one model this server holds
    POST /tokenize            text -> token ids       (vLLM's shapes)
    POST /detokenize          token ids -> text
    GET  /tokenizer_info      vocabulary size and special tokens
    GET  /health              200 once the model is loaded
    GET  /metrics             Prometheus text: latencies, queue, tokens, outcomes (binarylm_*)
    POST /v1/internals, GET /v1/explore/*, GET /explore   the model explorer (serve/explorer.py)

Every response carries an `x-request-id`, and each request is logged as one JSON line on the
`binarylm.access` logger (serve/observability.py).

Errors always have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad
request (an unknown field, a prompt plus max_tokens beyond the context), 401 without a valid API
key, 404 for an unknown model or route, 413 for an oversized body, 429 when rate-limited or the
queue is full (serve/security.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from binarylm.data.chat import render_chat
from binarylm.errors import BinaryLMError
from binarylm.infer.engine import Completion, Event, TokenLogprob
from binarylm.infer.sampling import SamplingParams
from binarylm.serve.observability import CONTENT_TYPE, AccessLogMiddleware
from binarylm.serve.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from binarylm.serve.runner import EngineRunner
from binarylm.serve.security import ServerSettings, TokenBuckets, authorized_key
from binarylm.tokenizer import ENDOFTEXT, PAD, Tokenizer

if TYPE_CHECKING:
    from binarylm.serve.explorer import ExplorerSettings


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after is not None else None


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(runner: EngineRunner, tokenizer: Tokenizer, model_name: str,
               settings: ServerSettings | None = None, explorer: ExplorerSettings | None = None) -> FastAPI:
    """The FastAPI application serving `runner`'s engine under the name `model_name` (and the explorer's
    routes for it; `explorer` names its checkpoint directory and limits)."""
    settings = settings or ServerSettings()
    app = FastAPI(title="BinaryLM", version="1")
    context = runner.engine.max_length
    created = int(time.time())
    token_buckets = TokenBuckets(settings.tokens_per_minute)
    _install_error_handlers(app)
    app.add_middleware(RequestGuard, settings=settings)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-request-id"])
    app.add_middleware(AccessLogMiddleware, metrics=runner.metrics)  # outermost: it sees every answer

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           "not_found_error", "model")

    def charge_tokens(job: CompletionJob, identity: str) -> None:
        """Take the request's tokens (prompts + max_tokens x n) from its token bucket, or withdraw it with a 429."""
        tokens = sum(len(p) for p in job.prompts) + job.params.max_tokens * job.params.n * len(job.prompts)
        wait = token_buckets.take(identity, tokens)
        if not wait:
            return
        job.withdraw()
        if wait == float("inf"):
            raise APIError(400, f"this request needs {tokens} tokens, more than the {settings.tokens_per_minute} per "
                                "minute allowed to one key; ask for fewer max_tokens", param="max_tokens")
        runner.metrics.requests.inc(outcome="rate_limited")
        raise APIError(429, f"token rate limit: this request needs {tokens} tokens of the "
                            f"{settings.tokens_per_minute} per minute allowed; retry in {wait:.0f} s",
                       "rate_limit_error", retry_after=wait)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runner.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "binarylm",
                "max_model_len": context}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        tokens = tokenizer.encode(body.prompt, allowed_special="all")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary of {tokenizer.vocab_size}", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        specials = tokenizer.special_tokens
        return {"tokenizer_class": "BinaryLM byte-level BPE", "vocab_size": tokenizer.vocab_size,
                "model_max_length": context, "eos_token_id": tokenizer.eot_id,
                "eos_token": ENDOFTEXT if ENDOFTEXT in specials else None, "bos_token": None,
                "pad_token": PAD if PAD in specials else None,
                "special_tokens": specials, "pattern": tokenizer.pattern}

    async def run(job: CompletionJob, request: Request):
        check_model(job.body.model)
        if len(runner.engine.waiting) >= settings.max_waiting:
            runner.metrics.requests.inc(outcome="rate_limited")
            raise APIError(429, f"the server's queue is full ({settings.max_waiting} requests waiting); retry "
                                "shortly", "rate_limit_error", retry_after=1)
        try:
            job.submit(asyncio.get_running_loop())  # the engine's checks first: a refused request costs nothing
        except BinaryLMError:
            runner.metrics.requests.inc(outcome="error")
            raise
        charge_tokens(job, request.state.identity)
        if job.body.stream:
            return StreamingResponse(job.stream(request), media_type="text/event-stream")
        return await job.collect()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await run(CompletionJob(runner, tokenizer, model_name, body), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await run(ChatJob(runner, tokenizer, model_name, body), request)

    from binarylm.serve.explorer import add_explorer  # here: explorer.py imports this module

    add_explorer(app, runner.engine.model, tokenizer, model_name, explorer)
    return app


class RequestGuard:
    """API keys, the body-size cap and the request rate limit, before any handler runs.

    Pure ASGI middleware rather than `@app.middleware("http")`, whose BaseHTTPMiddleware relays every
    streamed chunk through a memory stream and a task switch: work the event loop did once a token."""

    def __init__(self, app, settings: ServerSettings):
        self.app, self.settings = app, settings
        self.request_buckets = TokenBuckets(settings.requests_per_minute)

    async def __call__(self, scope, receive, send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None and scope["type"] == "http" and _announced_length(scope) is None:
            receive, refusal = await self._read_capped(receive)  # a chunked body: count its bytes as they come
        await (refusal or self.app)(scope, receive, send)

    async def _read_capped(self, receive):
        """Read a body that announced no length, up to the cap: (a `receive` that replays it, None), or
        (receive, a 413 answer) as soon as it passes the cap."""
        cap, parts, size = self.settings.max_body_bytes, [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the handler will see the disconnect
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > cap:
                return receive, _too_large(cap)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}

        return replay, None

    def _refusal(self, scope) -> JSONResponse | None:
        """The error answer for a request that may not pass, or None (its identity then goes in scope["state"],
        where `request.state.identity` finds it)."""
        from binarylm.serve.explorer import is_public_page

        settings, request = self.settings, Request(scope)  # headers and path only: the body stays unread
        key = authorized_key(request.headers.get("authorization"), settings.api_keys)
        path = request.url.path
        public = path in settings.public_paths or is_public_page(path) or request.method == "OPTIONS"
        if settings.api_keys and key is None and not public:
            return JSONResponse(error_body("a valid API key is required: send 'Authorization: Bearer KEY'",
                                           "authentication_error", code="invalid_api_key"), status_code=401)
        length = _announced_length(scope)
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return _too_large(settings.max_body_bytes)
        identity = key or (request.client.host if request.client else "unknown")
        wait = 0.0 if public else self.request_buckets.take(identity)
        if wait:
            return JSONResponse(error_body(f"rate limit: {settings.requests_per_minute} requests per minute; "
                                           f"retry in {wait:.1f} s", "rate_limit_error"),
                                status_code=429, headers={"retry-after": str(max(1, round(wait)))})
        scope.setdefault("state", {})["identity"] = identity
        return None


def _announced_length(scope) -> str | None:
    """The Content-Length header's value, or None when the request has none (a chunked body, or no body)."""
    return next((value.decode("latin-1") for name, value in scope["headers"] if name == b"content-length"), None)


def _too_large(cap: int) -> JSONResponse:
    return JSONResponse(error_body(f"the request body is larger than {cap} bytes", "invalid_request_error"),
                        status_code=413)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error_body(error.message, error.kind, error.param), status_code=error.status,
                            headers=error.headers)

    @app.exception_handler(BinaryLMError)
    async def bad_input(_: Request, error: BinaryLMError) -> JSONResponse:
        return JSONResponse(error_body(str(error), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return JSONResponse(error_body(f"{where}: {first['msg']}", "invalid_request_error", where or None),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code)


class CompletionJob:
    """One /v1/completions call: its prompts submitted to the engine, then collected or streamed."""

    prefix, object_name, chunk_name = "cmpl", "text_completion", "text_completion"

    def __init__(self, runner: EngineRunner, tokenizer: Tokenizer, model_name: str, body):
        self.runner, self.tokenizer, self.model_name, self.body = runner, tokenizer, model_name, body
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.params = body.settings()
        self.prompts = self._prompts()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids: list[str] = []

    def _prompts(self) -> list[list[int]]:
        return self._prompt_ids(self.body.prompt)

    def _prompt_ids(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt, allowed_special="all")]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        if not prompt:
            raise APIError(400, "prompt is empty; give text, a list of texts or token ids", param="prompt")
        return [self.tokenizer.encode(p, allowed_special="all") if isinstance(p, str) else list(p) for p in prompt]

    def submit(self, loop: asyncio.AbstractEventLoop) -> None:
        """Queue every prompt; if one is refused (too long, bad ids), withdraw the ones already queued."""
        try:
            for prompt in self.prompts:  # every prompt's events arrive on this call's one queue
                request_id, _ = self.runner.submit(prompt, self.params, loop, self.queue)
                self.request_ids.append(request_id)
        except BinaryLMError:
            self.withdraw()
            raise

    def withdraw(self) -> None:
        """Abort every prompt of this call already queued (the call is being refused)."""
        for request_id in self.request_ids:
            self.runner.abort(request_id)

    def _choice_index(self, request_id: str, sample: int) -> int:
        return self.request_ids.index(request_id) * self.body.n + sample

    async def collect(self) -> dict:
        completions: dict[str, Completion] = {}
        while len(completions) < len(self.request_ids):
            item = await self.queue.get()
            if isinstance(item, Completion):
                completions[item.request_id] = item
        choices = [self._choice(completions[rid], sample.index) for rid in self.request_ids
                   for sample in completions[rid].samples]
        generated = sum(len(s.token_ids) for c in completions.values() for s in c.samples)
        prompt_tokens = sum(len(p) for p in self.prompts)
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model_name,
                "choices": choices, "usage": _usage(prompt_tokens, generated)}

    def _choice(self, completion: Completion, index: int) -> dict:
        sample = completion.samples[index]
        prompt_text = self.tokenizer.decode(completion.prompt_ids)
        logprobs = None
        if self.body.logprobs is not None:  # offsets count from the start of the prompt, as OpenAI's do
            logprobs = self._logprobs(completion, sample.logprobs or [], 0 if self.body.echo else len(prompt_text))
        text = prompt_text + sample.text if self.body.echo else sample.text
        return {"index": self._choice_index(completion.request_id, index), "text": text,
                "logprobs": logprobs, "finish_reason": sample.finish_reason}

    def _logprobs(self, completion: Completion, generated: list[TokenLogprob], offset: int) -> dict:
        """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
        entries: list[tuple[int, float | None, dict | None]] = []
        if self.body.echo:
            scored = completion.prompt_logprobs or [None] * len(completion.prompt_ids)
            entries += [(t, None, None) if e is None else (t, e.logprob, self._top(e))
                        for t, e in zip(completion.prompt_ids, scored)]
        entries += [(e.token_id, e.logprob, self._top(e)) for e in generated]
        return self._legacy_shape(entries, offset)

    def _legacy_shape(self, entries: list[tuple[int, float | None, dict | None]], offset: int) -> dict:
        """(token id, log-probability, alternatives) per token -> tokens, token_logprobs, top_logprobs, text_offset."""
        tokens, offsets = [], []
        for token_id, _, _ in entries:
            text = self.tokenizer.decode([token_id])
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [top for _, _, top in entries], "text_offset": offsets}

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        return {self.tokenizer.decode([token_id]): logprob for token_id, logprob in entry.top}

    async def stream(self, request: Request) -> AsyncIterator[str]:
        """Server-sent events until every sample ends. If the client goes away (noticed while waiting, or the
        server cancelling this generator on disconnect), the requests are aborted and their slots freed."""
        finished = generated = 0
        complete = False
        try:
            for chunk in self._opening_chunks():
                yield _sse(chunk)
            while finished < len(self.request_ids):
                item = await self._next(request)
                if isinstance(item, Completion):
                    finished += 1
                    continue
                generated += item.token_id is not None
                yield _sse(self._chunk(item))
                if item.finish_reason == "abort":  # ended by the server, not the client: say so in-band
                    yield _sse(error_body("the request was aborted by the server", "server_error"))
            if self.body.stream_options and self.body.stream_options.include_usage:
                usage = _usage(sum(len(p) for p in self.prompts), generated)
                yield _sse({**self._chunk_head(), "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
            complete = True
        except ClientGone:
            pass
        finally:
            if not complete:
                for request_id in self.request_ids:
                    self.runner.abort(request_id)

    async def _next(self, request: Request):
        """The next item for this job; every half second without one, a check that the client is still there.
        (`asyncio.timeout`, not `wait_for`, which wraps each wait in a new task: this runs once a token.)"""
        while True:
            try:
                async with asyncio.timeout(0.5):
                    return await self.queue.get()
            except TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone from None

    def _opening_chunks(self) -> list[dict]:
        """With echo, each choice's stream starts with its prompt text."""
        if not self.body.echo:
            return []
        return [self._chunk(Event(request_id, sample, text=self.tokenizer.decode(prompt)))
                for request_id, prompt in zip(self.request_ids, self.prompts) for sample in range(self.body.n)]

    def _chunk_head(self) -> dict:
        return {"id": self.id, "object": self.chunk_name, "created": self.created, "model": self.model_name}

    def _chunk(self, event: Event) -> dict:
        logprobs = None
        if self.body.logprobs is not None and event.logprob is not None:
            logprobs = self._legacy_shape([(event.token_id, event.logprob.logprob, self._top(event.logprob))], 0)
        choice = {"index": self._choice_index(event.request_id, event.index), "text": event.text,
                  "logprobs": logprobs, "finish_reason": event.finish_reason}
        return {**self._chunk_head(), "choices": [choice]}


class ChatJob(CompletionJob):
    """One /v1/chat/completions call: the conversation rendered by the chat template, answers as messages."""

    prefix, object_name, chunk_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _prompts(self) -> list[list[int]]:
        rendered = render_chat([m.model_dump(exclude_none=True) for m in self.body.messages], self.tokenizer)
        self.params = SamplingParams(**{**vars(self.params), "stop": [*self.params.stop, *rendered.stop],
                                        "stop_token_ids": [*self.params.stop_token_ids, *rendered.stop_token_ids]})
        return [rendered.prompt_ids]

    def _choice(self, completion: Completion, index: int) -> dict:
        sample = completion.samples[index]
        logprobs = {"content": [self._token_entry(e) for e in sample.logprobs]} if sample.logprobs is not None else None
        return {"index": index, "message": {"role": "assistant", "content": sample.text}, "logprobs": logprobs,
                "finish_reason": sample.finish_reason}

    def _opening_chunks(self) -> list[dict]:
        """Each choice's stream starts by naming the speaker, as OpenAI's does."""
        choices = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(self.body.n)]
        return [{**self._chunk_head(), "choices": [choice]} for choice in choices]

    def _chunk(self, event: Event) -> dict:
        delta = {"content": event.text} if event.text or event.finish_reason is None else {}
        logprobs = {"content": [self._token_entry(event.logprob)]} if event.logprob and self.body.logprobs else None
        choice = {"index": event.index, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
        return {**self._chunk_head(), "choices": [choice]}

    def _token_entry(self, entry: TokenLogprob) -> dict:
        def described(token_id: int, logprob: float) -> dict:
            text = self.tokenizer.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(self.tokenizer.decode_bytes([token_id]))}

        return {**described(entry.token_id, entry.logprob),
                "top_logprobs": [described(token_id, lp) for token_id, lp in entry.top]}


class ClientGone(Exception):
    """The streaming client disconnected; its requests are aborted."""


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
