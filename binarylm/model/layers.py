"""The pieces of a transformer block: norms, causal self-attention and the feed-forward layers.

Which piece a model uses is a ModelConfig field (norm, mlp, n_kv_heads,
sliding_window, n_experts); `make_norm` and `make_feed_forward` pick it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from binarylm.config import ModelConfig
from binarylm.model.kv_cache import KVCache, visible_keys
from binarylm.model.linear import Linear
from binarylm.model.moe import MixtureOfExperts
from binarylm.model.positions import apply_rotary

Rotary = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (T, head_dim)


# ------------------------------------------------------------------ dropout


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout while training; otherwise x itself, with no call at all (decoding passes here 13 times a
    token, where an nn.Dropout module call and F.dropout would be pure overhead)."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


# ------------------------------------------------------------------ norms


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean subtraction and the bias (Llama).

    Computed in float32 whatever the input dtype, then cast back, as Llama does.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., C)
        return self.weight * normed.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


# ------------------------------------------------------------------ attention


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past.

    One matrix computes queries, keys and values at once (fused QKV): its output
    rows are [n_head query heads | n_kv_heads key heads | n_kv_heads value heads].
    With n_kv_heads < n_head (grouped-query attention; 1 is multi-query) each
    key/value head is shared by n_head / n_kv_heads query heads, which shrinks the
    KV cache by the same factor. PyTorch's scaled_dot_product_attention runs
    softmax(QK^T / sqrt(d)) V in a fused kernel (flash attention where the device
    has it). A sliding window limits each query to the last `sliding_window` keys.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.n_kv_heads, config.head_dim
        self.window = config.sliding_window
        self.qkv = Linear(config.d_model, (config.n_head + 2 * config.n_kv_heads) * config.head_dim,
                          bias=config.bias)
        self.proj = Linear(config.n_head * config.head_dim, config.d_model, bias=config.bias)
        self.proj.is_residual_output = True  # scaled down at init, see Transformer._init_weights
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, rotary: Rotary | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        mask = self._mask(T, cache, x.device)  # (T, L) or None for plain causal
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, KV, L, D): the cached positions, then these T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and cache is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != self.n_head,
        )  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, C)

    def _mask(self, new: int, cache: KVCache | None, device: torch.device) -> torch.Tensor | None:
        """Which keys each new query may see, or None where plain causal attention is exact (the fast path)."""
        if cache is not None:
            return cache.mask(new, self.window)
        if not self.window or new <= self.window:
            return None
        positions = torch.arange(new, device=device)
        return visible_keys(positions, positions, self.window)


# ------------------------------------------------------------------ feed-forward


class GeluMLP(nn.Module):
    """GPT-2's feed-forward: widen to d_ff, GELU (tanh approximation), project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down = Linear(config.d_ff, config.d_model, bias=config.bias)
        self.down.is_residual_output = True
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.down(F.gelu(self.up(x), approximate="tanh")), self.dropout, self.training)  # (B, T, C)


class SwiGLU(nn.Module):
    """Llama's gated feed-forward: down(silu(gate(x)) * up(x)).

    The gate decides, per hidden unit, how much of up(x) passes. Three matrices
    instead of two, so d_ff is ~8/3 d_model (not 4 d_model) for the same parameters.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up = Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down = Linear(config.d_ff, config.d_model, bias=config.bias)
        self.down.is_residual_output = True
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.down(F.silu(self.gate(x)) * self.up(x)), self.dropout, self.training)  # (B, T, C)


def make_mlp(config: ModelConfig) -> nn.Module:
    """One dense feed-forward network of the configured kind."""
    return SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)


def make_feed_forward(config: ModelConfig) -> nn.Module:
    """The block's feed-forward: one dense MLP, or a mixture of n_experts of them."""
    return MixtureOfExperts(config, make_mlp) if config.n_experts else make_mlp(config)


# ------------------------------------------------------------------ the block


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = make_feed_forward(config)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, rotary: Rotary | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + dropout(self.attn(self.norm1(x), rotary, cache, layer), self.dropout, self.training)
        return x + self.mlp(self.norm2(x))


def residual_init_std(n_layer: int) -> float:
    """GPT-2 scales the init of layers that write into the residual stream by 1/sqrt(2 * n_layer)."""
    return 0.02 / math.sqrt(2 * n_layer)
