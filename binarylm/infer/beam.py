"""Beam search: keep the `beam_width` most probable continuations at every step, not just one.

Greedy decoding commits to the single likeliest token each step and can miss a
sequence whose first token was second best but whose whole is likelier. Beam
search keeps W hypotheses ("beams"), each scored by the sum of its tokens'
log-probabilities. Each step it extends every beam by every token, keeps the W
best of those W x V candidates, and moves the KV cache rows to follow the beams
that survived (`KVCache.reorder`).

A hypothesis that produces the end-of-sequence id is set aside as finished; the
search stops once W are finished or the token budget is spent. Hypotheses are
compared by score / length ** length_penalty: 0 compares raw sums (which
favour short answers), 1 compares the mean log-probability per token.

With beam_width 1 this is greedy decoding, token for token (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from binarylm.errors import BinaryLMError


@dataclass
class Hypothesis:
    token_ids: list[int]  # the new tokens (with the end id, if it finished on one)
    log_prob: float  # sum of the tokens' log-probabilities
    score: float  # log_prob / length ** length_penalty: what the beams are ranked by
    finished: bool  # ended with the end id, rather than at the token budget


@torch.inference_mode()
def beam_search(model: nn.Module, prompt_ids: list[int], beam_width: int = 4, max_new_tokens: int = 32,
                length_penalty: float = 1.0, eos_id: int | None = None) -> list[Hypothesis]:
    """The best `beam_width` continuations of `prompt_ids`, best first."""
    if beam_width < 1 or max_new_tokens < 1:
        raise BinaryLMError(f"beam_width and max_new_tokens must be at least 1, got {beam_width} and "
                            f"{max_new_tokens}")
    if not prompt_ids or len(prompt_ids) + max_new_tokens > model.config.context_length:
        raise BinaryLMError(f"the prompt ({len(prompt_ids)} tokens) must be non-empty and leave room for "
                            f"{max_new_tokens} new tokens in the context of {model.config.context_length}")
    model.eval()
    device = next(model.parameters()).device
    cache = model.new_cache(1, max_length=len(prompt_ids) + max_new_tokens)
    logits, _ = model(torch.tensor([prompt_ids], device=device), cache=cache, last_only=True)  # (1, 1, V)
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1, device=device)  # (W,) summed log-probabilities of the live beams
    finished: list[Hypothesis] = []
    for step in range(max_new_tokens):
        candidates = scores[:, None] + torch.log_softmax(logits[:, -1].float(), dim=-1)  # (W, V)
        kept = _extend(candidates, beams, beam_width, eos_id, length_penalty, finished)
        if len(finished) >= beam_width or step == max_new_tokens - 1 or not kept:
            break
        rows = torch.tensor([row for row, _, _ in kept], device=device)
        cache.reorder(rows)
        beams = [beams[row] + [token] for row, token, _ in kept]
        scores = torch.tensor([score for _, _, score in kept], device=device)
        logits, _ = model(torch.tensor([[token] for _, token, _ in kept], device=device), cache=cache)
    live = [_hypothesis(beams[row] + [token], score, length_penalty, False) for row, token, score in kept]
    return sorted(finished + live, key=lambda h: h.score, reverse=True)[:beam_width]


def _extend(candidates: torch.Tensor, beams: list[list[int]], width: int, eos_id: int | None,
            length_penalty: float, finished: list[Hypothesis]) -> list[tuple[int, int, float]]:
    """The best `width` (beam row, token, score) extensions that do not end; ending ones go to `finished`."""
    vocab = candidates.shape[-1]
    values, flat = candidates.flatten().topk(min(2 * width, candidates.numel()))
    kept = []
    for score, index in zip(values.tolist(), flat.tolist()):
        row, token = divmod(index, vocab)
        if token == eos_id:
            finished.append(_hypothesis(beams[row] + [token], score, length_penalty, True))
        else:
            kept.append((row, token, score))
        if len(kept) == width:
            break
    return kept


def _hypothesis(tokens: list[int], log_prob: float, length_penalty: float, finished: bool) -> Hypothesis:
    return Hypothesis(tokens, log_prob, log_prob / len(tokens) ** length_penalty, finished)
