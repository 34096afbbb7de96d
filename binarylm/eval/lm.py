"""Language-modelling metrics: loss, perplexity and bits per byte, with the xz baseline.

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
