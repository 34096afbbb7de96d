"""A preallocated key/value cache, so each generated token costs one position, not the whole prefix.

Without a cache, generating token t re-runs attention over all t previous
positions, recomputing their keys and values every step. Keys and values of
past positions never change (attention is causal), so we store them once.

Two layouts:
- full: slot p holds position p; `keys[layer][:, :, :length]` are every position seen so far;
- rolling (sliding-window models): a ring of `window` slots, slot p % window holds
  position p, so the cache never grows past the window however long the text gets.

Only the key/value heads are stored: with grouped-query attention that is
n_kv_heads, not n_head, which is where GQA saves its memory.
"""

from __future__ import annotations

import torch

from binarylm.errors import BinaryLMError


def visible_keys(queries: torch.Tensor, keys: torch.Tensor, window: int = 0) -> torch.Tensor:
    """(..., Tq, Tk) booleans from positions (..., Tq) and (..., Tk): key k is visible to query q when
    k <= q (and, with a sliding window, q - k < window)."""
    visible = keys[..., None, :] <= queries[..., :, None]
    if window:
        visible &= keys[..., None, :] > queries[..., :, None] - window
    return visible


class KVCache:
    last_index = None  # one sequence per row, never padded: each row's last position is the last one

    def __init__(self, n_layer: int, batch_size: int, n_kv_heads: int, max_length: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, window: int = 0):
        self.max_length = max_length
        self.rolling = 0 < window < max_length
        self.capacity = window if self.rolling else max_length
        shape = (batch_size, n_kv_heads, self.capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.slot_positions = torch.full((self.capacity,), -1, device=device, dtype=torch.long)
        self.length = 0  # positions already seen (the same for every layer once a forward ends)
        self._mask: torch.Tensor | None = None  # this forward's mask, shared by its layers

    def positions(self, new: int) -> torch.Tensor:
        """(T,) the positions of the next `new` tokens."""
        return torch.arange(self.length, self.length + new, device=self.slot_positions.device)

    def mask(self, new: int, window: int = 0) -> torch.Tensor | None:
        """(T, L) which keys each of the next `new` queries sees, or None when that is every key.

        Computed once per forward (the first layer asks) and reused by the other layers.
        """
        if new == 1 and not window:
            return None  # one new token sees every cached position
        if self._mask is None:
            self._mask = visible_keys(self.positions(new), self.key_positions(new), window)
        return self._mask

    def key_positions(self, new: int) -> torch.Tensor:
        """(L,) the position of each key that `append` returns for `new` more tokens, in its order."""
        device = self.slot_positions.device
        fresh = torch.arange(self.length, self.length + new, device=device)
        if not self.rolling:
            return torch.cat((torch.arange(self.length, device=device), fresh))
        return torch.cat((self.slot_positions[:min(self.length, self.capacity)], fresh))

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, KV, T, D); return the stored keys and values plus these (B, KV, L, D)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise BinaryLMError(f"KV cache holds {self.max_length} positions; {end} were asked for")
        if not self.rolling:
            self.keys[layer][:, :, start:end] = k
            self.values[layer][:, :, start:end] = v
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        stored = min(start, self.capacity)
        keys = torch.cat((self.keys[layer][:, :, :stored], k), dim=2)  # (B, KV, stored + T, D)
        values = torch.cat((self.values[layer][:, :, :stored], v), dim=2)
        slots = self._slots(start, end)
        self.keys[layer][:, :, slots] = k[:, :, k.shape[2] - len(slots):]
        self.values[layer][:, :, slots] = v[:, :, v.shape[2] - len(slots):]
        return keys, values

    def advance(self, steps: int) -> None:
        """Called once per forward, after every layer has appended its `steps` new positions."""
        if self.rolling:
            slots = self._slots(self.length, self.length + steps)
            first = self.length + steps - len(slots)
            self.slot_positions[slots] = torch.arange(first, self.length + steps, device=self.slot_positions.device)
        self.length += steps
        self._mask = None

    def reset(self) -> None:
        self.length = 0
        self.slot_positions.fill_(-1)
        self._mask = None

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (B',) in that order, e.g. the beams that survive a beam-search step."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def _slots(self, start: int, end: int) -> torch.Tensor:
        """Ring slots of the last `capacity` positions in start .. end - 1 (the ones worth keeping)."""
        first = max(start, end - self.capacity)
        return torch.arange(first, end, device=self.slot_positions.device) % self.capacity

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class BatchKVCache:
    """Key/value slots for many independent sequences, each at its own length: the engine's cache.

    keys[layer] is (n_slots, n_kv_heads, max_length, head_dim), preallocated once. Slot s
    holds one sequence; `lengths[s]` of its positions are filled. A forward runs over a
    contiguous range of slots through `rows(start, stop)`: one slot for a prompt (prefill),
    or every running slot with one new token each (decode), each row at its own position.
    Keeping the running sequences in slots 0 .. B-1 (the engine moves the last one into a
    finished sequence's slot) makes every read a view, never a gather.
    """

    def __init__(self, n_layer: int, n_slots: int, n_kv_heads: int, max_length: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_slots, n_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.lengths = [0] * n_slots
        self.max_length = max_length
        self.device = torch.device(device)

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    def rows(self, start: int, stop: int, new_lengths: list[int] | None = None) -> CacheRows:
        """Slots start .. stop-1 as the cache of one forward; `new_lengths` gives each row's real token count
        when the rows are prompts of different lengths padded to one width."""
        return CacheRows(self, start, stop, new_lengths)

    def copy_slot(self, source: int, target: int) -> None:
        """Make slot `target` hold the same sequence as slot `source` (its filled positions only)."""
        filled = self.lengths[source]
        for stored in self.keys + self.values:
            stored[target, :, :filled] = stored[source, :, :filled]
        self.lengths[target] = filled

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class CacheRows:
    """Slots start .. stop-1 of a BatchKVCache, as the cache of one forward (the model's cache interface)."""

    def __init__(self, cache: BatchKVCache, start: int, stop: int, new_lengths: list[int] | None = None):
        self.cache, self.start, self.stop = cache, start, stop
        self.new_lengths = new_lengths  # padded prompts: the real tokens per row (the rest is padding)
        self.row_lengths = cache.lengths[start:stop]
        self.length = max(self.row_lengths)  # the longest row: what the context check needs
        self._lengths = torch.tensor(self.row_lengths, device=cache.device)  # (B,)
        self._slots = torch.arange(start, stop, device=cache.device)  # (B,)
        self._mask: torch.Tensor | None = None

    def positions(self, new: int) -> torch.Tensor:
        """(B, T): row b's next `new` positions start at its own length."""
        return self._lengths[:, None] + torch.arange(new, device=self.cache.device)

    def mask(self, new: int, window: int = 0) -> torch.Tensor | None:
        """(B, 1, T, L) which keys each row's queries see; None when every row sees all of its keys."""
        uniform = len(set(self.row_lengths)) == 1
        if new == 1 and not window and uniform:
            return None
        if self._mask is None:
            keys = torch.arange(self.length + new, device=self.cache.device)  # (L,) slot positions
            self._mask = visible_keys(self.positions(new), keys, window)[:, None]  # (B, 1, T, L)
        return self._mask

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's new k, v (B, KV, T, D) at its own length; return (B, KV, L, D) views of the slots.

        Positions past a row's own end hold stale data from earlier sequences; the mask hides them.
        """
        new = k.shape[2]
        end = self.length + new
        if end > self.cache.max_length:
            raise BinaryLMError(f"KV cache holds {self.cache.max_length} positions; {end} were asked for")
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if new == 1 and len(self.row_lengths) > 1:  # decode: one position per row, each at its own length
            keys[self._slots, :, self._lengths] = k[:, :, 0]  # (B, KV, D)
            values[self._slots, :, self._lengths] = v[:, :, 0]
        else:  # one row (a prompt, or batch-1 decode): plain slices are cheaper than index tensors
            for row, length in enumerate(self.row_lengths):
                keys[self.start + row, :, length:length + new] = k[row]
                values[self.start + row, :, length:length + new] = v[row]
        return keys[self.start:self.stop, :, :end], values[self.start:self.stop, :, :end]

    @property
    def last_index(self) -> torch.Tensor | None:
        """(B,) the index of each row's last real token in a padded batch; None when rows are not padded."""
        if self.new_lengths is None:
            return None
        return torch.tensor(self.new_lengths, device=self.cache.device) - 1

    def advance(self, steps: int) -> None:
        """Each row now holds its real new tokens; padding positions are overwritten before anything sees them
        (a row's next token is written at its own length, and the mask hides positions past the query)."""
        for row, slot in enumerate(range(self.start, self.stop)):
            self.cache.lengths[slot] += steps if self.new_lengths is None else self.new_lengths[row]
