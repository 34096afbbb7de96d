"""What a model configuration costs: parameters, FLOPs per token, memory.

Everything is derived from the config by building the model on PyTorch's
"meta" device (shapes without storage), so a 1B-parameter preset is summarised
in milliseconds and no memory.

Memory figures:
- weights: parameters x bytes per parameter (4 fp32, 2 bf16, 1 int8, 0.5 + scales for int4);
- KV cache: each layer stores a key and a value vector per KV head per position,
  2 x n_layer x n_kv_heads x head_dim numbers per token; a sliding window caps the
  positions kept per sequence;
- training state with AdamW in fp32: weights, gradients and two moments, 16 bytes
  per parameter (activations come on top and depend on batch size and context).
"""

from __future__ import annotations

import torch

from binarylm.config import ModelConfig
from binarylm.model.gpt import Transformer

BYTES_PER_PARAMETER = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 2 / 32}  # int4: bf16 scale per 32
ADAMW_FP32_BYTES = 16  # weight, gradient, first and second moment, 4 bytes each


def model_summary(config: ModelConfig) -> dict:
    """Parameter counts, FLOPs and memory estimates for a model of this config (nothing allocated)."""
    config.validate()
    with torch.device("meta"):
        model = Transformer(config)
    parameters = model.num_parameters()
    kv_per_token = 2 * config.n_layer * config.n_kv_heads * config.head_dim  # numbers per cached position
    return {
        "parameters": parameters,
        "non_embedding_parameters": model.num_parameters(non_embedding=True),
        "active_parameters": model.num_parameters(active=True),
        "flops_per_token_forward": model.flops_per_token(training=False),
        "flops_per_token_training": model.flops_per_token(training=True),
        "weights_bytes": {name: int(parameters * size) for name, size in BYTES_PER_PARAMETER.items()},
        "kv_cache_bytes_per_token": {"fp32": 4 * kv_per_token, "bf16": 2 * kv_per_token},
        "kv_cache_bytes_per_sequence_bf16": 2 * kv_per_token * config.attention_span,
        "training_state_bytes_adamw_fp32": ADAMW_FP32_BYTES * parameters,
    }


def format_summary(config: ModelConfig, summary: dict) -> str:
    """The summary as a few aligned lines a person reads."""
    c = config
    shape = (f"{c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads ({c.n_kv_heads} KV), head size "
             f"{c.head_dim}, d_ff {c.d_ff}, vocab {c.vocab_size}, context {c.context_length}")
    rope = f" (base {c.rope_base:g}" + (f", {c.rope_type} scaling {c.rope_scaling:g})" if c.rope_scaling != 1 else ")")
    options = (f"{c.norm}, {c.mlp}, {c.position} positions" + (rope if c.position == "rope" else "")
               + (f", sliding window {c.sliding_window}" if c.sliding_window else "")
               + (f", {c.n_experts} experts (top {c.n_experts_active})" if c.n_experts else "")
               + (", biases" if c.bias else ", no biases") + (", tied head" if c.tie_embeddings else ", untied head"))
    weights = summary["weights_bytes"]
    kv = summary["kv_cache_bytes_per_token"]
    rows = [
        ("architecture", shape),
        ("options", options),
        ("parameters", f"{_count(summary['parameters'])} ({_count(summary['non_embedding_parameters'])} "
                       f"non-embedding, {_count(summary['active_parameters'])} active per token)"),
        ("FLOPs / token", f"{_count(summary['flops_per_token_forward'])} forward, "
                          f"{_count(summary['flops_per_token_training'])} training (forward + backward)"),
        ("weights", ", ".join(f"{_bytes(size)} {name}" for name, size in weights.items())),
        ("KV cache", f"{_bytes(kv['bf16'])} per token bf16 ({_bytes(kv['fp32'])} fp32); "
                     f"{_bytes(summary['kv_cache_bytes_per_sequence_bf16'])} per full sequence bf16"),
        ("training state", f"{_bytes(summary['training_state_bytes_adamw_fp32'])} "
                           "(AdamW, fp32: weights + gradients + 2 moments; activations extra)"),
    ]
    return "\n".join(f"{label:<15} {text}" for label, text in rows)


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
