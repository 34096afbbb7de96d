"""Does compiling the batch-1 decode step help on this machine? Eager vs `torch.compile`, in one run.

The engine's slot cache keeps each row's length as a Python int, so `torch.compile` would see new
values every step and recompile. This experiment uses a static-shape stand-in for one decode row:
lengths in a tensor, keys as full-length views plus a mask. It times the model's decode step
(batch 1, one token) with that cache in eager mode and compiled (inductor, default settings, then
with freezing and the C++ wrapper), each after warm-up, and compares both with the engine's own
eager decode cache. Outputs are checked against a full forward before anything is timed.

    python benchmarks/decode_compile.py [--checkpoint runs/bench-small] [--steps 100] [--threads 2]

The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from binarylm.checkpoint import load_checkpoint
from binarylm.model.kv_cache import BatchKVCache, visible_keys


class StaticRow:
    """One decode row of a BatchKVCache with static shapes (see the module docstring)."""

    length = 0  # the context check reads this; the caller keeps within the context

    def __init__(self, cache: BatchKVCache, lengths: torch.Tensor):
        self.cache, self.lengths, self._mask = cache, lengths, None

    def positions(self, new: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(new)

    def mask(self, new: int, window: int = 0) -> torch.Tensor:
        if self._mask is None:
            self._mask = visible_keys(self.positions(new), torch.arange(self.cache.max_length), window)[:, None]
        return self._mask

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[torch.zeros_like(self.lengths), :, self.lengths] = k[:, :, 0]  # (1, KV, D)
        values[torch.zeros_like(self.lengths), :, self.lengths] = v[:, :, 0]
        return keys[:1], values[:1]

    def advance(self, steps: int) -> None:
        self.lengths += steps


def ms_per_step(step, steps: int, start: int, lengths: torch.Tensor) -> float:
    for _ in range(3):  # warm-up (and, for a compiled step, the compilation)
        lengths.fill_(start)
        step()
    lengths.fill_(start)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/bench-small")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).model
    config = model.config
    cache = BatchKVCache(config.n_layer, 1, config.n_kv_heads, config.context_length, config.head_dim)
    prompt = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    token = torch.tensor([[5]])
    lengths = torch.tensor([12])
    figures = {}
    with torch.inference_mode():
        model(prompt, cache=cache.rows(0, 1))
        full, _ = model(torch.cat([prompt, token], dim=1))
        eager = model(token, cache=StaticRow(cache, lengths.clone()))[0]
        assert (eager[0, -1] - full[0, -1]).abs().max() < 1e-4, "the static cache disagrees with a full forward"
        cache.lengths[0] = 12

        def engine_step():
            model(token, cache=cache.rows(0, 1))
            cache.lengths[0] = 12  # stay at the same position, like the static variants

        figures["engine_eager_ms"] = ms_per_step(engine_step, args.steps, 12, lengths)
        figures["static_eager_ms"] = ms_per_step(lambda: model(token, cache=StaticRow(cache, lengths)), args.steps,
                                                 12, lengths)
        compiled = torch.compile(model, dynamic=False)
        figures["static_compiled_ms"] = ms_per_step(lambda: compiled(token, cache=StaticRow(cache, lengths)),
                                                    args.steps, 12, lengths)
        import torch._inductor.config as inductor

        inductor.freezing, inductor.cpp_wrapper = True, True
        torch._dynamo.reset()
        frozen = torch.compile(model, dynamic=False)
        figures["static_compiled_frozen_ms"] = ms_per_step(lambda: frozen(token, cache=StaticRow(cache, lengths)),
                                                           args.steps, 12, lengths)
    base = figures["engine_eager_ms"]
    for name, ms in figures.items():
        print(f"{name:<28}{ms:8.3f} ms/token  ({base / ms:.2f}x the engine's eager step)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
