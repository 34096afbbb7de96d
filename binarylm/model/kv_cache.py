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


class KVCache:
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

    def reset(self) -> None:
        self.length = 0
        self.slot_positions.fill_(-1)

    def _slots(self, start: int, end: int) -> torch.Tensor:
        """Ring slots of the last `capacity` positions in start .. end - 1 (the ones worth keeping)."""
        first = max(start, end - self.capacity)
        return torch.arange(first, end, device=self.slot_positions.device) % self.capacity

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
