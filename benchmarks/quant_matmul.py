"""Quantized matmuls against float32 nn.Linear, side by side, on the linear layers of the "small" preset.

Shapes (in -> out) of one "small" model (d_model 384, d_ff 1536, vocab 8192, 6 layers): attention qkv
384 -> 1152 and proj 384 -> 384, MLP up 384 -> 1536 and down 1536 -> 384, the head 384 -> 8192.
Batch 1 is one decoding step (a matrix-vector product); batch 8 is eight sequences decoding together.

Contestants, all built from the same float32 weights (N(0, 0.02)):

    fp32          nn.Linear, float32 (the baseline every ratio is against)
    bf16          nn.Linear in bfloat16 (x cast in and out): the other way to halve the bytes
    int8-kernel   Int8Linear on aten._weight_int8pack_mm (bfloat16 activations)
    int8-ref      Int8Linear's reference route: dequantize, then F.linear
    int4-kernel   Int4Linear on aten._weight_int4pack_mm_for_cpu (bfloat16 activations)
    int4-ref      Int4Linear's reference route
    torch-dyn     PyTorch's dynamic int8 (fbgemm; int8 activations too)

Each round times every contestant in turn (so they share the machine's noise) for about
--target-ms of calls; the figure is the median over --rounds rounds, in microseconds per call.
"speedup" is fp32 time / contestant time in this run; "err" is the relative output error
||y - y_fp32|| / ||y_fp32|| on the benchmark's input. "decode step" adds one batch-1 call of every
layer of the model (6 x (qkv + proj + up + down) + head): the matmul time of one generated token,
but with each layer's weights hot in the cache, which flatters float32 (a whole model's weights do
not stay in cache). So the script also decodes for real: greedy `generate_ids` with the KV cache on
a randomly initialised "small" model, float32 and each scheme in turn, tokens/s (a 16-token prompt,
then --decode-tokens new ones; median over rounds).

    python benchmarks/quant_matmul.py [--rounds 7] [--target-ms 20] [--group-size 128] [--threads N]
                                      [--decode-tokens 64]

The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from binarylm.config import build_config
from binarylm.infer.generate import generate_ids
from binarylm.model import Transformer
from binarylm.model.quant import (
    Int4Linear,
    Int8Linear,
    TorchDynamicInt8Linear,
    cpu_kernel_works,
    quantize_model,
    relative_error,
)

SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "up": (384, 1536), "down": (1536, 384), "head": (384, 8192)}
PER_TOKEN = {"qkv": 6, "proj": 6, "up": 6, "down": 6, "head": 1}  # calls per decoding step of the small model
BATCHES = (1, 8)


def contestants(linear: nn.Linear, group_size: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each route as a function of x (B, in) -> (B, out), float32 in and out."""
    bf16 = nn.Linear(linear.in_features, linear.out_features, dtype=torch.bfloat16)
    bf16.load_state_dict(linear.state_dict())
    int8, int4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, group_size)
    return {
        "fp32": linear,
        "bf16": lambda x: bf16(x.to(torch.bfloat16)).float(),
        "int8-kernel": int8.kernel_forward,
        "int8-ref": int8.reference_forward,
        "int4-kernel": int4.kernel_forward,
        "int4-ref": int4.reference_forward,
        "torch-dyn": TorchDynamicInt8Linear(linear),
    }


def time_call(call: Callable[[], object], target_s: float) -> float:
    """Microseconds per call, over as many calls as fit in about `target_s` (at least 3)."""
    start = time.perf_counter()
    call()
    calls = max(3, int(target_s / max(time.perf_counter() - start, 1e-7)))
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def bench_shape(name: str, batch: int, args) -> dict:
    in_features, out_features = SHAPES[name]
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    nn.init.normal_(linear.weight, std=0.02)
    routes = contestants(linear, args.group_size)
    x = torch.randn(batch, in_features)
    exact = linear(x)
    errors = {route: relative_error(f(x), exact) for route, f in routes.items()}
    for f in routes.values():  # warm-up: the int4 kernel's layout is made on its first call
        f(x)
    samples: dict[str, list[float]] = {route: [] for route in routes}
    for _ in range(args.rounds):
        for route, f in routes.items():
            samples[route].append(time_call(lambda f=f: f(x), args.target_ms / 1000))
    micros = {route: statistics.median(times) for route, times in samples.items()}
    return {"layer": name, "in": in_features, "out": out_features, "batch": batch, "us": micros, "error": errors}


def print_row(row: dict) -> None:
    fp32 = row["us"]["fp32"]
    cells = "  ".join(f"{route} {us:7.1f}us x{fp32 / us:4.2f} err {row['error'][route] * 100:4.2f}%"
                      for route, us in row["us"].items())
    print(f"{row['layer']:>5} {row['in']:>4}->{row['out']:<5} B={row['batch']}  {cells}", flush=True)


def decode_step(rows: list[dict]) -> dict[str, float]:
    """Microseconds of matmul per generated token of the small model (batch 1), per route."""
    batch1 = [row for row in rows if row["batch"] == 1]
    routes = batch1[0]["us"].keys()
    return {route: sum(PER_TOKEN[row["layer"]] * row["us"][route] for row in batch1) for route in routes}


def bench_decode(args) -> dict[str, float]:
    """Tokens/s of greedy decoding (KV cache) of the "small" preset, float32 and quantized."""
    torch.manual_seed(0)
    base = Transformer(build_config({"model": {"preset": "small"}}).model).eval()
    models = {
        "fp32": base,
        "int8": quantize_model(copy.deepcopy(base), "int8"),
        "int4": quantize_model(copy.deepcopy(base), "int4", args.group_size),
        "torch-dyn": quantize_model(copy.deepcopy(base), "torch-dynamic-int8"),
    }
    prompt = list(range(1, 17))
    for model in models.values():
        list(generate_ids(model, prompt, 4))  # warm-up (and the int4 kernel's layout)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            list(generate_ids(model, prompt, args.decode_tokens))
            samples[name].append(args.decode_tokens / (time.perf_counter() - start))
    return {name: statistics.median(rates) for name, rates in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--target-ms", type=float, default=20.0, help="time per contestant per round")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps PyTorch's default")
    parser.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decoding run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
          f"threads; kernels: int8 {cpu_kernel_works('int8')}, int4 {cpu_kernel_works('int4')}; int4 group "
          f"{args.group_size}; median of {args.rounds} rounds", flush=True)
    rows = []
    with torch.inference_mode():
        for batch in BATCHES:
            for name in SHAPES:
                rows.append(bench_shape(name, batch, args))
                print_row(rows[-1])
    step = decode_step(rows)
    print("decode step (batch 1, all layers): " + "  ".join(
        f"{route} {us:7.1f}us x{step['fp32'] / us:4.2f}" for route, us in step.items()))
    rates = bench_decode(args)
    print('greedy decoding, "small" preset: ' + "  ".join(
        f"{name} {rate:6.1f} tokens/s x{rate / rates['fp32']:4.2f}" for name, rate in rates.items()))
    print(json.dumps({"benchmark": "quant_matmul", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "group_size": args.group_size, "rounds": args.rounds, "rows": rows, "decode_step_us": step,
                      "decode_step_speedup": {route: step["fp32"] / us for route, us in step.items()},
                      "decode_tokens_per_s": rates,
                      "decode_speedup": {name: rate / rates["fp32"] for name, rate in rates.items()}}))


if __name__ == "__main__":
    main()
