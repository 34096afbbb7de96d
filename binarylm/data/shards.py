"""Token shards: a corpus encoded once, kept on disk as flat arrays of ids.

Preparing a split writes, into one directory:

    {split}-00000.bin   a 32-byte header, then the token ids
    {split}-00001.bin   ... a new file every `shard_tokens` ids
    {split}.json        what the shards hold: counts, vocab size, file names

The header is little-endian:

    bytes  0-7    magic b"BLMTOKS1"
    bytes  8-11   uint32 header version (1)
    bytes 12-15   uint32 bytes per token (2 when vocab_size <= 65536, else 4)
    bytes 16-23   uint64 number of tokens in this file
    bytes 24-31   uint64 vocab size

Every document's ids are followed by the tokenizer's end-of-text id (when it
has one), so the model sees where one document stops and the next begins.
Files appear under their final names only once complete, and `{split}.json`
is written last, so an interrupted prepare never looks like a finished one.

Training reads the shards by memory map: `TokenShards` joins the files into
one token stream and `WindowLoader` cuts that stream into (input, target)
windows, shuffled per epoch from a seed, split across processes, and
resumable from a checkpoint to the exact batch.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from binarylm.errors import BinaryLMError
from binarylm.files import write_json_atomically
from binarylm.tokenizer.core import Tokenizer

MAGIC = b"BLMTOKS1"
HEADER_VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per token, number of tokens, vocab size
HEADER_SIZE = 32
ENCODE_GROUP_CHARS = 1 << 23  # documents are encoded in groups of about this many characters
STATE_KEYS = ("epoch", "cursor", "seed", "num_windows")

assert HEADER.size == HEADER_SIZE


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ---------------------------------------------------------------- writing


def prepare_shards(
    tokenizer: Tokenizer,
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    split: str,
    progress: bool = True,
    shard_tokens: int = 50_000_000,
) -> dict:
    """Encode every text (one document each) into `{split}-NNNNN.bin` shards; return the meta.

    Empty texts are skipped. Documents are encoded in groups, in parallel over
    all cores when a group is large (`Tokenizer.encode_batch`). Special-token
    strings inside the text are encoded as plain text.
    """
    _check_split_name(split)
    if shard_tokens <= 0:
        raise BinaryLMError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / f"{split}.json"
    meta_path.unlink(missing_ok=True)  # the old meta must not vouch for half-rewritten shards

    dtype = token_dtype(tokenizer.vocab_size)
    writer = _ShardWriter(out_dir, split, tokenizer.vocab_size, shard_tokens)
    counts = {"num_tokens": 0, "num_bytes": 0, "num_documents": 0}
    bar = tqdm(unit="tok", unit_scale=True, desc=f"tokenizing {split}", disable=not progress)
    try:
        for group in _document_groups(texts):
            ids = _encode_group(tokenizer, group, dtype)  # (tokens in the group,)
            writer.write(ids)
            counts["num_tokens"] += len(ids)
            counts["num_bytes"] += sum(len(text.encode("utf-8", "surrogatepass")) for text in group)
            counts["num_documents"] += len(group)
            bar.update(len(ids))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()

    if counts["num_tokens"] == 0:
        raise BinaryLMError(
            f"the {split!r} split has no text to tokenize (every input was empty, or no file fell in this split); "
            "check the input paths, or for a one-file corpus hold out part of it for validation yourself"
        )
    meta = {
        "split": split,
        **counts,
        "shards": writer.names,
        "vocab_size": tokenizer.vocab_size,
        "bytes_per_token": dtype.itemsize,
        "eot_id": tokenizer.eot_id,
        "tokenizer": tokenizer.name,
        "header_version": HEADER_VERSION,
    }
    write_json_atomically(meta_path, meta)
    _remove_stale_shards(out_dir, split, keep=writer.names)
    return meta


def _check_split_name(split: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.]+", split or ""):
        raise BinaryLMError(
            f"split name {split!r} cannot name a shard file; use letters, digits, '_' or '.' (e.g. 'train', 'val')"
        )


def _document_groups(texts: Iterable[str]) -> Iterator[list[str]]:
    """The non-empty texts, in order, gathered into lists of about ENCODE_GROUP_CHARS characters."""
    group: list[str] = []
    chars = 0
    for text in texts:
        if not text:
            continue
        group.append(text)
        chars += len(text)
        if chars >= ENCODE_GROUP_CHARS:
            yield group
            group, chars = [], 0
    if group:
        yield group


def _encode_group(tokenizer: Tokenizer, group: list[str], dtype: np.dtype) -> np.ndarray:
    """The ids of every document in `group`, each followed by end-of-text. Shape (tokens,)."""
    eot = tokenizer.eot_id
    flat: list[int] = []
    for ids in tokenizer.encode_batch(group, disallowed_special=()):  # no specials allowed = encode_ordinary
        flat += ids
        if eot is not None:
            flat.append(eot)
    return np.array(flat, dtype=dtype)


class _ShardWriter:
    """Streams ids into `{split}-NNNNN.bin`, starting a new file every `shard_tokens` ids.

    Each file is written under a temporary name and renamed once its header
    holds the final count, so a shard under its real name is always complete.
    """

    def __init__(self, out_dir: Path, split: str, vocab_size: int, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.vocab_size, self.shard_tokens = vocab_size, shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.names: list[str] = []  # finished shards, in order
        self._handle = None
        self._temp: Path | None = None
        self._count = 0  # ids in the open file

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._handle is None:
                self._open_next()
            room = self.shard_tokens - self._count
            head, ids = ids[:room], ids[room:]
            self._handle.write(head.astype(self.dtype, copy=False).tobytes())
            self._count += len(head)
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> None:
        if self._handle is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the unfinished file; finished ones stay but no meta points at them."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._temp.unlink(missing_ok=True)

    def _open_next(self) -> None:
        name = f"{self.split}-{len(self.names):05d}.bin"
        self._temp = self.out_dir / f".{name}.tmp"
        self._handle = open(self._temp, "wb")
        self._handle.write(self._header(0))
        self._count = 0

    def _finish(self) -> None:
        name = f"{self.split}-{len(self.names):05d}.bin"
        self._handle.seek(0)
        self._handle.write(self._header(self._count))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        os.replace(self._temp, self.out_dir / name)
        self.names.append(name)

    def _header(self, num_tokens: int) -> bytes:
        return HEADER.pack(MAGIC, HEADER_VERSION, self.dtype.itemsize, num_tokens, self.vocab_size)


def _remove_stale_shards(out_dir: Path, split: str, keep: list[str]) -> None:
    """Delete shards of this split left by an earlier, longer prepare."""
    pattern = re.compile(rf"{re.escape(split)}-\d{{5,}}\.bin")
    for path in out_dir.iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep:
            path.unlink()


# ---------------------------------------------------------------- reading


class TokenShards:
    """The shards of one split as one read-only token stream (memory-mapped, never loaded whole)."""

    def __init__(self, arrays: list[np.ndarray], meta: dict):
        self.meta = meta
        self._arrays = arrays  # one (tokens in shard,) uint16/uint32 memmap per shard
        self._starts = np.cumsum([0] + [len(a) for a in arrays])  # (num_shards + 1,) stream offsets

    @classmethod
    def open(cls, out_dir: str | os.PathLike, split: str) -> TokenShards:
        out_dir = Path(out_dir)
        meta = _read_meta(out_dir, split)
        arrays = [_map_shard(out_dir / name, meta) for name in meta["shards"]]
        total = sum(len(a) for a in arrays)
        if total != meta["num_tokens"]:
            raise _corrupt(out_dir / f"{split}.json", f"the shards hold {total} tokens but the meta says "
                                                       f"{meta['num_tokens']}")
        return cls(arrays, meta)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int64, read across shard boundaries. Shape (stop - start,)."""
        if not 0 <= start <= stop <= len(self):
            raise BinaryLMError(f"token range [{start}, {stop}) is outside the {len(self)} prepared tokens")
        out = np.empty(stop - start, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            shard_start, shard_stop = int(self._starts[shard]), int(self._starts[shard + 1])
            take = min(stop, shard_stop) - pos
            out[pos - start : pos - start + take] = self._arrays[shard][pos - shard_start : pos - shard_start + take]
            pos += take
            shard += 1
        return out


def _read_meta(out_dir: Path, split: str) -> dict:
    path = out_dir / f"{split}.json"
    if not path.is_file():
        raise BinaryLMError(
            f"no prepared {split!r} tokens in {out_dir} ({path.name} is missing); "
            "run the data prepare step (prepare_shards) for this directory first"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"not valid JSON ({exc})") from None
    needed = ("num_tokens", "shards", "vocab_size", "bytes_per_token")
    if not isinstance(meta, dict) or any(key not in meta for key in needed):
        raise _corrupt(path, f"the meta lacks one of {', '.join(needed)}")
    return meta


def _map_shard(path: Path, meta: dict) -> np.ndarray:
    """Check one shard's header against the meta and memory-map its ids. Shape (tokens,)."""
    if not path.is_file():
        raise BinaryLMError(
            f"shard {path} is missing; run the data prepare step (prepare_shards) for {path.parent} again"
        )
    size = path.stat().st_size
    if size < HEADER_SIZE:
        raise _corrupt(path, f"{size} bytes is shorter than the {HEADER_SIZE}-byte header")
    with open(path, "rb") as handle:
        magic, version, token_bytes, num_tokens, vocab_size = HEADER.unpack(handle.read(HEADER_SIZE))
    if magic != MAGIC:
        raise _corrupt(path, f"magic {magic!r} is not {MAGIC!r}")
    if version != HEADER_VERSION:
        raise _corrupt(path, f"header version {version}, this code reads version {HEADER_VERSION}")
    if token_bytes != meta["bytes_per_token"] or vocab_size != meta["vocab_size"]:
        raise _corrupt(path, f"{token_bytes} bytes per token and vocab {vocab_size} disagree with the meta "
                             f"({meta['bytes_per_token']}, {meta['vocab_size']})")
    if size != HEADER_SIZE + num_tokens * token_bytes:
        raise _corrupt(path, f"{size} bytes, but the header promises {num_tokens} tokens of {token_bytes} bytes")
    dtype = np.dtype("<u2") if token_bytes == 2 else np.dtype("<u4")
    if num_tokens == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(num_tokens,))


def _corrupt(path: Path, reason: str) -> BinaryLMError:
    return BinaryLMError(f"corrupt shard {path}: {reason}; delete the directory {path.parent} and prepare again")


# ---------------------------------------------------------------- windows


class WindowLoader:
    """Shuffled (input, target) windows over a token stream, split across `world_size` processes.

    Window w starts at token w * stride and gives x = tokens[s : s+T] and
    y = tokens[s+1 : s+T+1]. Each epoch visits the windows in the order
    `default_rng([seed, epoch]).permutation(num_windows)`. A global batch is the
    next world_size * batch_size windows of that order; rank r takes the r-th
    block of batch_size. So 2 processes with batch b see exactly the windows of
    1 process with batch 2b. The windows left over at the end of an epoch
    (fewer than one global batch) are skipped.

    Too few windows for one global batch is an error at `next_batch`, not at
    construction, so a loader made only for `eval_batches` works on a small
    validation split.
    """

    def __init__(self, shards: TokenShards, context_length: int, batch_size: int, stride: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        _check_positive(context_length=context_length, batch_size=batch_size, world_size=world_size)
        if stride < 0:
            raise BinaryLMError(f"stride must be 0 (meaning context_length) or positive, got {stride}")
        if not 0 <= rank < world_size:
            raise BinaryLMError(f"rank {rank} is outside 0..{world_size - 1} for world_size {world_size}")
        if seed < 0:
            raise BinaryLMError(f"the data seed must be non-negative, got {seed}")
        self.shards = shards
        self.context_length, self.batch_size = context_length, batch_size
        self.stride = stride or context_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order: np.ndarray | None = None  # (num_windows,) window indices of self.epoch

    @property
    def num_windows(self) -> int:
        span = self.context_length + 1
        return max(0, (len(self.shards) - span) // self.stride + 1)

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one global batch (all processes together)."""
        return self.world_size * self.batch_size * self.context_length

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's next (x, y), each int64 of shape (batch_size, context_length)."""
        self._check_enough_windows()
        global_batch = self.world_size * self.batch_size
        if self.num_windows - self.cursor < global_batch:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = None
        block = self.cursor + self.rank * self.batch_size
        windows = self._epoch_order()[block : block + self.batch_size]  # (batch_size,)
        self.cursor += global_batch
        return self._gather(windows * self.stride)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise BinaryLMError(f"the data-loader state lacks {', '.join(missing)}; the checkpoint is not "
                                "from this loader, so resume from another checkpoint or start a fresh run")
        if state["num_windows"] != self.num_windows:
            raise BinaryLMError(
                f"the data changed since the checkpoint: it had {state['num_windows']} training windows, now "
                f"{self.num_windows} ({len(self.shards)} tokens, context {self.context_length}, stride {self.stride}); "
                "prepare the same data with the same context length and stride, or start a fresh run"
            )
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
        self._order = None

    def eval_batches(self, batch_size: int, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic (x, y) batches over non-overlapping windows from the start, for validation.

        Global batch i is eval windows [i*G, (i+1)*G) with G = world_size *
        batch_size, and rank r takes the r-th block, so every rank yields the
        same number of batches and DDP can all-reduce. Only full batches are
        used; when not even one fits, one smaller batch is (an equal share of
        the windows per rank).
        """
        _check_positive(batch_size=batch_size, max_batches=max_batches)
        T = self.context_length
        starts = np.arange(0, len(self.shards) - T, T)  # (eval windows,) every s with s + T + 1 <= tokens
        per_rank = self._eval_rank_batch(len(starts), batch_size)
        global_batch = self.world_size * per_rank
        for i in range(min(max_batches, len(starts) // global_batch)):
            block = i * global_batch + self.rank * per_rank
            yield self._gather(starts[block : block + per_rank])

    def _eval_rank_batch(self, num_eval_windows: int, batch_size: int) -> int:
        if num_eval_windows >= self.world_size * batch_size:
            return batch_size
        if num_eval_windows >= self.world_size:
            return num_eval_windows // self.world_size
        raise BinaryLMError(
            f"{len(self.shards)} validation tokens give {num_eval_windows} windows of {self.context_length}+1 "
            f"tokens, fewer than one per process ({self.world_size}); hold out more validation data "
            "or use a shorter context length"
        )

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(self.num_windows)
        return self._order

    def _gather(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y of shape (len(starts), T) for windows beginning at `starts`."""
        span = self.context_length + 1
        windows = np.stack([self.shards.slice(int(s), int(s) + span) for s in starts])  # (B, T + 1)
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
        return x, y

    def _check_enough_windows(self) -> None:
        global_batch = self.world_size * self.batch_size
        if self.num_windows < global_batch:
            raise BinaryLMError(
                f"{len(self.shards)} tokens give {self.num_windows} windows of {self.context_length}+1 tokens at "
                f"stride {self.stride}, fewer than one batch of {global_batch} ({self.world_size} processes x "
                f"batch_size {self.batch_size}); lower train.batch_size or model.context_length, or add more data"
            )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise BinaryLMError(f"{name} must be positive, got {value}")
