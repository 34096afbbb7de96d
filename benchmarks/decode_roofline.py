"""How fast can decoding get on this machine? Ceilings for the inference targets, measured in one run.

The inference issue asks, on the 6-layer/384-wide/vocab-8192 model: batch-1 fp32 decode >= 3x
Hugging Face `generate`, int8 >= 1.5x our fp32, and 32 concurrent requests >= 8x batch 1. This
script measures what bounds each figure, beside the engine's own numbers:

1. the machine: read bandwidth of a tensor that fits in the last-level cache and of one that
   does not, and float32 GEMM throughput;
2. a "bare" decode step: the same model as a straight list of aten calls over preloaded weight
   tensors (no modules, no engine, no sampling beyond argmax), with float32 weights, with int8
   weights through the same kernel the engine uses, and at 32 rows with MKL-packed weights and
   every row at the same length (no padding). No eager-mode PyTorch decoder can beat this step
   by much: it is the matmuls plus one call per remaining operation.
3. the ceilings: HF's time per token over the bare fp32 step (the best "ours vs HF" eager PyTorch
   can reach), the bare fp32 step over the bare int8 step, and 32 x the engine's batch-1 step
   over the bare 32-row step.

    python benchmarks/decode_roofline.py [--checkpoint runs/bench-small] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from generate import engine_tokens, hf_model, hf_tokens, trained_checkpoint  # benchmarks/generate.py
from timing import median_seconds  # benchmarks/timing.py

from binarylm.checkpoint import load_checkpoint
from binarylm.infer.engine import Engine
from binarylm.model.quant import quantize_int8

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


def median_time(fn, rounds: int) -> float:
    """Median seconds of `rounds` calls after two warm-up calls."""
    fn(), fn()
    return median_seconds(fn, rounds)


# ------------------------------------------------------------------ 1. the machine


def read_bandwidth(megabytes: int) -> float:
    """GB/s of summing a float32 tensor of that size (after it has been read once)."""
    x = torch.randn(megabytes * 2**20 // 4)
    return megabytes / 1024 / median_time(x.sum, 20)


def gemm_gflops(rows: int, weights: list[torch.Tensor], packed: bool) -> float:
    """GFLOP/s of x (rows, in) @ W^T over the model's weight list, plain or MKL-packed for `rows`."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    if packed:
        calls = [(w, torch.ops.mkl._mkl_reorder_linear_weight(w, rows)) for w in weights]
        run = lambda: [torch.ops.mkl._mkl_linear(inputs[w.shape[1]], p, w, None, rows) for w, p in calls]  # noqa: E731
    else:
        run = lambda: [F.linear(inputs[w.shape[1]], w) for w in weights]  # noqa: E731
    flops = sum(2 * rows * w.numel() for w in weights)
    return flops / median_time(run, 20) / 1e9


# ------------------------------------------------------------------ 2. the bare decode step


class BareDecoder:
    """A GPT-2-layout model as plain tensors, decoding `rows` sequences that all sit at the same position."""

    def __init__(self, model, rows: int, matmul: str):
        self.rows, self.matmul = rows, matmul
        config = model.config
        self.heads, self.head_dim, self.width = config.n_head, config.head_dim, config.d_model
        self.eps = config.norm_eps
        self.embedding = model.token_embedding.weight.detach()
        self.positions = model.position_embedding.weight.detach()
        self.final_norm = (model.final_norm.weight.detach(), model.final_norm.bias.detach())
        self.layers = []
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            self.layers.append({
                "norm1": (block.norm1.weight.detach(), block.norm1.bias.detach()),
                "norm2": (block.norm2.weight.detach(), block.norm2.bias.detach()),
                "qkv": self._weights(attn.qkv.weight, attn.qkv.bias), "proj": self._weights(attn.proj.weight,
                                                                                             attn.proj.bias),
                "up": self._weights(mlp.up.weight, mlp.up.bias), "down": self._weights(mlp.down.weight, mlp.down.bias),
                "keys": torch.randn(rows, self.heads, config.context_length, self.head_dim),
                "values": torch.randn(rows, self.heads, config.context_length, self.head_dim),
            })
        self.head = self._weights(model.token_embedding.weight, None)

    def _weights(self, weight: torch.Tensor, bias: torch.Tensor | None):
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
        if self.matmul == "int8":
            codes, scales = quantize_int8(weight)
            return codes, scales.to(torch.bfloat16), bias
        if self.matmul == "packed":
            return torch.ops.mkl._mkl_reorder_linear_weight(weight, self.rows), weight, bias
        return weight, bias

    def _linear(self, x: torch.Tensor, weights) -> torch.Tensor:  # (rows, in) -> (rows, out)
        if self.matmul == "int8":
            codes, scales, bias = weights
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), codes, scales)
            return y + bias if bias is not None else y.float()
        if self.matmul == "packed":
            packed, weight, bias = weights
            return torch.ops.mkl._mkl_linear(x, packed, weight, bias, self.rows)
        weight, bias = weights
        return F.linear(x, weight, bias)

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """tokens (rows,) at `position` -> the next tokens (rows,)."""
        rows, heads, dim = self.rows, self.heads, self.head_dim
        x = self.embedding[tokens] + self.positions[position]  # (rows, C)
        for layer in self.layers:
            h = F.layer_norm(x, (self.width,), *layer["norm1"], self.eps)
            q, k, v = self._linear(h, layer["qkv"]).view(rows, 3, heads, 1, dim).unbind(1)  # each (rows, H, 1, D)
            layer["keys"][:, :, position] = k[:, :, 0]
            layer["values"][:, :, position] = v[:, :, 0]
            y = F.scaled_dot_product_attention(q, layer["keys"][:, :, :position + 1],
                                               layer["values"][:, :, :position + 1])  # (rows, H, 1, D)
            x = x + self._linear(y.view(rows, self.width), layer["proj"])
            h = F.layer_norm(x, (self.width,), *layer["norm2"], self.eps)
            x = x + self._linear(F.gelu(self._linear(h, layer["up"]), approximate="tanh"), layer["down"])
        x = F.layer_norm(x, (self.width,), *self.final_norm, self.eps)
        return self._linear(x, self.head).argmax(-1)

    def seconds_per_step(self, start: int, steps: int) -> float:
        """Median seconds of one step over `steps` steps from position `start` on."""
        tokens = torch.zeros(self.rows, dtype=torch.long)
        times = []
        for position in range(start, start + steps):
            begin = time.perf_counter()
            tokens = self.step(tokens, position)
            times.append(time.perf_counter() - begin)
        return statistics.median(times)


# ------------------------------------------------------------------ 3. the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/bench-small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    saved = load_checkpoint(trained_checkpoint(Path(args.checkpoint), 300))
    model, tokenizer = saved.model.eval(), saved.tokenizer
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weight_mb = sum(w.numel() * 4 for w in weights) / 2**20

    cache_bw, memory_bw = read_bandwidth(56), read_bandwidth(400)
    print(f"machine: {args.threads} threads; read {cache_bw:.1f} GB/s (56 MB, in the last-level cache), "
          f"{memory_bw:.1f} GB/s (400 MB); float32 GEMM at {args.rows} rows over the model's weights: "
          f"{gemm_gflops(args.rows, weights, False):.0f} GFLOP/s plain, "
          f"{gemm_gflops(args.rows, weights, True):.0f} GFLOP/s MKL-packed")

    large = [torch.randn(8192, 2048) * 0.02 for _ in range(4)]  # 256 MB: beyond the last-level cache
    print(f"float32 GEMM at {args.rows} rows over 4 x (8192, 2048) weights (256 MB): "
          f"{gemm_gflops(args.rows, large, False):.0f} GFLOP/s plain, {gemm_gflops(args.rows, large, True):.0f} packed")
    del large

    prompt = tokenizer.encode(PROMPT)
    hf, engine = hf_model(model, tokenizer), Engine(model, tokenizer, max_batch=1)
    with torch.inference_mode():
        hf_ms = 1000 * median_time(lambda: hf_tokens(hf, prompt, args.new_tokens), args.repeats) / args.new_tokens
        ours_ms = 1000 * median_time(lambda: engine_tokens(engine, prompt, args.new_tokens),
                                     args.repeats) / args.new_tokens
        start = len(prompt)
        bare = {name: BareDecoder(model, rows, matmul).seconds_per_step(start, args.new_tokens) * 1000
                for name, rows, matmul in (("fp32", 1, "plain"), ("int8", 1, "int8"),
                                           ("rows", args.rows, "packed"))}
    stream_ms = weight_mb / 1024 / cache_bw * 1000
    print(f"weights: {weight_mb:.1f} MB float32 -> {stream_ms:.2f} ms per token just to read them "
          f"at {cache_bw:.1f} GB/s")
    print(f"per token, batch 1, {args.new_tokens} greedy tokens: HF generate {hf_ms:.2f} ms, "
          f"our engine {ours_ms:.2f} ms ({hf_ms / ours_ms:.2f}x HF)")
    print(f"bare step: fp32 {bare['fp32']:.2f} ms, int8 {bare['int8']:.2f} ms, {args.rows} rows fp32 packed "
          f"{bare['rows']:.2f} ms (every row at the same length)")
    print(f"ceiling, ours vs HF at batch 1 (fp32): {hf_ms / bare['fp32']:.2f}x with the bare step, "
          f"{hf_ms / stream_ms:.2f}x if only the weight reads were left (target 3x)")
    print(f"ceiling, int8 vs fp32 at batch 1: {bare['fp32'] / bare['int8']:.2f}x bare against bare (target 1.5x)")
    print(f"ceiling, {args.rows} rows vs batch 1: {args.rows * ours_ms / bare['rows']:.2f}x against the engine's "
          f"batch 1, {args.rows * bare['fp32'] / bare['rows']:.2f}x bare against bare (target 8x)")


if __name__ == "__main__":
    main()
