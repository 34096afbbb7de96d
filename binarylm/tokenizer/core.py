"""The byte-level BPE tokenizer: encoding, decoding and special tokens.

A tokenizer is three things:

* `ranks`: every mergeable token as raw bytes, mapped to its id. Ids double as
  merge priorities (a lower id was learned earlier), exactly as in tiktoken.
  All 256 single bytes are tokens, so any string can be encoded.
* `pattern`: the split regex that cuts text into pieces (see patterns.py).
* `special_tokens`: strings such as "<|endoftext|>" that map straight to an id
  and are never produced by merging.

Encoding a piece starts from its UTF-8 bytes, one token per byte, and then
repeatedly joins the adjacent pair whose concatenation has the lowest rank,
until no adjacent pair is a token. Pieces repeat a lot in real text, so each
piece's ids are cached: most of the work is the regex split and dict lookups.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Collection, Iterable, Sequence
from typing import Literal

import regex

from binarylm.errors import BinaryLMError
from binarylm.tokenizer.patterns import compile_pattern, is_builtin, resolve_pattern

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"  # opens a chat turn: "<|im_start|>user\n...<|im_end|>\n"
IM_END = "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, PAD, IM_START, IM_END)

CACHE_LIMIT = 1 << 20  # pieces kept in the encoding cache before it is reset
NO_RANK = 1 << 62  # larger than any id: "this pair is not a token"
BATCH_SERIAL_BELOW = 1 << 20  # characters; smaller batches are not worth new processes

SpecialSet = Literal["all"] | Collection[str]


class Tokenizer:
    """Byte-level BPE with tiktoken's encoding rules and special-token semantics."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        pattern: str = "gpt4",
        special_tokens: dict[str, int] | None = None,
        merges: Sequence[tuple[int, int]] | None = None,
        name: str = "binarylm",
    ):
        self.name = name
        self.pattern = resolve_pattern(pattern)
        self.ranks = dict(ranks)
        self.special_tokens = dict(special_tokens or {})
        self._check_vocab()
        self.token_bytes: dict[int, bytes] = {i: b for b, i in self.ranks.items()}
        self.token_bytes.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self._merges = [tuple(pair) for pair in merges] if merges is not None else None
        self._split = compile_pattern(self.pattern)
        self._checks_coverage = not is_builtin(self.pattern)
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ sizes

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the size an embedding table needs."""
        return 1 + max(self.token_bytes)

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(ENDOFTEXT)

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The merge that builds each multi-byte token, in rank order.

        A trained tokenizer remembers the merges it learned; one loaded from
        ranks alone (a tiktoken file) gets them derived: for each token, the
        first split into two lower-ranked tokens.
        """
        if self._merges is None:
            self._merges = [pair for pairs in self.splits_by_token(first_only=True) for pair in pairs]
        return self._merges

    def splits_by_token(self, first_only: bool) -> Iterable[list[tuple[int, int]]]:
        """For each multi-byte token in rank order, its splits into two lower-ranked tokens."""
        for token, rank in sorted(self.ranks.items(), key=lambda item: item[1]):
            if len(token) < 2:
                continue
            splits = []
            for cut in range(1, len(token)):
                left, right = self.ranks.get(token[:cut]), self.ranks.get(token[cut:])
                if left is not None and right is not None and left < rank and right < rank:
                    splits.append((left, right))
                    if first_only:
                        break
            if not splits:
                raise BinaryLMError(
                    f"token {token!r} (id {rank}) cannot be built from two lower-ranked tokens, "
                    "so this vocabulary is not a BPE vocabulary; check the rank file"
                )
            yield splits

    def _check_vocab(self) -> None:
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise BinaryLMError(
                f"the vocabulary lacks {len(missing)} of the 256 single bytes (first: {missing[0]}), "
                "so some text could not be encoded; a byte-level BPE vocabulary must contain all of them"
            )
        if len(set(self.ranks.values())) != len(self.ranks):
            raise BinaryLMError("two mergeable tokens share an id; every token needs its own id")
        clash = set(self.ranks.values()) & set(self.special_tokens.values())
        if clash:
            raise BinaryLMError(
                f"special tokens reuse ids of ordinary tokens ({sorted(clash)[:5]}); "
                "give special tokens ids above the mergeable ones"
            )

    # --------------------------------------------------------------- encoding

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token strings as plain text."""
        try:
            return self._encode_plain(text)
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8 encoded: replace them as tiktoken does.
            return self._encode_plain(_without_surrogates(text))

    def encode(
        self,
        text: str,
        *,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = "all",
    ) -> list[int]:
        """Encode text with tiktoken's rules for special tokens.

        Special-token strings in `allowed_special` become their ids. Those in
        `disallowed_special` (by default every special token that is not
        allowed) make encoding fail, because text from users should not be able
        to forge a control token. Pass `disallowed_special=()` to encode them
        as plain text instead.
        """
        allowed = self._special_set(allowed_special)
        disallowed = (
            set(self.special_tokens) - allowed
            if disallowed_special == "all"
            else self._special_set(disallowed_special)
        )
        if disallowed:
            found = _alternation(disallowed).search(text)
            if found:
                raise BinaryLMError(
                    f"the text contains the special token {found.group()!r} at character {found.start()}; "
                    f"pass allowed_special={{{found.group()!r}}} (or 'all') to encode it as a special token, "
                    "or disallowed_special=() to encode it as plain text"
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in _alternation(allowed).finditer(text):
            ids += self.encode_ordinary(text[start : match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def encode_batch(self, texts: Sequence[str], workers: int | None = None, **encode_args) -> list[list[int]]:
        """Encode many texts, in parallel over `workers` processes (default: all cores)."""
        workers = workers or os.cpu_count() or 1
        if workers == 1 or len(texts) < 2 or sum(map(len, texts)) < BATCH_SERIAL_BELOW:
            return [self.encode(text, **encode_args) for text in texts]
        chunksize = max(1, len(texts) // (workers * 4))
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with context.Pool(workers, initializer=_set_worker_tokenizer, initargs=(self, encode_args)) as pool:
            return pool.map(_worker_encode, texts, chunksize=chunksize)

    def clear_cache(self) -> None:
        """Forget the cached ids of every piece seen so far."""
        self._cache.clear()

    def _encode_plain(self, text: str) -> list[int]:
        pieces = self._split.findall(text)
        if self._checks_coverage and sum(map(len, pieces)) != len(text):
            raise BinaryLMError(
                "the split pattern skips some characters of this text, which would silently drop them; "
                "add an alternative that matches everything else, such as '|\\s+|.' at the end"
            )
        cache = self._cache
        if len(cache) > CACHE_LIMIT:
            cache.clear()
        ids: list[int] = []
        for piece in pieces:
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = cache[piece] = self._encode_piece(piece.encode("utf-8"))
            ids += piece_ids
        return ids

    def _encode_piece(self, piece: bytes) -> list[int]:
        """Byte-pair merge one piece: join the lowest-ranked adjacent pair until none is a token."""
        ranks = self.ranks
        whole = ranks.get(piece)
        if whole is not None:
            return [whole]
        parts = [piece[i : i + 1] for i in range(len(piece))]
        pair_ranks = [ranks.get(parts[i] + parts[i + 1], NO_RANK) for i in range(len(parts) - 1)]
        while pair_ranks:
            best = min(pair_ranks)
            if best == NO_RANK:
                break
            i = pair_ranks.index(best)  # the leftmost of equal ranks, as tiktoken
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], NO_RANK)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], NO_RANK)
        return [ranks[part] for part in parts]

    def _special_set(self, names: SpecialSet) -> set[str]:
        if names == "all":
            return set(self.special_tokens)
        unknown = set(names) - set(self.special_tokens)
        if unknown:
            raise BinaryLMError(
                f"{sorted(unknown)} are not special tokens of this tokenizer; "
                f"its special tokens are {sorted(self.special_tokens)}"
            )
        return set(names)

    # --------------------------------------------------------------- decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self.token_bytes[i] for i in ids)
        except KeyError as exc:
            raise BinaryLMError(
                f"token id {exc.args[0]} is not in this tokenizer's vocabulary (ids run up to {self.vocab_size - 1})"
            ) from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Ids back to text. A token may end inside a UTF-8 character, so bytes join first."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def id_to_token(self, token_id: int) -> str:
        """A readable form of one token, for display."""
        return self.decode_bytes([token_id]).decode("utf-8", errors="backslashreplace")

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"special_tokens={len(self.special_tokens)})"
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_split"] = None
        state["_cache"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._split = compile_pattern(self.pattern)


def _alternation(strings: Iterable[str]):
    return _compiled_alternation(frozenset(strings))


@functools.lru_cache(maxsize=64)
def _compiled_alternation(strings: frozenset[str]):
    """A regex that finds any of `strings`, longest first so prefixes never win."""
    ordered = sorted(strings, key=lambda s: (-len(s), s))
    return regex.compile("|".join(map(regex.escape, ordered))) if ordered else regex.compile(r"(?!)")


def _without_surrogates(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


_WORKER: tuple[Tokenizer, dict] | None = None


def _set_worker_tokenizer(tokenizer: Tokenizer, encode_args: dict) -> None:
    global _WORKER
    _WORKER = (tokenizer, encode_args)


def _worker_encode(text: str) -> list[int]:
    tokenizer, encode_args = _WORKER
    return tokenizer.encode(text, **encode_args)
