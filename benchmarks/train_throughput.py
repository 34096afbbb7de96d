"""Training throughput, side by side, in one run: our Transformer against Hugging Face's GPT2LMHeadModel.

Both models get the same shape (GPT-2 layout: pre-norm, learned positions, tied head, GELU with the
tanh approximation, biases, LayerNorm eps 1e-5, no dropout), the same weights (ours are copied into
the Hugging Face model, and a parity check on one batch must agree before anything is timed), the
same seeded token batches and the same optimizer construction (`build_optimizer`, fused AdamW where
available), so the ratio measures the model code alone.

One training step: zero_grad(set_to_none) -> forward with loss -> backward -> clip_grad_norm_(1.0)
-> optimizer step. Each round runs every contestant in turn (ours, HF, ours, HF, ...) with a few
untimed warm-up steps and then timed steps, so they share the machine's noise; the figure reported
per contestant is the median over all timed steps of all rounds.

MFU (model FLOPs utilisation) = tokens/s * flops_per_token / peak, where peak is this machine's
measured fp32 matmul rate (square `a @ b`, best of several, same thread count).

    python benchmarks/train_throughput.py [--threads 2] [--rounds 3] [--warmup 3] [--steps 10]
                                          [--compile] [--profile] [--hf-activation gelu_pytorch_tanh]
                                          [--malloc-tune] [--interleave step]

Both see T = context positions per sequence: ours gets ids[:, :-1] with targets ids[:, 1:] from a
(B, T + 1) batch; HF gets the same ids as input and labels (it shifts them inside, so it scores
T - 1 positions; a difference of one row in the loss, nothing in the model's work).
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
from dataclasses import dataclass, field

import torch
from torch import nn

from binarylm.config import ModelConfig, TrainConfig
from binarylm.model.gpt import Transformer
from binarylm.train.optim import build_optimizer

# ------------------------------------------------------------------ models


def build_ours(args) -> Transformer:
    config = ModelConfig(
        vocab_size=args.vocab, context_length=args.context, n_layer=args.layers, n_head=args.heads,
        d_model=args.d_model, dropout=0.0, bias=True, tie_embeddings=True, norm_eps=1e-5,
    )
    torch.manual_seed(args.seed)
    return Transformer(config)


def build_hf(args, attn_implementation: str | None):
    """GPT2LMHeadModel of the same shape; `args.hf_activation` is "gelu_new" (GPT-2's tanh GELU, written as
    separate tensor ops) unless overridden, e.g. by "gelu_pytorch_tanh" (the same function in one fused op)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=args.vocab, n_positions=args.context, n_embd=args.d_model, n_layer=args.layers,
        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function=args.hf_activation,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        # GPT-2's special ids (50256) lie outside a small vocabulary; they play no part in training.
        bos_token_id=None, eos_token_id=None,
    )
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return GPT2LMHeadModel._from_config(config, **kwargs)


@torch.no_grad()
def copy_weights(ours: Transformer, hf) -> None:
    """Load our parameters into the HF model. HF's Conv1D keeps its weight as (in, out): transpose."""
    t = hf.transformer
    t.wte.weight.copy_(ours.token_embedding.weight)
    t.wpe.weight.copy_(ours.position_embedding.weight)
    for block, h in zip(ours.blocks, t.h):
        pairs = [
            (block.norm1, h.ln_1, False), (block.attn.qkv, h.attn.c_attn, True), (block.attn.proj, h.attn.c_proj, True),
            (block.norm2, h.ln_2, False), (block.mlp.up, h.mlp.c_fc, True), (block.mlp.down, h.mlp.c_proj, True),
        ]
        for src, dst, transposed in pairs:
            dst.weight.copy_(src.weight.t() if transposed else src.weight)
            dst.bias.copy_(src.bias)
    t.ln_f.weight.copy_(ours.final_norm.weight)
    t.ln_f.bias.copy_(ours.final_norm.bias)
    if hf.lm_head.weight is not t.wte.weight:
        raise AssertionError("the Hugging Face model's head is not tied to its token embedding")


def loss_ours(model, batch: torch.Tensor) -> torch.Tensor:
    return model(batch[:, :-1], batch[:, 1:])[1]


def loss_hf(model, batch: torch.Tensor) -> torch.Tensor:
    ids = batch[:, :-1]
    return model(input_ids=ids, labels=ids, use_cache=False).loss


# ------------------------------------------------------------------ parity


def grad_norm(model: nn.Module) -> float:
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item()


def check_parity(ours: Transformer, hf, batch: torch.Tensor, name: str) -> dict:
    """Same logits, same loss and same gradient norm on one batch, or an AssertionError.

    HF shifts `labels` inside and so scores T - 1 positions (the last has no next token in its
    input); ours scores all T against batch[:, 1:]. For an exact comparison the last target of
    ours is set to the ignore index (-100).
    """
    ids = batch[:, :-1]
    targets = batch[:, 1:].clone()
    targets[:, -1] = -100
    with torch.no_grad():  # logits from a call without targets: a model may skip them when it has targets
        logits_ours = ours(ids)[0]
        logits_hf = hf(input_ids=ids, use_cache=False).logits
    for m in (ours, hf):
        m.zero_grad(set_to_none=True)
    loss_o = ours(ids, targets)[1]
    loss_h = hf(input_ids=ids, labels=ids, use_cache=False).loss
    loss_o.backward()
    loss_h.backward()
    grad_ours, grad_hf = grad_norm(ours), grad_norm(hf)
    for m in (ours, hf):
        m.zero_grad(set_to_none=True)
    logit_diff = (logits_ours - logits_hf).abs().max().item()
    loss_diff = abs(loss_o.item() - loss_h.item())
    print(f"parity vs {name}: loss ours {loss_o.item():.6f}  HF {loss_h.item():.6f}  |diff| {loss_diff:.2e};"
          f"  max |logit diff| {logit_diff:.2e};  grad norm ours {grad_ours:.6f}  HF {grad_hf:.6f}")
    assert loss_diff < 1e-4, f"losses differ by {loss_diff} (> 1e-4): the models are not the same function"
    assert logit_diff < 1e-3, f"logits differ by up to {logit_diff}"
    assert abs(grad_ours - grad_hf) < 1e-3 * max(1.0, grad_hf), f"gradient norms differ: {grad_ours} vs {grad_hf}"
    return {"loss_ours": loss_o.item(), "loss_hf": loss_h.item(), "loss_abs_diff": loss_diff,
            "max_logit_abs_diff": logit_diff, "grad_norm_ours": grad_ours, "grad_norm_hf": grad_hf}


# ------------------------------------------------------------------ timing


@dataclass
class Contestant:
    name: str
    model: nn.Module
    loss_fn: object  # (model, batch) -> scalar loss
    optimizer: torch.optim.Optimizer = None
    step_seconds: list[float] = field(default_factory=list)
    round_tokens_per_s: list[float] = field(default_factory=list)
    first_step_seconds: float | None = None  # for a compiled model: compilation + one step
    cursor: int = 0  # which batch comes next; every contestant walks the same sequence


def train_step(c: Contestant, batch: torch.Tensor, clip: float) -> None:
    c.optimizer.zero_grad(set_to_none=True)
    loss = c.loss_fn(c.model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(c.model.parameters(), clip)
    c.optimizer.step()


def run_round(contestants: list[Contestant], batches: list[torch.Tensor], warmup: int, steps: int, clip: float,
              interleave: str) -> None:
    """One round: each contestant warms up, then is timed; in turn ("round") or alternating each step ("step")."""

    def one_step(c: Contestant) -> float:
        batch = batches[c.cursor % len(batches)]
        c.cursor += 1
        started = time.perf_counter()
        train_step(c, batch, clip)
        return time.perf_counter() - started

    tokens = batches[0].shape[0] * (batches[0].shape[1] - 1)
    times = {c.name: [] for c in contestants}
    if interleave == "round":
        for c in contestants:
            for _ in range(warmup):
                one_step(c)
            times[c.name] = [one_step(c) for _ in range(steps)]
    else:
        for c in contestants:
            for _ in range(warmup):
                one_step(c)
        for _ in range(steps):
            for c in contestants:
                times[c.name].append(one_step(c))
    for c in contestants:
        c.step_seconds.extend(times[c.name])
        c.round_tokens_per_s.append(tokens * len(times[c.name]) / sum(times[c.name]))


def peak_matmul_flops(n: int, repeats: int) -> float:
    """Best fp32 FLOP/s of a square n x n matmul on this machine with the current thread count."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def profile_step(c: Contestant, batch: torch.Tensor, clip: float, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(2):
        train_step(c, batch, clip)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        c.optimizer.zero_grad(set_to_none=True)
        with record_function("## forward"):
            loss = c.loss_fn(c.model, batch)
        with record_function("## backward"):
            loss.backward()
        with record_function("## clip_grad_norm"):
            torch.nn.utils.clip_grad_norm_(c.model.parameters(), clip)
        with record_function("## optimizer"):
            c.optimizer.step()
    print(f"\n=== profile: {c.name} (one step, self CPU time) ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ------------------------------------------------------------------ main


def tune_malloc() -> bool:
    """Ask glibc to serve every allocation from the heap and never give it back (M_MMAP_MAX = 0,
    M_TRIM_THRESHOLD = max). On CPU, PyTorch allocates each tensor with malloc; a large one otherwise
    gets fresh pages from the kernel each step, which are zeroed and faulted in one by one."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contestant per round")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per contestant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interleave", choices=("round", "step"), default="round",
                        help="round: each contestant's timed steps run as a block per round (ours, HF, ours, HF, ...);"
                             " step: timed steps alternate one by one (finer sharing of machine noise, but each model "
                             "then starts from the caches and heap the other left)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=8, help="distinct random batches, cycled")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n for the peak fp32 matmul measurement")
    parser.add_argument("--hf-activation", default="gelu_new", choices=("gelu_new", "gelu_pytorch_tanh"),
                        help="HF's name for the tanh GELU: gelu_new (GPT-2's, the default) or gelu_pytorch_tanh")
    parser.add_argument("--malloc-tune", action="store_true",
                        help="glibc only: keep freed memory in the heap (no mmap, no trim) so that large tensors "
                             "do not page-fault on every step; applies to every contestant alike")
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one step each")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args()

    import transformers

    malloc_tuned = tune_malloc() if args.malloc_tune else False
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    train_config = TrainConfig()
    clip = train_config.grad_clip

    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=g) for _ in range(args.batches)]
    tokens_per_step = args.batch * args.context

    # HF's default attention, plus sdpa and eager named explicitly where they are something else.
    base = build_ours(args).train()
    default_hf = build_hf(args, None)
    default_impl = default_hf.config._attn_implementation
    hf_models = {default_impl: default_hf}
    for impl in ("sdpa", "eager"):
        if impl not in hf_models:
            hf_models[impl] = build_hf(args, impl)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {cpu_name()}, "
          f"{os.cpu_count()} cores, threads {torch.get_num_threads()}")
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, context {args.context}, "
          f"vocab {args.vocab}, batch {args.batch} ({tokens_per_step} tokens/step), fp32, dropout 0, "
          f"{base.num_parameters():,} parameters")
    print(f"HF activation_function={args.hf_activation}; malloc tuned: {malloc_tuned if args.malloc_tune else 'no'}")

    parity = {}
    for impl, hf in hf_models.items():
        copy_weights(base, hf)
        hf.train()
        parity[impl] = check_parity(base, hf, batches[0], f"HF {impl}")

    contestants = [Contestant("ours", base, loss_ours)]
    contestants += [Contestant(f"HF {impl}", hf, loss_hf) for impl, hf in hf_models.items()]
    compiled = None
    if args.compile:
        ours_copy = copy.deepcopy(base)
        compiled = Contestant("ours compiled", torch.compile(ours_copy), loss_ours)
        contestants.append(compiled)
    for c in contestants:
        c.optimizer = build_optimizer(c.model, train_config)
    fused = bool(contestants[0].optimizer.defaults.get("fused"))

    if compiled is not None:  # compilation happens on the first forward and first backward
        started = time.perf_counter()
        train_step(compiled, batches[0], clip)
        compiled.first_step_seconds = time.perf_counter() - started
        compiled.cursor = 0

    peak_before = peak_matmul_flops(args.matmul_size, repeats=5)
    for _ in range(args.rounds):
        run_round(contestants, batches, args.warmup, args.steps, clip, args.interleave)
    peak_after = peak_matmul_flops(args.matmul_size, repeats=5)
    peak = max(peak_before, peak_after)

    if args.profile:
        for c in contestants:
            profile_step(c, batches[0], clip, args.profile_rows)

    flops_per_token = base.flops_per_token(training=True)
    results = {}
    for c in contestants:
        median_step = statistics.median(c.step_seconds)
        tps = tokens_per_step / median_step
        results[c.name] = {
            "tokens_per_s": tps,
            "median_step_ms": median_step * 1e3,
            "min_step_ms": min(c.step_seconds) * 1e3,
            "max_step_ms": max(c.step_seconds) * 1e3,
            "round_tokens_per_s": c.round_tokens_per_s,
            "mfu": tps * flops_per_token / peak,
        }
        if c.first_step_seconds is not None:
            results[c.name]["compile_plus_first_step_s"] = c.first_step_seconds
            results[c.name]["compile_s_estimate"] = c.first_step_seconds - median_step

    ours_tps = results["ours"]["tokens_per_s"]
    ratios = {f"ours/{name}": ours_tps / r["tokens_per_s"] for name, r in results.items() if name.startswith("HF")}
    if compiled is not None:
        ratios.update({f"ours compiled/{name}": results["ours compiled"]["tokens_per_s"] / r["tokens_per_s"]
                       for name, r in results.items() if name.startswith("HF")})
    headline = ratios[f"ours/HF {default_impl}"]
    # Noise from other work on the machine only ever adds time, so the fastest step is a second,
    # noise-resistant estimate of each model's speed.
    best_ratios = {f"{mine}/{name}": r["min_step_ms"] / results[mine]["min_step_ms"]
                   for mine in results if mine.startswith("ours")
                   for name, r in results.items() if name.startswith("HF")}
    noisy = [name for name, r in results.items() if r["max_step_ms"] > 1.5 * r["min_step_ms"]]

    print(f"\npeak fp32 matmul ({args.matmul_size}^3, best of 5, before/after): "
          f"{peak_before / 1e9:.1f} / {peak_after / 1e9:.1f} GFLOP/s (using the higher); "
          f"training FLOPs per token {flops_per_token / 1e6:.1f} M; optimizer AdamW fused={fused}")
    print(f"{args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed steps) per contestant, "
          f"interleaved by {args.interleave}\n")
    header = (f"{'contestant':<16}{'tokens/s':>10}{'step ms':>10}{'min ms':>9}{'max ms':>9}{'MFU':>8}"
              "  per-round tokens/s")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        rounds = ", ".join(f"{x:.0f}" for x in r["round_tokens_per_s"])
        print(f"{name:<16}{r['tokens_per_s']:>10.0f}{r['median_step_ms']:>10.1f}{r['min_step_ms']:>9.1f}"
              f"{r['max_step_ms']:>9.1f}{r['mfu']:>8.1%}  {rounds}")
    if compiled is not None:
        r = results["ours compiled"]
        print(f"\ncompile: first compiled step {r['compile_plus_first_step_s']:.1f} s "
              f"(~{r['compile_s_estimate']:.1f} s of compilation), excluded from throughput")
    print()
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.3f}x tokens/s")
    print("on the fastest step of each: " + ", ".join(f"{k} {v:.3f}x" for k, v in best_ratios.items()))
    print(f"headline ours/HF (default attention = {default_impl}): {headline:.3f}x (target >= 1.15x)")
    if noisy:
        print(f"warning: noisy timings (slowest step > 1.5x the fastest) for {', '.join(noisy)}: other work was "
              "probably running on the machine; re-run, or use more --rounds")

    print(json.dumps({
        "benchmark": "train_throughput",
        "torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu_name(),
        "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "config": {"n_layer": args.layers, "d_model": args.d_model, "n_head": args.heads, "context": args.context,
                   "batch": args.batch, "vocab": args.vocab, "dtype": "float32", "parameters": base.num_parameters()},
        "rounds": args.rounds, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "hf_default_attn": default_impl, "hf_activation": args.hf_activation, "optimizer_fused": fused,
        "malloc_tuned": malloc_tuned,
        "parity": parity,
        "flops_per_token": flops_per_token, "peak_matmul_flops": peak, "peak_matmul_flops_before": peak_before,
        "peak_matmul_flops_after": peak_after, "interleave": args.interleave,
        "results": results, "ratios": ratios, "ratios_fastest_step": best_ratios, "noisy": noisy,
        "ratio_ours_over_hf": headline,
    }))


if __name__ == "__main__":
    main()
