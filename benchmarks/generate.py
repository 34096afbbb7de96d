"""Generation speed and quantization quality, side by side, in one run.

On one trained checkpoint (by default the `small` preset: 6 layers, d_model 384, vocab 8192):

1. ours vs Hugging Face: the same weights (moved across with binarylm.interop.hf), greedy, one
   prompt, N new tokens: our engine against `GPT2LMHeadModel.generate`. Both produce the same
   tokens (checked); the figure is new tokens per second over the whole call (prefill included).
2. batch-1 decode tokens/s of our engine with fp32, int8 and int4 weights (and PyTorch's
   dynamic int8 for comparison), plus time to first token (the prefill of the prompt).
3. aggregate tokens/s with continuous batching at max_batch 1, 8 and 32: 4 x max_batch requests
   (at least 8) with prompts and budgets of different lengths, all submitted at once; max_batch 32
   also without the engine's packed weights, for what they bring.
4. bits per byte of each quantized model next to fp32 on the run's held-out text.

Every timing is the median of --repeats runs, each contestant measured in turn so they share
the machine's noise. Without a checkpoint, one is trained first (`--train-minutes`, built-in
corpus, --train-steps) and kept in --checkpoint for the next run.

    python benchmarks/generate.py [--checkpoint runs/bench-small] [--new-tokens 200] [--repeats 3]
                                  [--threads 2] [--skip-hf] [--train-steps 300]

The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timing import median_seconds  # benchmarks/timing.py (scripts run from benchmarks/)

from binarylm.checkpoint import load_checkpoint, resolve_checkpoint
from binarylm.config import build_config
from binarylm.data.shards import TokenShards
from binarylm.errors import BinaryLMError
from binarylm.eval.run import evaluate_held_out
from binarylm.infer.engine import Engine
from binarylm.infer.sampling import SamplingParams

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
SCHEMES = ("int8", "int4", "torch-dynamic-int8")


def trained_checkpoint(path: Path, steps: int) -> Path:
    """The checkpoint at `path`, training the small preset on the built-in corpus first if there is none."""
    try:
        return resolve_checkpoint(path)
    except BinaryLMError:
        pass
    from binarylm.train.pretrain import pretrain

    print(f"no checkpoint at {path}: training the small preset for {steps} steps first")
    config = build_config({"model": {"preset": "small"}, "train": {
        "out_dir": str(path), "max_steps": steps, "batch_size": 8, "lr": 2e-3, "warmup_steps": 30,
        "eval_every": 200, "save_every": 100_000}})
    pretrain(config, progress=False)
    return resolve_checkpoint(path)


# ------------------------------------------------------------------ 1. ours vs Hugging Face


def hf_model(model, tokenizer):
    from transformers import AutoModelForCausalLM

    from binarylm.interop.hf import export_hf

    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, tokenizer, Path(folder) / "hf")
        return AutoModelForCausalLM.from_pretrained(Path(folder) / "hf").eval()


def engine_tokens(engine: Engine, prompt: list[int], new_tokens: int) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return engine.generate([prompt], params)[0].samples[0].token_ids


def hf_tokens(hf, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def versus_hf(model, tokenizer, prompt: list[int], args) -> dict:
    hf = hf_model(model, tokenizer)
    engine = Engine(model, tokenizer, max_batch=1)
    ours_ids, theirs_ids = engine_tokens(engine, prompt, args.new_tokens), hf_tokens(hf, prompt, args.new_tokens)
    agree = next((i for i, (a, b) in enumerate(zip(ours_ids, theirs_ids)) if a != b), len(ours_ids))
    rounds = {"ours": [], "hf": []}
    for _ in range(args.repeats):  # interleaved, so both see the same noise
        rounds["ours"].append(median_seconds(lambda: engine_tokens(engine, prompt, args.new_tokens), 1))
        rounds["hf"].append(median_seconds(lambda: hf_tokens(hf, prompt, args.new_tokens), 1))
    ours, theirs = (args.new_tokens / statistics.median(rounds[k]) for k in ("ours", "hf"))
    return {"ours_tokens_per_s": ours, "hf_tokens_per_s": theirs, "ratio": ours / theirs,
            "same_tokens": agree, "of": args.new_tokens}


# ------------------------------------------------------------------ 2. decode speed per weight format


def decode_figures(model, tokenizer, prompt: list[int], args) -> dict:
    """Batch-1 decode tokens/s (after the first token) and time to first token, median of repeats."""
    engine = Engine(model, tokenizer, max_batch=1)
    decode_rates, first_token = [], []
    for _ in range(args.repeats):
        stamps: list[float] = []
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True),
                           on_event=lambda event, stamps=stamps: stamps.append(time.perf_counter()))
        started = time.perf_counter()
        while engine.has_work():
            engine.step()
        engine.finished.clear()
        first_token.append(stamps[0] - started)
        decode_rates.append((len(stamps) - 2) / (stamps[-2] - stamps[0]))  # the last event is the finish
    return {"decode_tokens_per_s": statistics.median(decode_rates),
            "time_to_first_token_ms": 1000 * statistics.median(first_token)}


def quantized(model, scheme: str):
    from binarylm.model.quant import quantize_model

    return quantize_model(copy.deepcopy(model), scheme)


# ------------------------------------------------------------------ 3. continuous batching


def aggregate_rate(model, tokenizer, max_batch: int, args, pack_weights: bool = True) -> float:
    """Generated tokens per second over 4 x max_batch (at least 8) requests of mixed lengths, all submitted at once,
    so the batch stays full most of the time (it drains at the end). `pack_weights`: the engine's MKL-packed
    weights for full steps (model/linear.py), on by default as in the engine."""
    count = max(8, 4 * max_batch)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tokenizer.vocab_size - 10, (int(n),), generator=generator).tolist()
               for n in torch.randint(8, 64, (count,), generator=generator)]
    budgets = [int(n) for n in torch.randint(args.new_tokens // 2, args.new_tokens + 1, (count,),
                                             generator=generator)]
    params = [SamplingParams(temperature=0, max_tokens=b, ignore_eos=True) for b in budgets]
    engine = Engine(model, tokenizer, max_batch=max_batch, pack_weights=pack_weights)
    seconds = median_seconds(lambda: engine.generate(prompts, params), args.repeats)
    return sum(budgets) / seconds


# ------------------------------------------------------------------ 4. quality


def held_out_bits_per_byte(model, tokenizer, run_dir: Path, max_tokens: int) -> float:
    val = TokenShards.open(run_dir / "data", "val")
    return evaluate_held_out(model, tokenizer, val, max_tokens, torch.device("cpu"))["bits_per_byte"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/bench-small")
    parser.add_argument("--train-steps", type=int, default=300, help="steps to train a missing checkpoint")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens for bits per byte")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--formats", default="fp32," + ",".join(SCHEMES), help="weight formats to measure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = trained_checkpoint(Path(args.checkpoint), args.train_steps)
    saved = load_checkpoint(path)
    model, tokenizer = saved.model, saved.tokenizer
    prompt = tokenizer.encode(PROMPT)
    shape = model.config
    print(f"model: {shape.n_layer} layers, d_model {shape.d_model}, vocab {shape.vocab_size}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters; {args.threads} threads, {platform.processor() or ''}")
    figures: dict = {"checkpoint": str(path), "threads": args.threads, "new_tokens": args.new_tokens,
                     "cpus": os.cpu_count(), "torch": torch.__version__}
    if not args.skip_hf:
        figures["vs_hf"] = versus_hf(model, tokenizer, prompt, args)
        hf = figures["vs_hf"]
        print(f"batch 1, {args.new_tokens} greedy tokens: ours {hf['ours_tokens_per_s']:.1f} tok/s, "
              f"HF generate {hf['hf_tokens_per_s']:.1f} tok/s -> {hf['ratio']:.2f}x "
              f"(same tokens for {hf['same_tokens']} of {hf['of']})")
    names = args.formats.split(",")
    formats = {name: model if name == "fp32" else quantized(model, name) for name in ["fp32", *names] if name}
    figures["formats"] = {}
    for name, variant in formats.items():
        row = decode_figures(variant, tokenizer, prompt, args)
        row["bits_per_byte"] = held_out_bits_per_byte(variant, tokenizer, path.parent, args.eval_tokens)
        figures["formats"][name] = row
    base = figures["formats"]["fp32"]
    print(f"{'weights':<20}{'decode tok/s':>14}{'vs fp32':>9}{'TTFT ms':>10}{'bits/byte':>11}{'vs fp32':>9}")
    for name, row in figures["formats"].items():
        print(f"{name:<20}{row['decode_tokens_per_s']:>14.1f}"
              f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:>8.2f}x"
              f"{row['time_to_first_token_ms']:>10.1f}{row['bits_per_byte']:>11.4f}"
              f"{100 * (row['bits_per_byte'] / base['bits_per_byte'] - 1):>+8.2f}%")
    figures["aggregate_tokens_per_s"] = {b: aggregate_rate(model, tokenizer, b, args) for b in (1, 8, 32)}
    one = figures["aggregate_tokens_per_s"][1]
    for batch, rate in figures["aggregate_tokens_per_s"].items():
        print(f"continuous batching, max_batch {batch:>2}: {rate:8.1f} tok/s ({rate / one:.2f}x batch 1)")
    unpacked = aggregate_rate(model, tokenizer, 32, args, pack_weights=False)
    figures["aggregate_32_unpacked_tokens_per_s"] = unpacked
    print(f"continuous batching, max_batch 32 without packed weights: {unpacked:8.1f} tok/s "
          f"(packed: {figures['aggregate_tokens_per_s'][32] / unpacked:.2f}x)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
