"""nn.Linear that can keep its weight in MKL's packed GEMM layout for one row count (CPU decoding).

A decode step multiplies the same weights by a (B, C) batch of new positions,
step after step. MKL's packed GEMM (`cblas_sgemm_pack`) reorders the weight once
into the blocks its kernel reads, so each call skips the repacking that an
ordinary sgemm does on the fly. On the 2-core development CPU that makes the
"small" preset's matmuls at 32 rows about 1.5x as fast (benchmarks/RESULTS.md,
"Generation, 2026-11-30"); at 1 row it is slower, and PyTorch's op only takes
the packed layout for exactly the row count it was packed for.

So packing is opt-in and narrow: `pack_for_rows(model, rows)` (the engine calls
it with its max_batch) makes every such layer keep a packed copy, used when

- the input has exactly `rows` rows (B * T), is float32 on CPU, and
- no gradient is being recorded (the packed op has no backward).

Anything else takes the ordinary F.linear. The packed copy is made at the first
call after `pack_for_rows`, and made again when the weight is a different tensor
or its version counter has moved (`load_state_dict`, most in-place updates). The
fused AdamW step does not move that counter, so code that trains a model between
generations builds a new engine each time (every caller here does): building one
calls `pack_for_rows`, which drops the old copies. The copy costs one more
weight's worth of memory per layer, so a model whose copies would take more than a
quarter of the machine's memory is not packed. Results match F.linear's to float32 rounding
(tests/test_linear.py).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) plus an optional packed copy for `packed_rows` rows."""

    packed_rows = 0  # 0: never pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.packed_rows and self._packs(x):
            return torch.ops.mkl._mkl_linear(x, self._packed_weight(), self.weight, self.bias, self.packed_rows)
        return F.linear(x, self.weight, self.bias)

    def _packs(self, x: torch.Tensor) -> bool:
        return (x.numel() == self.packed_rows * self.in_features and x.dtype == torch.float32
                and x.device.type == "cpu" and self.weight.dtype == torch.float32 and not torch.is_grad_enabled())

    def _packed_weight(self) -> torch.Tensor:
        key = (self.packed_rows, self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_packed_key", None) != key:
            self._packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), self.packed_rows)
            self._packed_key = key
        return self._packed


@functools.cache
def packing_available() -> bool:
    """Whether this PyTorch has MKL's packed linear ops (x86 builds; not ARM or macOS)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


MEMORY_SHARE = 0.25  # the packed copies may take at most this share of the machine's memory


def pack_for_rows(model: nn.Module, rows: int) -> int:
    """Make every float32 CPU `Linear` in `model` keep a packed weight for `rows`-row inputs (0 turns it off).
    Returns how many layers will pack: none where MKL's ops are missing, or where the copies would take
    more than MEMORY_SHARE of the machine's memory (a large model then runs F.linear, as before)."""
    if rows and not packing_available():
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.weight.device.type == "cpu"
              and m.weight.dtype == torch.float32]
    copy_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    if rows and copy_bytes > MEMORY_SHARE * (physical_memory() or float("inf")):
        rows = 0
    for layer in layers:
        layer.packed_rows = rows
        layer._packed_key = None  # made again at the next call: the weights may have changed since
    return len(layers) if rows else 0


def physical_memory() -> int:
    """Bytes of memory on this machine, or 0 where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 0
