"""Language-modelling metrics: loss, perplexity and bits per byte, with the xz baseline.

Two ways in: `bits_per_byte` over batches of token windows (a run's held-out token shards),
and `text_metrics` over any text, read with a sliding window (eval/scoring.py) so that every
token after the first window keeps most of a context's worth of history.

Loss per token depends on the tokenizer (a bigger vocabulary packs more text
into each token), so models with different tokenizers cannot be compared by
it. Bits per byte can: the total information the model needs to encode the
text, sum(-log2 p(token)), divided by the text's length in UTF-8 bytes. A
general-purpose compressor gives the same kind of figure, which makes `xz -9e`
a fair baseline: a model that cannot beat it has not learned much.
"""

from __future__ import annotations

import lzma
import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from binarylm.errors import BinaryLMError
from binarylm.eval.scoring import rolling_logprobs
from binarylm.tokenizer import Tokenizer


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, tokenizer: Tokenizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device, keep_text: bool = False) -> dict:
    """Bits per UTF-8 byte of the target text in `batches` (and, with keep_text, that text as bytes).

    Special tokens (document separators) count their cost but no bytes, which
    errs on the side of the baseline.
    """
    byte_lengths = _byte_lengths(tokenizer)  # (V,)
    was_training = model.training
    model.eval()
    nats, n_bytes, n_tokens = 0.0, 0, 0
    targets_seen: list[np.ndarray] = []
    for x, y in batches:
        logits, _ = model(x.to(device))  # (B, T, V)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        nats += losses.item()
        flat = y.flatten().numpy()
        n_bytes += int(byte_lengths[flat].sum())
        n_tokens += flat.size
        if keep_text:
            targets_seen.append(flat)
    model.train(was_training)
    result = {
        "bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
        "loss": nats / max(n_tokens, 1),
        "tokens": n_tokens,
        "bytes": n_bytes,
    }
    if keep_text:
        result["text"] = _ordinary_bytes(tokenizer, targets_seen)
    return result


def text_metrics(model: torch.nn.Module, tokenizer: Tokenizer, text: str, stride: int | None = None) -> dict:
    """Loss, perplexity and bits per byte of `text` (sliding windows of the model's context, `stride` apart),
    beside what xz -9e needs for the same bytes. The text is read as one document after an end-of-text token."""
    ids = tokenizer.encode_ordinary(text)
    if len(ids) < 2:
        raise BinaryLMError("the text to evaluate is empty or a single token; give a file with some text in it")
    if tokenizer.eot_id is None:  # nothing to start from: the first token is context, and its bytes do not count
        prefix, scored = ids[0], ids[1:]
    else:
        prefix, scored = tokenizer.eot_id, ids
    n_bytes = len(tokenizer.decode_bytes(scored))
    logprobs = rolling_logprobs(model, scored, prefix, stride)  # (N,)
    nats = -logprobs.double().sum().item()
    loss = nats / len(logprobs)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": nats / math.log(2) / n_bytes,
        "xz_bits_per_byte": xz_bits_per_byte(text.encode("utf-8")),
        "tokens": len(scored),
        "bytes": n_bytes,
    }


def _byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for token, token_id in tokenizer.ranks.items():
        lengths[token_id] = len(token)
    return lengths


def _ordinary_bytes(tokenizer: Tokenizer, targets: list[np.ndarray]) -> bytes:
    specials = set(tokenizer.special_tokens.values())
    ids = [int(i) for i in np.concatenate(targets) if int(i) not in specials]
    return tokenizer.decode_bytes(ids)


def xz_bits_per_byte(data: bytes) -> float:
    """What `xz -9e` needs per byte of `data` (the same LZMA2 settings, through Python's lzma)."""
    compressed = lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    return 8 * len(compressed) / max(len(data), 1)
