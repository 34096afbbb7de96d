"""The model explorer over HTTP: the routes that expose binarylm/explore/ and the page that draws it.

    POST /v1/internals              one forward pass of a prompt, captured layer by layer
    GET  /v1/explore/embeddings     every token embedding on a 2-D PCA map
    GET  /v1/explore/checkpoints    the run's checkpoints, for comparison
    GET  /v1/explore/curves         the run's training curves (loss, learning rate)
    GET  /explore                   the page (public: it asks for an API key itself when the server has them)
    GET  /explore/static/PATH       its stylesheet and JavaScript modules

The JSON shapes are the contract in binarylm/explore/__init__.py. The /v1 routes sit behind the same API
keys and rate limits as the rest of /v1 (serve/app.py's guard). Each computation is bounded: a prompt of at
most `max_prompt_tokens` tokens (never beyond the context), run on one worker thread so the event loop keeps
answering, within `timeout_s` (a 504 that says so, not a hang), with at most `max_pending` computations
waiting (then 429). Other checkpoints of the run are loaded on demand and the `max_extra_checkpoints` most
recently used stay in memory.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict

from binarylm.errors import BinaryLMError
from binarylm.explore.embeddings import embedding_map
from binarylm.explore.internals import MAX_TOP_K, NEXT_IDS, internals
from binarylm.explore.runs import checkpoint_names, training_curves
from binarylm.serve.app import APIError
from binarylm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).parent / "static" / "explore"
PAGE_PATH, STATIC_PREFIX = "/explore", "/explore/static/"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon"}
# The page loads nothing from elsewhere: its own scripts and styles, and calls to this server only.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass
class ExplorerSettings:
    checkpoint: Path | None = None  # the served checkpoint directory; its run's other checkpoints can be compared
    max_prompt_tokens: int = 256  # never more than the model's context
    timeout_s: float = 60.0  # per computation, waiting included
    max_pending: int = 4  # computations queued or running before new ones get 429
    max_extra_checkpoints: int = 2  # other checkpoints kept in memory for comparison

    def __post_init__(self):
        if self.max_prompt_tokens < 1 or self.timeout_s <= 0 or self.max_pending < 1 or self.max_extra_checkpoints < 0:
            raise BinaryLMError("explorer settings: max_prompt_tokens and max_pending must be at least 1, timeout_s "
                                "positive and max_extra_checkpoints at least 0")


class InternalsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    ids: list[int] | None = None
    checkpoint: str | None = None
    top_k: int = 5


def is_public_page(path: str) -> bool:
    """The page and its files need no API key (the /v1 calls it makes do)."""
    return path == PAGE_PATH or path.startswith(STATIC_PREFIX)


# ------------------------------------------------------------------ the run's checkpoints


class CheckpointShelf:
    """The served model, plus the other checkpoints of its run loaded on demand (the most recent few kept)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, model_name: str, path: Path | None,
                 max_extra: int):
        self.model, self.tokenizer, self.max_extra = model, tokenizer, max_extra
        self.path = Path(path).resolve() if path is not None else None
        self.served = self.path.name if self.path is not None else model_name
        # A checkpoint inside a run directory is compared with its siblings; a lone one (or none) only with itself.
        parent = self.path.parent if self.path is not None else None
        self.run_dir = parent if parent is not None and self.served in checkpoint_names(parent) else None
        self.run = self.run_dir.name if self.run_dir is not None else self.served
        self._loaded: OrderedDict[str, tuple[torch.nn.Module, Tokenizer]] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Every checkpoint that can be asked for, read afresh (a training run may have added some)."""
        names = checkpoint_names(self.run_dir) if self.run_dir is not None else []
        return names if self.served in names else sorted([*names, self.served])

    def check(self, name: str | None) -> str:
        """`name` if it is a known checkpoint (the served one when None), else a 404 listing them."""
        if name is None or name == self.served:
            return self.served
        available = self.names()
        if name not in available:
            raise APIError(404, f"checkpoint {name!r} is not in run {self.run!r}; available: "
                                f"{', '.join(available)}", "not_found_error", "checkpoint")
        return name

    def get(self, name: str) -> tuple[torch.nn.Module, Tokenizer]:
        """The model and tokenizer of a checked name; loads it (slow: call it off the event loop)."""
        if name == self.served:
            return self.model, self.tokenizer
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        from binarylm.checkpoint import load_checkpoint

        saved = load_checkpoint(self.run_dir / name, device=_device_of(self.model))
        with self._lock:
            self._loaded[name] = (saved.model, saved.tokenizer)
            while len(self._loaded) > self.max_extra:
                self._loaded.popitem(last=False)
        return saved.model, saved.tokenizer

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------ bounded computations


class Worker:
    """One thread for the explorer's computations: a time limit per call and a bound on the calls waiting.

    A call that runs past its limit cannot be stopped mid-forward; it finishes on the thread (and still counts
    as waiting until then) while its client gets the 504. A call whose limit passed before it started is
    skipped."""

    def __init__(self, timeout_s: float, max_pending: int):
        self.timeout_s, self.max_pending = timeout_s, max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="binarylm-explore")
        self._pending = 0  # touched on the event loop only

    async def run(self, function: Callable[..., Any], *args) -> Any:
        if self._pending >= self.max_pending:
            raise APIError(429, f"the explorer is busy ({self._pending} computations waiting); retry shortly",
                           "rate_limit_error", retry_after=1)
        self._pending += 1
        deadline = time.monotonic() + self.timeout_s
        future = asyncio.get_running_loop().run_in_executor(self._pool, _unless_late, deadline, function, *args)
        future.add_done_callback(self._done)
        try:  # shielded: the thread's future stays counted until the thread is free again
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            raise APIError(504, f"the computation took longer than the explorer's limit of {self.timeout_s:g} s; "
                                "try a shorter prompt", "timeout_error") from None

    def _done(self, future: asyncio.Future) -> None:
        self._pending -= 1
        if not future.cancelled():
            future.exception()  # a late call's outcome has no reader; mark it seen


def _unless_late(deadline: float, function: Callable[..., Any], *args) -> Any:
    if time.monotonic() > deadline:
        raise TimeoutError("skipped: its time limit passed while it waited")
    return function(*args)


# ------------------------------------------------------------------ the routes


def add_explorer(app: FastAPI, model: torch.nn.Module, tokenizer: Tokenizer, model_name: str,
                 settings: ExplorerSettings | None = None) -> None:
    """Mount the explorer's routes and page on `app`, for `model` (the served one) and its run."""
    settings = settings or ExplorerSettings()
    shelf = CheckpointShelf(model, tokenizer, model_name, settings.checkpoint, settings.max_extra_checkpoints)
    worker = Worker(settings.timeout_s, settings.max_pending)
    embedding_maps: OrderedDict[str, dict] = OrderedDict()  # per checkpoint, computed once
    router = APIRouter()

    @router.post("/v1/internals")
    async def internals(body: InternalsRequest) -> JSONResponse:
        name = shelf.check(body.checkpoint)
        _check_top_k(body.top_k)
        if name == shelf.served:  # a bad request is refused at once, not after waiting for the worker
            prompt_ids(body, tokenizer, model.config.vocab_size, token_limit(model, settings.max_prompt_tokens))
        started = time.perf_counter()
        reply = await worker.run(_internals_of, shelf, name, body, settings.max_prompt_tokens)
        reply = {"checkpoint": name, **reply, "timing_ms": round((time.perf_counter() - started) * 1000, 1)}
        return JSONResponse(reply)

    @router.get("/v1/explore/embeddings")
    async def embeddings(checkpoint: str | None = Query(None)) -> JSONResponse:
        name = shelf.check(checkpoint)
        if name not in embedding_maps:
            embedding_maps[name] = await worker.run(_embedding_map_of, shelf, name)
            while len(embedding_maps) > settings.max_extra_checkpoints + 1:
                embedding_maps.popitem(last=False)
        return JSONResponse(embedding_maps[name])

    @router.get("/v1/explore/checkpoints")
    async def checkpoints() -> dict:
        return {"run": shelf.run, "served": shelf.served, "checkpoints": shelf.names()}

    @router.get("/v1/explore/curves")
    async def curves() -> JSONResponse:
        if shelf.run_dir is None:
            return JSONResponse({"train": [], "val": []})
        return JSONResponse(await asyncio.to_thread(training_curves, shelf.run_dir))

    @router.get(PAGE_PATH, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((PAGE_DIR / "index.html").read_text(encoding="utf-8"), headers=_page_headers())

    @router.get(PAGE_PATH + "/", include_in_schema=False)
    async def page_slash() -> RedirectResponse:
        return RedirectResponse(PAGE_PATH)

    @router.get(STATIC_PREFIX + "{path:path}", include_in_schema=False)
    async def static(path: str) -> FileResponse:
        return FileResponse(_static_file(path), media_type=CONTENT_TYPES[Path(path).suffix],
                            headers={"cache-control": "no-cache"})

    app.include_router(router)


def _page_headers() -> dict[str, str]:
    return {"content-security-policy": PAGE_POLICY, "cache-control": "no-cache", "x-content-type-options": "nosniff"}


def _static_file(path: str) -> Path:
    """The page's file at `path`, or a 404: only files inside the page's folder, of the known kinds."""
    root = PAGE_DIR.resolve()
    file = (root / path).resolve()
    if not file.is_relative_to(root) or not file.is_file() or file.suffix not in CONTENT_TYPES:
        raise APIError(404, f"the explorer has no file {path!r}", "not_found_error")
    return file


def _check_top_k(top_k: int) -> None:
    if not 1 <= top_k <= MAX_TOP_K:
        raise APIError(400, f"top_k must be a whole number from 1 to {MAX_TOP_K} (logit-lens entries per cell), "
                            f"got {top_k}", param="top_k")


def prompt_ids(body: InternalsRequest, tokenizer: Tokenizer, vocab_size: int, limit: int) -> list[int]:
    """The request's token ids (its text encoded, or its ids checked), within `limit` tokens."""
    if body.prompt is not None and body.ids is not None:
        raise APIError(400, "give either prompt (text) or ids (token ids), not both", param="prompt")
    if body.prompt is None and body.ids is None:
        raise APIError(400, "give a prompt (text) or ids (token ids) to look inside the model", param="prompt")
    if body.prompt is not None:
        ids = tokenizer.encode(body.prompt, allowed_special="all")
        if not ids:
            raise APIError(400, "the prompt is empty; type some text to see what the model makes of it",
                           param="prompt")
    else:
        ids = list(body.ids)
        if not ids:
            raise APIError(400, "ids is empty; give at least one token id", param="ids")
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary of {vocab_size}", param="ids")
    if len(ids) > limit:
        raise APIError(400, f"the prompt is {len(ids)} tokens; the explorer takes at most {limit} "
                            "(shorten it, or raise the server's --explore-max-tokens up to the context)",
                       param="prompt" if body.prompt is not None else "ids")
    return ids


def token_limit(model: torch.nn.Module, max_prompt_tokens: int) -> int:
    return max(1, min(model.config.context_length, max_prompt_tokens))


def _internals_of(shelf: CheckpointShelf, name: str, body: InternalsRequest, max_prompt_tokens: int) -> dict:
    """The internals of one request (runs on the worker thread)."""
    model, tokenizer = shelf.get(name)
    ids = prompt_ids(body, tokenizer, model.config.vocab_size, token_limit(model, max_prompt_tokens))
    return compute_internals(model, tokenizer, ids, body.top_k)


def compute_internals(model: torch.nn.Module, tokenizer: Tokenizer, ids: list[int], top_k: int) -> dict:
    return _guarded(internals, model, tokenizer, ids, top_k=top_k, next_ids=NEXT_IDS)


def _embedding_map_of(shelf: CheckpointShelf, name: str) -> dict:
    model, tokenizer = shelf.get(name)
    return _guarded(embedding_map, model, tokenizer)


def _guarded(function: Callable[..., Any], *args, **kwargs) -> Any:
    """Run `function`; an unexpected failure becomes a 500 that names it (and is logged with its traceback)."""
    try:
        with torch.inference_mode():
            return function(*args, **kwargs)
    except (APIError, BinaryLMError):
        raise
    except Exception as error:
        logger.exception("the explorer's %s failed", function.__name__)
        raise APIError(500, f"the explorer's {function.__name__} failed: {type(error).__name__}: {error}",
                       "server_error") from None
