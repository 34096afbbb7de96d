"""How the model knows where a token is: learned, sinusoidal and rotary positions.

Attention itself is blind to order (permuting the keys permutes nothing in the
result), so position has to be put in:

- learned (GPT-2): a trained vector per position, added to the token embedding;
- sinusoidal (the original transformer): a fixed vector of sines and cosines at
  geometrically spaced wavelengths, added the same way;
- rotary, RoPE (Llama): nothing is added; instead each query and key is rotated,
  pair of dimensions by pair, by an angle proportional to its position, so the
  dot product q_m . k_n depends on the offset m - n only.

The sinusoidal and rotary tables are computed for the positions at hand in
float32 on every forward (a few thousand sin/cos), so they never lose precision
when the weights are cast to bfloat16 and there is no buffer to save or move.
"""

from __future__ import annotations

import torch

from binarylm.config import ModelConfig


def sinusoidal_positions(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """(..., T, d_model) float32: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    angles = _angles(positions, d_model, base=10000.0)  # (..., T, d_model / 2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., T, d_model), sin/cos interleaved


def rotary_tables(positions: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (..., T, head_dim) float32, for rotating queries and keys at `positions` (..., T).

    Dimension pair i (i < head_dim / 2) turns by the angle position * base^(-2i / head_dim);
    linear scaling divides every angle by `rope_scaling` (position interpolation), so a model
    trained at context L reads positions up to L * rope_scaling.
    The pairs are (x[i], x[i + head_dim / 2]): the "rotate half" layout of GPT-NeoX and
    Hugging Face's Llama, so their weights load as they are.
    """
    angles = _angles(positions, config.head_dim, config.rope_base) / config.rope_scaling  # (..., T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + D/2]) pair of x (B, H, T, D) by its angle: (a, b) -> (a cos - b sin, b cos + a sin).

    cos and sin are (T, D), or (B, T, D) when each row of the batch is at its own positions.
    """
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): the same angles for every head
    first, second = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    rotated_half = torch.cat((-second, first), dim=-1)  # (B, H, T, D)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


def _angles(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """(..., T, dim / 2): position * base^(-2i / dim) for i in 0 .. dim / 2 - 1."""
    inverse_frequencies = 1.0 / base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    return positions.to(torch.float32)[..., None] * inverse_frequencies
