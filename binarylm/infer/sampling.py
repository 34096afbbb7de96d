"""Choosing the next token from the model's logits: greedy, temperature, top-k, top-p, min-p, penalties.

    logits (B, V) --/ temperature--> --top-k--> --top-p--> softmax --> one draw per row (B,)

Temperature 0 means greedy: the most likely token, no randomness. Otherwise the
logits are divided by the temperature (below 1 sharpens, above 1 flattens), then
top-k keeps the k largest and top-p keeps the smallest set of tokens whose
probability reaches p. A removed token gets a logit of -inf, so probability 0.

`sample_next` does this for a batch that shares one setting. The engine's
requests each carry their own `SamplingParams`; `process_logits` (penalties and
logit bias) and `sample_rows` (per-row temperature, truncation and a draw from a
per-request generator) apply them to a whole batch at once.

This is the one place sampling is written; generation, the engine and the
server all call it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

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

    The engine's draw (`sample_rows`) with one setting for every row, so a seeded
    `generate` and a seeded engine request with the same settings pick the same
    tokens. `generator` (on the logits' device) makes the draws reproducible;
    None uses PyTorch's global random state.
    """
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise BinaryLMError(
            f"sample_next expects logits of shape (batch, vocab), got {tuple(logits.shape)}; "
            "take the last position first, e.g. logits[:, -1, :]"
        )
    rows = logits.shape[0]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    return sample_rows(logits.float(), [params] * rows, [generator] * rows)  # (B,)


# ------------------------------------------------------------------ per-request settings, in batches


@dataclass
class SamplingParams:
    """Everything one request says about how to pick its tokens (the OpenAI / vLLM settings).

    Applied in this order to the raw logits of each step:
      1. repetition_penalty r (CTRL): a token already in the prompt or the output has its logit
         divided by r if positive, multiplied by r if negative; 1 is off;
      2. frequency_penalty f and presence_penalty p (OpenAI): logit -= f * count + p * (count > 0),
         count = times the token was generated so far; 0 is off;
      3. logit_bias: a fixed amount added to listed token ids (-100 bans, +100 forces);
      4. temperature (0: greedy, take the argmax here), then top_k, top_p and min_p
         (keep tokens whose probability is at least min_p times the top one's), then one draw.
    Log-probabilities reported for tokens are those of the raw model distribution (before 1-4).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)  # stop strings: the text ends before the first one
    stop_token_ids: list[int] = field(default_factory=list)  # stop after generating one of these
    ignore_eos: bool = False  # keep going past the end-of-text token
    seed: int | None = None  # per request: the same seed gives the same tokens whatever else runs
    n: int = 1  # samples of the same prompt, sharing one prefill
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives
    prompt_logprobs: bool = False  # report the prompt tokens' log-probabilities too (echo / scoring)

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        _check_range("max_tokens", self.max_tokens, 0, None, "e.g. 16")
        _check_range("n", self.n, 1, None, "e.g. 1")
        _check_range("min_p", self.min_p, 0.0, 1.0, "0 turns it off")
        _check_range("repetition_penalty", self.repetition_penalty, 1e-6, None, "1 turns it off")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0, "0 turns it off")
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "0 turns it off")
        if self.logprobs is not None:
            _check_range("logprobs", self.logprobs, 0, 20, "the number of alternatives to report")
        if any(not math.isfinite(bias) or abs(bias) > 100 for bias in self.logit_bias.values()):
            raise BinaryLMError(f"logit_bias values must be numbers between -100 and 100, got {self.logit_bias!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise BinaryLMError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if vocab_size is not None:
            ids = [*self.logit_bias, *self.stop_token_ids]
            bad = next((i for i in ids if not 0 <= int(i) < vocab_size), None)
            if bad is not None:
                raise BinaryLMError(f"token id {bad} (in logit_bias or stop_token_ids) is outside the "
                                    f"vocabulary of {vocab_size}")
        return self

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 count as 0: dividing logits by them would overflow to inf."""
        return self.temperature < 1e-5

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _check_range(name: str, value, low, high, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BinaryLMError(f"{name} must be a number {bounds}, got {value!r}; {hint}")


def process_logits(logits: torch.Tensor, params: list[SamplingParams], output_counts: torch.Tensor | None,
                   seen: torch.Tensor | None) -> torch.Tensor:
    """Steps 1-3 of SamplingParams for a batch: logits (B, V) float32, one params per row.

    output_counts (B, V): times each token was generated by that row; seen (B, V) bool: tokens in the
    row's prompt or output. Either may be None when no row uses penalties.
    """
    if output_counts is not None and any(p.penalised for p in params):
        logits = _penalise(logits, params, output_counts, seen)
    biased = [(row, p.logit_bias) for row, p in enumerate(params) if p.logit_bias]
    if biased:
        logits = logits.clone()
        for row, bias in biased:
            ids = torch.tensor([int(i) for i in bias], device=logits.device)
            logits[row, ids] += torch.tensor(list(bias.values()), device=logits.device, dtype=logits.dtype)
    return logits


def _penalise(logits: torch.Tensor, params: list[SamplingParams], counts: torch.Tensor,
              seen: torch.Tensor) -> torch.Tensor:
    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in params], device=logits.device)[:, None]  # (B, 1)

    repetition = column("repetition_penalty")
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)  # (B, V)
    logits = torch.where(seen, penalised, logits)
    counts = counts.to(logits.dtype)
    return logits - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Step 4 for a batch: one token per row of processed logits (B, V), each row with its own settings.

    Each sampled row draws one uniform number from its own generator and inverts its cumulative
    distribution, so a seeded request gets the same tokens whatever else is in the batch.
    """
    tokens = torch.argmax(logits, dim=-1)  # (B,) the greedy choice, kept for greedy rows
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    chosen = [params[row] for row in sampled]
    scaled = logits[rows] / torch.tensor([p.temperature for p in chosen], device=logits.device)[:, None]
    probs = torch.softmax(_truncate(scaled, chosen), dim=-1)  # (S, V)
    uniforms = torch.cat([torch.rand(1, generator=generators[row], device=logits.device) for row in sampled])
    cdf = torch.cumsum(probs, dim=-1)  # (S, V)
    # side="right": the first token whose cumulative mass exceeds u, so a removed (zero) token never wins
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], side="right").squeeze(-1)  # (S,)
    tokens[rows] = picks.clamp(max=logits.shape[-1] - 1)
    return tokens


def _truncate(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """top-k, top-p and min-p for each row with its own values (rows that use none pass untouched)."""
    if all(p.top_k == 0 and p.top_p >= 1 and p.min_p == 0 for p in params):
        return scaled
    device = scaled.device
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # (S, V)
    probs = torch.softmax(sorted_logits, dim=-1)  # (S, V), sorted
    rank = torch.arange(scaled.shape[-1], device=device)[None, :]  # (1, V)
    top_k = torch.tensor([p.top_k or scaled.shape[-1] for p in params], device=device)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
    removed = (rank >= top_k) | (torch.cumsum(probs, dim=-1) - probs >= top_p) | (probs < min_p * probs[:, :1])
    removed[:, 0] = False  # the most likely token always stays
    return scaled.masked_fill(torch.empty_like(removed).scatter_(-1, order, removed), float("-inf"))
