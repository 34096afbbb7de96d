"""Fast BPE training: count pieces once, then keep pair counts up to date.

The textbook trainer (naive.py) recounts every adjacent pair after every
merge. This one does the same arithmetic incrementally:

1. Split the corpus into pieces with the pattern and count each distinct
   piece once (`count_pieces`, streaming, so the corpus never sits in memory).
2. Lay the distinct pieces' bytes end to end in one array, each position
   weighted by how often its piece occurs, with `next`/`prev` links that skip
   positions already merged away.
3. Count every adjacent pair once, and put the counts in a max-heap.
4. For each merge (a, b) -> c, find the places where a is followed by b
   (we index where every token sits, so only a's positions are looked at),
   subtract the counts of the pairs around those places, merge, and add the
   counts of the new pairs. Only pairs that changed are touched, and the
   arithmetic runs in NumPy over all places at once.

Ties between equally frequent pairs go to the smallest (left id, right id),
in both trainers, so training is deterministic and the two agree exactly.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from collections.abc import Iterable

import numpy as np
from tqdm.auto import tqdm

from binarylm.errors import BinaryLMError
from binarylm.tokenizer.core import DEFAULT_SPECIAL_TOKENS, Tokenizer
from binarylm.tokenizer.patterns import compile_pattern, resolve_pattern

log = logging.getLogger(__name__)
NO_LINK = -1


def count_pieces(texts: Iterable[str], pattern: str = "gpt4", progress: bool = False) -> Counter[str]:
    """How often each pre-token occurs in the stream of texts."""
    split = compile_pattern(resolve_pattern(pattern))
    counts: Counter[str] = Counter()
    with tqdm(desc="counting pieces", unit="B", unit_scale=True, disable=not progress, leave=False) as bar:
        for text in texts:
            counts.update(split.findall(text))
            bar.update(len(text))
    return counts


def check_vocab_size(vocab_size: int, special_tokens: Iterable[str]) -> int:
    """Number of merges a vocabulary of `vocab_size` leaves room for, or a clear error."""
    n_special = len(list(special_tokens))
    smallest = 256 + n_special
    if vocab_size < smallest:
        raise BinaryLMError(
            f"vocab size {vocab_size} is too small: the 256 byte tokens and {n_special} special tokens "
            f"already need {smallest}; choose a vocab size of at least {smallest}"
        )
    return vocab_size - smallest


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = "gpt4",
    special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
    progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer of `vocab_size` ids (specials included) on `texts`."""
    special_tokens = list(special_tokens)
    num_merges = check_vocab_size(vocab_size, special_tokens)
    pattern = resolve_pattern(pattern)
    piece_counts = count_pieces(texts, pattern, progress)
    if not piece_counts:
        raise BinaryLMError("the training corpus is empty; give at least one non-empty text file")
    merges = learn_merges(_piece_bytes(piece_counts), num_merges, progress=progress)
    return tokenizer_from_merges(merges, pattern, special_tokens)


def _piece_bytes(piece_counts: Counter[str]) -> dict[bytes, int]:
    """Piece counts keyed by UTF-8 bytes, in a deterministic order."""
    counts: dict[bytes, int] = {}
    for piece, count in sorted(piece_counts.items()):
        key = piece.encode("utf-8", errors="surrogatepass")
        counts[key] = counts.get(key, 0) + count
    return counts


def tokenizer_from_merges(
    merges: list[tuple[int, int]], pattern: str, special_tokens: Iterable[str], name: str = "binarylm"
) -> Tokenizer:
    """Build the tokenizer whose token 256 + i is merge i; specials follow the merges."""
    token_bytes = [bytes([b]) for b in range(256)]
    for left, right in merges:
        token_bytes.append(token_bytes[left] + token_bytes[right])
    ranks: dict[bytes, int] = {}
    for token_id, token in enumerate(token_bytes):
        ranks.setdefault(token, token_id)  # a repeated byte string keeps its first (lowest) id
    if len(ranks) < len(token_bytes):
        # Rare: a later merge rebuilt the bytes of an earlier token. Its id could never be
        # produced by encoding, so it is left out (a gap in the ids) along with its merge.
        log.warning("%d merges rebuilt an existing token; their ids are left unused",
                    len(token_bytes) - len(ranks))
        merges = [pair for i, pair in enumerate(merges) if ranks[token_bytes[256 + i]] == 256 + i]
    first_special = len(token_bytes)
    specials = {token: first_special + i for i, token in enumerate(special_tokens)}
    return Tokenizer(ranks, pattern, specials, merges=merges, name=name)


class _PairCounts:
    """Counts of adjacent token pairs, with a lazy max-heap to find the most frequent."""

    def __init__(self, key_base: int):
        self.key_base = key_base  # a pair (a, b) is stored as the integer a * key_base + b
        self.counts: dict[int, int] = {}
        self.heap: list[tuple[int, int]] = []  # (-count, key): smallest key wins ties

    def add(self, keys: np.ndarray, deltas: np.ndarray) -> None:
        counts, heap = self.counts, self.heap
        for key, delta in zip(keys.tolist(), deltas.tolist()):
            if delta == 0:
                continue
            count = counts.get(key, 0) + delta
            if count > 0:
                counts[key] = count
                heapq.heappush(heap, (-count, key))
            else:
                counts.pop(key, None)

    def pop_best(self) -> tuple[int, int] | None:
        """The most frequent pair, or None when no pair is left."""
        counts, heap = self.counts, self.heap
        while heap:
            negative_count, key = heapq.heappop(heap)
            if counts.get(key) == -negative_count:  # entries left by old counts are skipped
                return divmod(key, self.key_base)
        return None


class _MergeTable:
    """All distinct pieces end to end, with links that skip merged-away positions."""

    def __init__(self, piece_counts: dict[bytes, int]):
        pieces = [p for p in piece_counts if len(p) > 1]  # single bytes have no pairs
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        self.ids = np.frombuffer(b"".join(pieces), dtype=np.uint8).astype(np.int64)  # (N,)
        weights = np.fromiter((piece_counts[p] for p in pieces), dtype=np.int64, count=len(pieces))
        self.weight = np.repeat(weights, lengths)  # (N,) occurrences of the piece at each position
        ends = np.cumsum(lengths) - 1
        n = len(self.ids)
        self.next = np.arange(1, n + 1, dtype=np.int64)
        self.next[ends] = NO_LINK
        self.prev = np.arange(-1, n - 1, dtype=np.int64)
        self.prev[ends - lengths + 1] = NO_LINK
        order = np.argsort(self.ids, kind="stable")
        bounds = np.searchsorted(self.ids[order], np.arange(257))
        self.where = {b: order[bounds[b] : bounds[b + 1]] for b in range(256)}  # token -> positions

    def edge_keys(self, starts: np.ndarray, key_base: int) -> np.ndarray:
        """Pair keys of the edges starting at `starts` (positions that have a next)."""
        return self.ids[starts] * key_base + self.ids[self.next[starts]]

    def all_edges(self) -> np.ndarray:
        return np.flatnonzero(self.next != NO_LINK)

    def find_pair(self, a: int, b: int) -> np.ndarray:
        """Positions of a that start a non-overlapping, left-to-right occurrence of (a, b)."""
        positions = self.where[a]
        positions = positions[self.ids[positions] == a]  # drop stale entries
        self.where[a] = positions
        following = self.next[positions]
        hit = (following != NO_LINK) & (self.ids[following] == b)
        starts = positions[hit]
        if a == b and len(starts) > 1:
            starts = _every_other_in_runs(starts, self.next[starts])
        return starts

    def merge(self, starts: np.ndarray, new_id: int) -> None:
        """Join each position in `starts` with the position after it into token `new_id`."""
        seconds = self.next[starts]
        after = self.next[seconds]
        self.ids[starts] = new_id
        self.ids[seconds] = NO_LINK
        self.next[starts] = after
        linked = after != NO_LINK
        self.prev[after[linked]] = starts[linked]
        self.where[new_id] = starts

    def edges_touching(self, starts: np.ndarray, merged: bool) -> np.ndarray:
        """Start positions of every edge that touches a merge site, each once.

        Before the merge these are the edges into a, a -> b and out of b; after
        it, the edges into and out of the merged token.
        """
        before = self.prev[starts]
        seconds = self.next[starts]
        candidates = [before[before != NO_LINK], starts[seconds != NO_LINK]]
        if not merged:
            candidates.append(seconds[self.next[seconds] != NO_LINK])
        return np.unique(np.concatenate(candidates))


def _every_other_in_runs(starts: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """For a pair (a, a) in "a a a a", keep the 1st and 3rd start, as a left-to-right merge does."""
    continues = np.zeros(len(starts), dtype=bool)
    continues[1:] = seconds[:-1] == starts[1:]  # this start is the previous start's second half
    run_starts = np.flatnonzero(~continues)
    run_of = np.cumsum(~continues) - 1
    index_in_run = np.arange(len(starts)) - run_starts[run_of]
    return starts[index_in_run % 2 == 0]


def _summed_by_key(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys and the total weight of each, in exact integer arithmetic."""
    if len(keys) == 0:
        return keys, weights
    order = np.argsort(keys, kind="stable")
    keys, weights = keys[order], weights[order]
    first = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[first], np.add.reduceat(weights, first)


def learn_merges(piece_counts: dict[bytes, int], num_merges: int, progress: bool = True) -> list[tuple[int, int]]:
    """The `num_merges` most frequent pair merges, in order, for pieces with their counts."""
    table = _MergeTable(piece_counts)
    key_base = 256 + num_merges
    pairs = _PairCounts(key_base)
    edges = table.all_edges()
    pairs.add(*_summed_by_key(table.edge_keys(edges, key_base), table.weight[edges]))
    merges: list[tuple[int, int]] = []
    with tqdm(total=num_merges, desc="BPE merges", unit="merge", disable=not progress, leave=False) as bar:
        while len(merges) < num_merges:
            best = pairs.pop_best()
            if best is None:
                log.warning("the corpus ran out of pairs after %d of %d merges", len(merges), num_merges)
                break
            new_id = 256 + len(merges)
            starts = table.find_pair(*best)
            old_edges = table.edges_touching(starts, merged=False)
            old_keys = table.edge_keys(old_edges, key_base)
            old_weights = table.weight[old_edges]
            table.merge(starts, new_id)
            new_edges = table.edges_touching(starts, merged=True)
            keys = np.concatenate((old_keys, table.edge_keys(new_edges, key_base)))
            weights = np.concatenate((-old_weights, table.weight[new_edges]))
            pairs.add(*_summed_by_key(keys, weights))
            merges.append(best)
            bar.update()
    return merges
