"""The pieces of a transformer block: causal self-attention and the feed-forward MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from binarylm.config import ModelConfig
from binarylm.model.kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past.

    One matrix computes queries, keys and values for all heads at once (fused
    QKV); PyTorch's scaled_dot_product_attention then runs the fused kernel
    (flash attention where the device has it) for softmax(QK^T / sqrt(d)) V.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.is_residual_output = True  # scaled down at init, see Transformer._init_weights
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(layer, k, v)  # (B, H, past + T, D)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=_causal_mask(T, past, x.device) if past and T > 1 else None,
            is_causal=past == 0 and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


def _causal_mask(new: int, past: int, device: torch.device) -> torch.Tensor:
    """(new, past + new) booleans: query i (at position past + i) may see keys 0 .. past + i."""
    keys = torch.arange(past + new, device=device)
    queries = torch.arange(past, past + new, device=device)
    return keys[None, :] <= queries[:, None]


class MLP(nn.Module):
    """Position-wise feed-forward: widen to d_ff, GELU, project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.down.is_residual_output = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x), approximate="tanh")))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.residual_dropout(self.attn(self.norm1(x), cache, layer))
        return x + self.mlp(self.norm2(x))


def residual_init_std(n_layer: int) -> float:
    """GPT-2 scales the init of layers that write into the residual stream by 1/sqrt(2 * n_layer)."""
    return 0.02 / math.sqrt(2 * n_layer)
