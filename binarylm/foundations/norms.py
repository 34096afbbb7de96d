"""Normalisations and the GELU activation, written out in NumPy (forward only).

Every function works on the last axis of `x` (the feature axis, d); the leading axes, such as
(batch, time), are carried along untouched. tests/test_foundations.py checks each one against
`torch.nn.functional`.
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[float])  # NumPy has no erf of its own; the standard library's, elementwise


def layer_norm(x: np.ndarray, weight: np.ndarray | None = None, bias: np.ndarray | None = None,
               eps: float = 1e-5) -> np.ndarray:
    """Centre and scale each feature vector, then apply a learned gain and shift.

        mean = (1/d) sum_i x_i
        var  = (1/d) sum_i (x_i - mean)^2          (divided by d, not d - 1)
        y    = (x - mean) / sqrt(var + eps) * weight + bias

    x: (..., d); weight, bias: (d,) or None (gain 1, shift 0). Returns (..., d).
    """
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # (..., 1)
    y = (x - mean) / np.sqrt(var + eps)  # (..., d): zero mean, unit variance per row
    return _gain_and_shift(y, weight, bias)


def rms_norm(x: np.ndarray, weight: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """Scale each feature vector to unit root-mean-square; no centring, no shift (Llama's norm).

        rms = sqrt((1/d) sum_i x_i^2 + eps)
        y   = x / rms * weight

    x: (..., d); weight: (d,) or None (gain 1). Returns (..., d).
    """
    rms = np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    return _gain_and_shift(x / rms, weight, None)


def _gain_and_shift(y: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None) -> np.ndarray:
    """y * weight + bias, where a missing weight is 1 and a missing bias is 0."""
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def gelu(x: np.ndarray) -> np.ndarray:
    """The Gaussian error linear unit, exact form: x times the standard normal CDF of x.

        gelu(x) = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
    """
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with Phi approximated by a tanh, as GPT-2 computes it (and BinaryLM's MLP).

        gelu_tanh(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
    """
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
