"""Choosing the next token from the model's logits: greedy, temperature, top-k and top-p.

    logits (B, V) --/ temperature--> --top-k--> --top-p--> softmax --> one draw per row (B,)

Temperature 0 means greedy: the most likely token, no randomness. Otherwise the
logits are divided by the temperature (below 1 sharpens, above 1 flattens), then
top-k keeps the k largest and top-p keeps the smallest set of tokens whose
probability reaches p. A removed token gets a logit of -inf, so probability 0.

This is the one place sampling is written; generation, the engine and the
server all call it.
"""

from __future__ import annotations

import math
import numbers

import torch

from binarylm.errors import BinaryLMError


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise a BinaryLMError naming the bad argument and its valid range."""
    if not math.isfinite(temperature) or temperature < 0:
        raise BinaryLMError(
            f"temperature must be 0 (greedy) or a positive number, got {temperature}; "
            "use 0 for greedy decoding or a value such as 0.8 to sample"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise BinaryLMError(
            f"top_k must be a whole number >= 0, got {top_k!r}; use 0 to keep every token or e.g. 50"
        )
    if not 0.0 < top_p <= 1.0:
        raise BinaryLMError(
            f"top_p must be in (0, 1], got {top_p}; use 1.0 to keep every token or e.g. 0.9"
        )


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (exactly k, even with ties); the rest become -inf.

    k = 0, or k at least the vocabulary size, keeps everything.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kept = torch.topk(logits, k, dim=-1).indices  # (B, k)
    removed = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, kept, False)  # (B, V)
    return logits.masked_fill(removed, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep, per row, the most likely tokens until their probability reaches p; the rest become -inf.

    A token is kept when the mass of the tokens ranked above it is still below p,
    so the most likely token is always kept. p = 1 keeps everything.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
    probs = torch.softmax(sorted_logits.float(), dim=-1)  # (B, V)
    mass_above = torch.cumsum(probs, dim=-1) - probs  # (B, V): mass of strictly better-ranked tokens
    removed_sorted = mass_above >= p  # (B, V), in sorted order; column 0 is always False
    removed = torch.empty_like(removed_sorted).scatter_(-1, order, removed_sorted)  # (B, V), vocabulary order
    return logits.masked_fill(removed, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V); returns (B,) int64.

    `generator` (on the logits' device) makes the draws reproducible; None uses
    PyTorch's global random state.
    """
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise BinaryLMError(
            f"sample_next expects logits of shape (batch, vocab), got {tuple(logits.shape)}; "
            "take the last position first, e.g. logits[:, -1, :]"
        )
    if temperature == 0:
        return torch.argmax(logits, dim=-1)  # (B,)
    scaled = logits.float() / temperature  # (B, V)
    scaled = apply_top_p(apply_top_k(scaled, top_k), top_p)  # (B, V)
    probs = torch.softmax(scaled, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)
