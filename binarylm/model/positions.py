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

import math

import torch

from binarylm.config import ModelConfig


def sinusoidal_positions(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """(..., T, d_model) float32: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    angles = _angles(positions, d_model, base=10000.0)  # (..., T, d_model / 2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., T, d_model), sin/cos interleaved


def rotary_tables(positions: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (..., T, head_dim) float32, for rotating queries and keys at `positions` (..., T).

    Dimension pair i (i < head_dim / 2) turns by the angle position * frequency_i
    (`rope_frequencies`). The pairs are (x[i], x[i + head_dim / 2]): the "rotate half" layout of
    GPT-NeoX and Hugging Face's Llama, so their weights load as they are.
    """
    frequencies = rope_frequencies(config, positions.device)  # (head_dim / 2,)
    angles = positions.to(torch.float32)[..., None] * frequencies  # (..., T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, head_dim)
    return angles.cos(), angles.sin()


def rope_frequencies(config: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """(head_dim / 2,) float32: base^(-2i / head_dim), slowed by `rope_scaling` s.

    linear (position interpolation): every frequency / s, so a model trained at context L reads
    positions up to L * s.
    llama3 (Llama 3.1): with L0 = rope_original_context, a pair whose wavelength 2 pi / f is
    shorter than L0 / high_freq_factor keeps f (it resolves nearby tokens, which scaling would blur);
    one longer than L0 / low_freq_factor gets f / s; in between, (1 - a) f / s + a f with
    a = (L0 / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor).
    """
    exponents = torch.arange(0, config.head_dim, 2, device=device, dtype=torch.float32) / config.head_dim
    frequencies = 1.0 / config.rope_base ** exponents  # (head_dim / 2,)
    slowed = frequencies / config.rope_scaling
    if config.rope_type == "linear":
        return slowed
    low, high, original = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_original_context
    wavelengths = 2 * math.pi / frequencies
    blend = ((original / wavelengths - low) / (high - low)).clamp(0.0, 1.0)  # 0 for long waves, 1 for short ones
    return (1 - blend) * slowed + blend * frequencies


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
