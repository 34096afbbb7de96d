"""A preallocated key/value cache, so each generated token costs one position, not the whole prefix.

Without a cache, generating token t re-runs attention over all t previous
positions, recomputing their keys and values every step. Keys and values of
past positions never change (attention is causal), so we store them once:
`keys[layer][:, :, :length]` hold every position seen so far.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_length: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch_size, n_head, max_length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_length = max_length
        self.length = 0  # positions already stored (the same for every layer once a forward ends)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, H, T, D) after the cached ones; return all of them (B, H, L+T, D)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} were asked for")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        """Called once per forward, after every layer has appended its `steps` new positions."""
        self.length += steps

    def reset(self) -> None:
        self.length = 0
