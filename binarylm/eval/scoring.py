"""Log-likelihood scoring: the one place that turns (context, continuation) pairs and long texts into log-probs.

Every evaluation that judges text by its probability goes through here: multiple-choice
benchmarks (which answer is likeliest after the question), perplexity and bits per byte of
long texts (a sliding window), and the lm-evaluation-harness adapter (its `loglikelihood`
and `loglikelihood_rolling` requests).

A pair is split into tokens the way lm-evaluation-harness does it: whitespace at the end of
the context moves to the front of the continuation (" Paris" is one token, "Paris" after a
trailing space is two), then the whole text is encoded once and the continuation is what
lies beyond the context's own tokens. The model reads the pair with its continuation's last
token dropped, and the continuation's log-prob is the sum over its tokens of
log_softmax(logits)[next token]; "greedy" says each of those tokens was also the argmax.

    scores = score_pairs(model, tokenizer, [("The capital of France is", " Paris")])
    scores[0].logprob, scores[0].greedy
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from binarylm.errors import BinaryLMError
from binarylm.tokenizer import Tokenizer

SCORE_BATCH = 16


@dataclass(frozen=True)
class Score:
    """A continuation's total log-probability (nats), whether greedy decoding gives it, and its token count."""

    logprob: float
    greedy: bool
    tokens: int


def split_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids and continuation ids, with the context's trailing whitespace moved onto the continuation."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode_ordinary(stripped)
    whole = tokenizer.encode_ordinary(stripped + continuation)
    # When a token spans the boundary ("):\n"), the whole text's tokens past the context's count are scored, as
    # lm-evaluation-harness does, so that our figures and the harness's (direct or through the server) agree.
    continuation_ids = whole[len(context_ids):]
    return context_ids, continuation_ids or tokenizer.encode_ordinary(continuation)  # all merged in: on its own


def score_pairs(model: torch.nn.Module, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]],
                batch_size: int = SCORE_BATCH) -> list[Score]:
    """The Score of each continuation after its context (text pairs; see split_pair)."""
    return score_token_pairs(model, [split_pair(tokenizer, *pair) for pair in pairs], tokenizer.eot_id, batch_size)


@torch.no_grad()
def score_token_pairs(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], prefix_id: int | None,
                      batch_size: int = SCORE_BATCH) -> list[Score]:
    """The Score of each continuation id list after its context id list.

    An empty context is read as `prefix_id` (the end-of-text token), so the first continuation
    token is predicted too. Contexts too long for the model lose their oldest tokens; a
    continuation that alone fills the context window is an error.
    """
    window = model.config.context_length
    rows = []
    for context, continuation in pairs:
        if not continuation:
            raise BinaryLMError("a continuation is empty: there is nothing to score (give it at least one character)")
        if len(continuation) > window:
            raise BinaryLMError(f"a continuation of {len(continuation)} tokens does not fit the model's context of "
                                f"{window}; shorten it or score it with a sliding window (rolling_logprobs)")
        if not context and prefix_id is None:
            raise BinaryLMError("a context is empty and the tokenizer has no end-of-text token to start a text "
                                "with; give every pair a non-empty context")
        ids = ([*context] or [prefix_id]) + [*continuation]
        rows.append((ids[-(window + 1):], len(continuation)))
    return [Score(logprobs.sum().item(), bool(greedy.all()), len(logprobs))
            for logprobs, greedy in _scored_tokens(model, rows, batch_size)]


@torch.no_grad()
def rolling_logprobs(model: torch.nn.Module, ids: Sequence[int], prefix_id: int, stride: int | None = None,
                     batch_size: int = SCORE_BATCH) -> torch.Tensor:
    """(N,) log-prob of every token of `ids`, each given as much of the text before it as a sliding window holds.

    The text is read as `prefix_id` followed by `ids`. The first window reads a full context;
    after it, each window ends `stride` tokens (default: half the context) further on and reads
    the context's worth of tokens before its end, scoring only the tokens the previous window did
    not. Every token is scored once, with at least context - stride tokens of history once the
    text is longer than a window. stride = context gives plain non-overlapping windows: faster,
    and a little pessimistic.
    """
    window = model.config.context_length
    stride = stride or max(window // 2, 1)
    if not 0 < stride <= window:
        raise BinaryLMError(f"stride must be between 1 and the context length {window}, got {stride}")
    text = [prefix_id, *ids]
    pieces = []  # (tokens, how many of its last tokens to score)
    scored_up_to = 1  # text[0] is the prefix, never scored
    while scored_up_to < len(text):
        end = min(scored_up_to + stride, len(text)) if scored_up_to > 1 else min(window + 1, len(text))
        start = max(end - window - 1, 0)
        pieces.append(([*text[start:end]], end - scored_up_to))
        scored_up_to = end
    logprobs = [logprobs for logprobs, _ in _scored_tokens(model, pieces, batch_size)]
    return torch.cat(logprobs) if logprobs else torch.zeros(0)


def _scored_tokens(model: torch.nn.Module, rows: list[tuple[list[int], int]],
                   batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each row (ids, n): the log-probs (n,) of its last n tokens and whether each was the argmax (n,).

    Rows of similar length share a batch, right-padded: padding comes after every scored token,
    so in a causal model it changes nothing.
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, result in zip(chunk, _scored_batch(model, [rows[i] for i in chunk])):
            results[i] = result
    return results


def _scored_batch(model: torch.nn.Module, rows: list[tuple[list[int], int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    for row, (ids, _) in enumerate(rows):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
    was_training = model.training
    model.eval()
    logits, _ = model(inputs.to(device), return_logits=True)  # (B, T, V)
    model.train(was_training)
    results = []
    for row, (ids, n_scored) in enumerate(rows):
        targets = torch.tensor(ids[-n_scored:], device=device)  # (n,)
        positions = torch.arange(len(ids) - 1 - n_scored, len(ids) - 1, device=device)  # (n,)
        picked = F.log_softmax(logits[row, positions].float(), dim=-1)  # (n, V): only the scored positions
        results.append((picked.gather(1, targets[:, None]).squeeze(1).cpu(), (picked.argmax(-1) == targets).cpu()))
    return results
