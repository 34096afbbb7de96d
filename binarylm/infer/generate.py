"""Text generation: token ids one at a time, then text with stop strings and streaming.

Two layers:

* `generate_ids` works on ids only. With the KV cache it runs the prompt once
  (prefill), then feeds one new token per step, shape (1, 1). Without the cache
  it re-runs the whole sequence every step; that is slow but obviously right,
  and the tests check that both give the same tokens.
* `generate` turns a prompt string into a `GenerationResult`: it encodes,
  fits the prompt into the context, decodes the new ids back to text as they
  arrive (never half a UTF-8 character), stops at the end-of-text token or a
  stop string, and hands each piece of final text to `on_text` for streaming.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from binarylm.errors import BinaryLMError
from binarylm.infer.sampling import check_sampling_args, sample_next

if TYPE_CHECKING:
    from binarylm.tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "eot"]
TRUNCATE_CHOICES = ("error", "left")


@dataclass
class GenerationConfig:
    """How `generate` decodes. temperature 0 is greedy; top_k 0 and top_p 1.0 keep every token."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: PyTorch's global random state
    stop_strings: list[str] = field(default_factory=list)
    stop_at_eot: bool = True
    truncate_prompt: str = "error"  # what to do with a prompt too long for the context: "error" | "left"

    def validate(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        if self.max_new_tokens < 0:
            raise BinaryLMError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.truncate_prompt not in TRUNCATE_CHOICES:
            raise BinaryLMError(
                f"truncate_prompt must be one of {', '.join(TRUNCATE_CHOICES)}; got {self.truncate_prompt!r}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise BinaryLMError(f"stop strings must be non-empty strings, got {self.stop_strings!r}")


@dataclass
class GenerationResult:
    text: str  # the generated text, cut before a stop string; never the end-of-text token's text
    token_ids: list[int]  # the ids generated, without a final end-of-text id
    prompt_tokens: int  # prompt ids the model saw (after any truncation)
    finish_reason: FinishReason  # "stop": a stop string; "eot": end-of-text; "length": token budget or context


# ---------------------------------------------------------------- token ids


def generate_ids(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop_ids: Collection[int] = (),
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new ids after `prompt_ids`, one per step.

    Stops after yielding an id in `stop_ids`. The prompt plus the new tokens
    must fit in the model's context. Arguments are checked here, at the call;
    the model runs as the iterator is consumed, in eval mode (its previous mode
    comes back when the iterator ends or is closed).
    """
    check_sampling_args(temperature, top_k, top_p)
    _check_prompt_ids(model, prompt_ids, max_new_tokens)
    sample = partial(sample_next, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return _decode_steps(model, list(prompt_ids), max_new_tokens, sample, use_cache, frozenset(stop_ids))


def _check_prompt_ids(model: nn.Module, prompt_ids: list[int], max_new_tokens: int) -> None:
    context, vocab = model.config.context_length, model.config.vocab_size
    if not prompt_ids:
        raise BinaryLMError("the prompt has no tokens; give at least one (e.g. the end-of-text id)")
    if max_new_tokens < 0:
        raise BinaryLMError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompt_ids) + max_new_tokens > context:
        raise BinaryLMError(
            f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceed the model's "
            f"context of {context}; shorten the prompt or ask for at most {context - len(prompt_ids)} new tokens"
        )
    bad = next((i for i in prompt_ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise BinaryLMError(
            f"prompt token id {bad} is outside the model's vocabulary of {vocab}; "
            "encode the prompt with the tokenizer this model was trained with"
        )


def _decode_steps(
    model: nn.Module,
    ids: list[int],
    max_new_tokens: int,
    sample: Callable[[torch.Tensor], torch.Tensor],
    use_cache: bool,
    stop_ids: frozenset[int],
) -> Iterator[int]:
    if max_new_tokens == 0:
        return
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        cache = _new_cache(model, len(ids) + max_new_tokens) if use_cache else None
        logits = _last_logits(model, ids, cache, device)  # (1, V): the prefill
        for step in range(max_new_tokens):
            token = int(sample(logits)[0])
            yield token
            ids.append(token)
            if token in stop_ids or step == max_new_tokens - 1:
                return
            logits = _last_logits(model, ids[-1:] if use_cache else ids, cache, device)  # (1, V)
    finally:
        model.train(was_training)


@torch.inference_mode()
def _new_cache(model: nn.Module, max_length: int):
    return model.new_cache(1, max_length=max_length)


@torch.inference_mode()
def _last_logits(model: nn.Module, ids: list[int], cache, device: torch.device) -> torch.Tensor:
    """Run `ids` (continuing `cache` if given) and return the logits after the last one, (1, V) float32.

    Inference mode is entered per call rather than around the whole loop, so it
    never leaks into the caller's code between yields.
    """
    logits, _ = model(torch.tensor([ids], dtype=torch.long, device=device), cache=cache)  # (1, T, V)
    return logits[:, -1, :].float()  # (1, V)


def _model_device(model: nn.Module) -> torch.device:
    weight = next(model.parameters(), None)
    return weight.device if weight is not None else torch.device("cpu")


# --------------------------------------------------------------------- text


class TextStream:
    """Turns generated bytes into final text: whole UTF-8 characters only, stop strings cut.

    `push(data)` returns the text that can no longer change; `finish()` returns
    the rest. Text is held back while it ends in an incomplete UTF-8 character
    or in the beginning of a stop string. Once `stopped`, `text` ends just
    before the first stop string.
    """

    def __init__(self, stop_strings: Collection[str] = ()):
        self.stop_strings = tuple(stop_strings)
        self.text = ""  # all final-or-pending text so far
        self.stopped = False
        self._emitted = 0  # characters of `text` already returned
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        if self.stopped:
            return ""
        self.text += self._decoder.decode(data)
        return self._advance(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)  # a dangling partial character becomes U+FFFD
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        cut = self._find_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _find_stop(self) -> int | None:
        """Where the earliest stop string starts. None can start before `_emitted` (that text was checked)."""
        found = [i for s in self.stop_strings if (i := self.text.find(s, self._emitted)) >= 0]
        return min(found, default=None)

    def _held_back(self) -> int:
        """Length of the longest end of `text` that could still grow into a stop string."""
        longest = max(map(len, self.stop_strings), default=0)
        for size in range(min(longest - 1, len(self.text) - self._emitted), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return size
        return 0


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    config: GenerationConfig,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Continue `prompt` with the model; `on_text` receives each piece of text as soon as it is final."""
    config.validate()
    prompt_ids = _prompt_ids(tokenizer, prompt)
    prompt_ids = _fit_prompt(prompt_ids, model.config.context_length, config)
    budget = min(config.max_new_tokens, model.config.context_length - len(prompt_ids))
    eot = tokenizer.eot_id if config.stop_at_eot else None
    steps = generate_ids(
        model, prompt_ids, budget,
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        generator=_seeded_generator(model, config.seed),
        stop_ids=() if eot is None else (eot,),
    )
    stream = TextStream(config.stop_strings)
    emit = on_text or (lambda _: None)
    token_ids: list[int] = []
    finish_reason: FinishReason = "length"
    with closing(steps):
        for token in steps:
            if token == eot:
                finish_reason = "eot"
                break
            token_ids.append(token)
            _emit(emit, stream.push(tokenizer.decode_bytes([token])))
            if stream.stopped:
                finish_reason = "stop"
                break
    _emit(emit, stream.finish())
    if stream.stopped:
        finish_reason = "stop"  # a stop string completed only by the final flush
    return GenerationResult(stream.text, token_ids, len(prompt_ids), finish_reason)


def _emit(on_text: Callable[[str], None], delta: str) -> None:
    if delta:
        on_text(delta)


def _prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the end-of-text token (a document boundary)."""
    if prompt:
        return tokenizer.encode(prompt, allowed_special="all")
    if tokenizer.eot_id is None:
        raise BinaryLMError(
            "the prompt is empty and this tokenizer has no <|endoftext|> token to start from; give a prompt"
        )
    return [tokenizer.eot_id]


def _fit_prompt(prompt_ids: list[int], context: int, config: GenerationConfig) -> list[int]:
    """The prompt, leaving room for at least one new token (when any are asked for)."""
    limit = context - 1 if config.max_new_tokens > 0 else context
    if len(prompt_ids) <= limit:
        return prompt_ids
    if config.truncate_prompt == "error":
        raise BinaryLMError(
            f"prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
            "shorten it or use --truncate-prompt left"
        )
    warnings.warn(
        f"prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
        f"keeping only its last {limit} tokens",
        stacklevel=3,
    )
    return prompt_ids[-limit:]


def _seeded_generator(model: nn.Module, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=_model_device(model))
    generator.manual_seed(seed)
    return generator
