"""The textbook BPE trainer and encoder, kept as teaching code.

This is the algorithm exactly as it is usually explained, with nothing
cached: to train, count every adjacent pair in the corpus, merge the most
frequent pair everywhere, and repeat; to encode, keep applying the
earliest-learned merge present in the piece. It is slow (each merge rereads
the whole corpus) but it is the definition the fast trainer in train.py and
the fast encoder in core.py are tested against.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from binarylm.tokenizer.patterns import compile_pattern, resolve_pattern


def pair_counts(words: list[tuple[list[int], int]]) -> Counter[tuple[int, int]]:
    """How often each adjacent pair occurs, weighting each word by its count."""
    counts: Counter[tuple[int, int]] = Counter()
    for ids, count in words:
        for pair in zip(ids, ids[1:]):
            counts[pair] += count
    return counts


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_naive(texts: Iterable[str], num_merges: int, pattern: str = "gpt4") -> list[tuple[int, int]]:
    """Learn `num_merges` merges; token 256 + i is the result of merge i."""
    split = compile_pattern(resolve_pattern(pattern))
    pieces = Counter(piece for text in texts for piece in split.findall(text))
    words = [(list(piece.encode("utf-8")), count) for piece, count in pieces.items()]
    merges = []
    for new_id in range(256, 256 + num_merges):
        counts = pair_counts(words)
        if not counts:
            break
        # The most frequent pair; among equals, the smallest (left, right).
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        words = [(merge(ids, best, new_id), count) for ids, count in words]
        merges.append(best)
    return merges


def encode_naive(text: str, merges: list[tuple[int, int]], pattern: str = "gpt4") -> list[int]:
    """Encode by applying the earliest-learned merge found in each piece until none applies."""
    rank = {pair: 256 + i for i, pair in enumerate(merges)}
    ids: list[int] = []
    for piece in compile_pattern(resolve_pattern(pattern)).findall(text):
        piece_ids = list(piece.encode("utf-8"))
        while len(piece_ids) > 1:
            pair = min(zip(piece_ids, piece_ids[1:]), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            piece_ids = merge(piece_ids, pair, rank[pair])
        ids += piece_ids
    return ids
