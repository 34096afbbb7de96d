"""The inference engine: many requests decoded together, joining and leaving at any step.

    engine = Engine(model, tokenizer, max_batch=32)
    request_id = engine.add_request(prompt_ids, SamplingParams(max_tokens=50), on_event=print)
    while engine.has_work():
        engine.step()
    # or, all at once:
    completions = engine.generate([ids_a, ids_b], SamplingParams(temperature=0))

How it works (continuous batching):

- The KV cache is preallocated once: `max_batch` slots of `max_length` positions
  (model/kv_cache.py, BatchKVCache). A sequence owns one slot while it runs.
- `step()` first admits waiting requests while slots are free: each prompt runs
  once through the model (prefill) into its slot, and the first token is drawn
  from its last position. A request with n > 1 samples copies the prompt's slot
  n - 1 times instead of running the prompt again.
- Then one decode forward feeds every running sequence its latest token, shape
  (B, 1), each row at its own position, and draws the next token for each row
  with that request's own settings (infer/sampling.py).
- A sequence that finishes (a stop token or string, its token budget, the
  context) frees its slot at once: the last running slot moves into the gap, so
  the running rows are always slots 0 .. B-1 and the next waiting request can
  join at the next step.

Each request may stream: `on_event` receives an `Event` per new token (its id,
text, log-probability) and a final one with the finish reason.

The engine is synchronous and single-threaded by design; `add_request` and
`abort` may be called from other threads (the server's), and take effect at the
next step.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from binarylm.errors import BinaryLMError
from binarylm.infer.generate import TextStream
from binarylm.infer.sampling import SamplingParams, process_logits, sample_rows
from binarylm.model.kv_cache import BatchKVCache
from binarylm.model.linear import pack_for_rows
from binarylm.tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # under the raw model distribution
    top: list[tuple[int, float]] = field(default_factory=list)  # the likeliest alternatives, best first


@dataclass
class Event:
    """One streamed piece of a request: a new token, or (with finish_reason) the end of a sample."""

    request_id: str
    index: int  # which of the request's n samples
    token_id: int | None = None
    text: str = ""  # the new final text (may be empty while a stop string or a UTF-8 character is pending)
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last event of a sample


@dataclass
class Sample:
    index: int
    token_ids: list[int] = field(default_factory=list)  # the generated ids, without a final stop/eos id
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    samples: list[Sample]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the first prompt token has none


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] | None
    completion: Completion
    on_complete: Callable[[Completion], None] | None = None
    on_admit: Callable[[], None] | None = None


@dataclass
class _Sequence:
    """One running sample: its slot, its random stream and the token waiting to be fed."""

    request: _Request
    sample: Sample
    generator: torch.Generator
    stream: TextStream | None
    pending: int = -1  # the last sampled token, not yet in the cache


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, max_batch: int = 32,
                 max_length: int | None = None, pack_weights: bool = True):
        """`pack_weights`: on CPU, keep float32 weights also in MKL's packed layout for full max_batch decode
        steps (model/linear.py: ~1.5x faster matmuls there, one more copy of the weights in memory)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        self.max_length = min(max_length or config.context_length, config.context_length)
        weight = next(model.parameters())
        self.device = weight.device
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.cache = BatchKVCache(config.n_layer, max_batch, config.n_kv_heads, self.max_length, config.head_dim,
                                  self.device, dtype)
        self.vocab_size = config.vocab_size
        self.packed_layers = pack_for_rows(model, max_batch) if pack_weights and max_batch > 1 else 0
        self.eos_id = tokenizer.eot_id if tokenizer is not None else None
        self.running: list[_Sequence] = []  # running[i] occupies cache slot i
        self.waiting: deque[_Request] = deque()
        self.finished: dict[str, Completion] = {}
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._counts: torch.Tensor | None = None  # (slots, V) tokens generated per slot, for penalties
        self._seen: torch.Tensor | None = None  # (slots, V) tokens in each slot's prompt or output

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    on_event: Callable[[Event], None] | None = None, request_id: str | None = None,
                    on_complete: Callable[[Completion], None] | None = None,
                    on_admit: Callable[[], None] | None = None) -> str:
        """Queue a request; it starts at the next `step()`. Returns its id.

        `on_admit` is called when it leaves the queue for a slot; `on_event` gets each streamed Event;
        `on_complete` gets the whole Completion once every sample has ended (it is also kept in `finished`
        until someone pops it). Callbacks run on the thread that calls `step()`."""
        params = (params or SamplingParams()).validate(self.vocab_size)
        prompt_ids = [int(i) for i in prompt_ids]
        self._check_request(prompt_ids, params)
        completion = Completion("", prompt_ids, [Sample(i) for i in range(params.n)])
        with self._lock:
            request_id = request_id or f"req-{next(self._ids)}"
            if request_id in self._known_ids():
                raise BinaryLMError(f"request id {request_id!r} is already in use; give each request its own id")
            completion.request_id = request_id
            self.waiting.append(_Request(request_id, prompt_ids, params, on_event, completion, on_complete, on_admit))
        return request_id

    def _known_ids(self) -> set[str]:
        running = {sequence.request.request_id for sequence in self.running}
        return running | {request.request_id for request in self.waiting} | set(self.finished)

    def _check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise BinaryLMError("the prompt has no tokens; give at least one (e.g. the end-of-text id)")
        bad = next((i for i in prompt_ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise BinaryLMError(f"prompt token id {bad} is outside the model's vocabulary of {self.vocab_size}")
        if len(prompt_ids) + params.max_tokens > self.max_length:
            raise BinaryLMError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceed the "
                f"context of {self.max_length} tokens; shorten the prompt or ask for at most "
                f"{max(self.max_length - len(prompt_ids), 0)} new tokens"
            )
        if params.n > self.cache.n_slots:
            raise BinaryLMError(f"n={params.n} samples need more than the engine's {self.cache.n_slots} slots")

    def abort(self, request_id: str) -> None:
        """Stop a request (e.g. its client went away); its slots are freed at the next step."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ the loop

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits, then advance every running sequence by one token."""
        self._apply_aborts()
        self._admit()
        if self.running:
            self._decode()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """Run `prompts` to completion with continuous batching; completions in prompt order."""
        settings = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [self.add_request(prompt, setting) for prompt, setting in zip(prompts, settings, strict=True)]
        while any(request_id not in self.finished for request_id in ids):
            self.step()
        return [self.finished.pop(request_id) for request_id in ids]

    def _admit(self) -> None:
        """Take every waiting request that fits in the free slots and prefill them together."""
        admitted: list[_Request] = []
        with self._lock:
            free = self.cache.n_slots - len(self.running)
            while self.waiting and self.waiting[0].params.n <= free:
                request = self.waiting.popleft()
                free -= request.params.n
                admitted.append(request)
        if admitted:
            # generating requests first: their rows become running slots; scoring-only rows come last
            self._prefill(sorted(admitted, key=lambda request: request.params.max_tokens == 0))

    def _prefill(self, requests: list[_Request]) -> None:
        """Run the prompts, padded to one width, into free slots; copy each for its other samples; draw every
        sample's first token. One forward for all of them, each row ending at its own last token."""
        for request in requests:
            if request.on_admit is not None:
                request.on_admit()
        first = len(self.running)
        lengths = [len(request.prompt_ids) for request in requests]
        ids = torch.zeros((len(requests), max(lengths)), dtype=torch.long, device=self.device)  # (k, P_max)
        for row, request in enumerate(requests):
            ids[row, : lengths[row]] = torch.tensor(request.prompt_ids, device=self.device)
            self.cache.clear(first + row)
        scoring = any(request.params.prompt_logprobs for request in requests)
        rows = self.cache.rows(first, first + len(requests), lengths if len(requests) > 1 else None)
        logits, _ = self.model(ids, cache=rows, last_only=not scoring)  # (k, 1 or P_max, V)
        logits = _at_least_float32(logits)
        last = logits[:, -1] if not scoring else logits[torch.arange(len(requests)), torch.tensor(lengths) - 1]
        for row, request in enumerate(requests):
            if request.params.prompt_logprobs:
                request.completion.prompt_logprobs = _prompt_logprobs(logits[row, : lengths[row]], request.prompt_ids,
                                                                      request.params.logprobs)
            if request.params.max_tokens == 0:  # scoring only (echo): nothing to generate
                self._finish_unstarted(request, "length")
        self._start_samples([r for r in requests if r.params.max_tokens > 0], first, last)

    def _start_samples(self, requests: list[_Request], first: int, last_logits: torch.Tensor) -> None:
        """Sample 0 of request i runs in slot first + i (its prompt's row); samples 1.. get copies after those."""
        sequences = [self._start_sequence(request, request.completion.samples[0], first + row)
                     for row, request in enumerate(requests)]
        source_rows = list(range(len(requests)))
        for row, request in enumerate(requests):
            for sample in request.completion.samples[1:]:
                self.cache.copy_slot(first + row, len(self.running))
                sequences.append(self._start_sequence(request, sample, len(self.running)))
                source_rows.append(row)
        if sequences:
            self._advance(sequences, first, last_logits[source_rows])

    def _start_sequence(self, request: _Request, sample: Sample, slot: int) -> _Sequence:
        params = request.params
        generator = torch.Generator(device=self.device)
        seed = params.seed + sample.index if params.seed is not None else int(torch.randint(2**62, ()).item())
        generator.manual_seed(seed)
        stream = TextStream(params.stop) if self.tokenizer is not None else None
        sample.logprobs = [] if params.logprobs is not None else None
        sequence = _Sequence(request, sample, generator, stream)
        self.running.append(sequence)
        if params.penalised:
            self._reset_penalty_rows(slot, request.prompt_ids)
        return sequence

    def _decode(self) -> None:
        batch = len(self.running)
        ids = torch.tensor([[sequence.pending] for sequence in self.running], device=self.device)  # (B, 1)
        logits, _ = self.model(ids, cache=self.cache.rows(0, batch))  # (B, 1, V)
        self._advance(list(self.running), 0, _at_least_float32(logits[:, -1]))

    def _advance(self, sequences: list[_Sequence], first_slot: int, logits: torch.Tensor) -> None:
        """Draw the next token of each sequence (in slots first_slot, first_slot + 1, ...) from its logits
        row (B, V), then record and stream it."""
        params = [sequence.request.params for sequence in sequences]
        slots = torch.arange(first_slot, first_slot + len(sequences), device=self.device)
        penalties = (self._counts[slots], self._seen[slots]) if self._counts is not None else (None, None)
        processed = process_logits(logits, params, *penalties)
        tokens = sample_rows(processed, params, [sequence.generator for sequence in sequences]).tolist()
        log_probs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        if self._counts is not None:
            self._counts[slots, torch.tensor(tokens, device=self.device)] += 1
            self._seen[slots, torch.tensor(tokens, device=self.device)] = True
        for row, (sequence, token) in enumerate(zip(sequences, tokens)):
            logprob = _token_logprob(log_probs[row], token, params[row].logprobs) if log_probs is not None else None
            self._record(sequence, token, logprob)
        self._release_finished()

    def _record(self, sequence: _Sequence, token: int, logprob: TokenLogprob | None) -> None:
        sample, params = sequence.sample, sequence.request.params
        stops = token in params.stop_token_ids or (token == self.eos_id and not params.ignore_eos)
        text = ""
        if not stops:
            sample.token_ids.append(token)
            if logprob is not None:
                sample.logprobs.append(logprob)
            if sequence.stream is not None:
                text = sequence.stream.push(self.tokenizer.decode_bytes([token]))
        sequence.pending = token
        if stops or (sequence.stream is not None and sequence.stream.stopped):
            sample.finish_reason = "stop"
        elif len(sample.token_ids) >= params.max_tokens:
            sample.finish_reason = "length"
        if sample.finish_reason and sequence.stream is not None:
            text += sequence.stream.finish()
        sample.text += text
        self._emit(sequence, Event(sequence.request.request_id, sample.index, None if stops else token, text,
                                   None if stops else logprob, sample.finish_reason))

    def _emit(self, sequence: _Sequence, event: Event) -> None:
        if sequence.request.on_event is not None:
            sequence.request.on_event(event)

    # ------------------------------------------------------------------ slots

    def _release_finished(self) -> None:
        """Free the slots of finished sequences, moving the last running ones into the gaps."""
        slot = 0
        while slot < len(self.running):
            if self.running[slot].sample.finish_reason is None:
                slot += 1
                continue
            finished = self.running[slot]
            last = len(self.running) - 1
            if slot != last:
                self._move_slot(last, slot)
            self.running[slot] = self.running[last]
            self.running.pop()
            self.cache.clear(last)
            self._complete_if_done(finished.request)

    def _move_slot(self, source: int, target: int) -> None:
        self.cache.copy_slot(source, target)
        if self._counts is not None:
            self._counts[target], self._seen[target] = self._counts[source], self._seen[source]

    def _finish_unstarted(self, request: _Request, reason: str) -> None:
        """End every sample of a request that never ran a decode step, telling a streaming caller."""
        for sample in request.completion.samples:
            sample.finish_reason = reason
            if request.on_event is not None:
                request.on_event(Event(request.request_id, sample.index, finish_reason=reason))
        self._complete_if_done(request)

    def _complete_if_done(self, request: _Request) -> None:
        if all(sample.finish_reason for sample in request.completion.samples):
            self.finished[request.request_id] = request.completion
            if request.on_complete is not None:
                request.on_complete(request.completion)

    def _apply_aborts(self) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            queued = [r for r in self.waiting if r.request_id in aborted]
            self.waiting = deque(r for r in self.waiting if r.request_id not in aborted)
        for request in queued:
            self._finish_unstarted(request, "abort")
        for sequence in self.running:
            if sequence.request.request_id in aborted and sequence.sample.finish_reason is None:
                sequence.sample.finish_reason = "abort"
                self._emit(sequence, Event(sequence.request.request_id, sequence.sample.index,
                                           finish_reason="abort"))
        self._release_finished()

    def _reset_penalty_rows(self, slot: int, prompt_ids: list[int]) -> None:
        if self._counts is None:
            shape = (self.cache.n_slots, self.vocab_size)
            self._counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self._counts[slot] = 0
        self._seen[slot] = False
        self._seen[slot, torch.tensor(prompt_ids, device=self.device)] = True


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16 logits become float32 for sampling; float64 ones (in tests) stay float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top: int | None) -> list[TokenLogprob | None]:
    """log p(prompt[t] | prompt[:t]) for t >= 1, with the `top` likeliest alternatives, from the prefill's logits
    (P, V); None for the first token, which nothing predicts."""
    log_probs = torch.log_softmax(logits[:-1], dim=-1)  # (P - 1, V)
    return [None, *(_token_logprob(row, token, top) for row, token in zip(log_probs, prompt_ids[1:]))]


def _token_logprob(log_probs: torch.Tensor, token: int, top: int | None) -> TokenLogprob:
    """The chosen token's log-probability (V,) and the `top` likeliest alternatives."""
    alternatives = []
    if top:
        values, ids = torch.topk(log_probs, min(top, log_probs.shape[-1]))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(log_probs[token]), alternatives)
