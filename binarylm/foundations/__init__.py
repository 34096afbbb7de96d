"""Teaching code: the steps of a transformer written out in NumPy, each tested against the real thing.

- `mlp`: a multilayer perceptron with backpropagation by hand, and a finite-difference gradient check.
- `norms`: LayerNorm, RMSNorm and GELU (exact and tanh), forward passes with their formulas.
- `attention`: self-attention built up step by step, from a weightless dot-product average to fused
  multi-head attention with grouped-query heads and a sliding window, as `binarylm.model` runs it.

tests/test_foundations.py holds the proofs: against PyTorch and against BinaryLM's production modules.
"""

from binarylm.foundations.attention import (
    causal_mask,
    causal_self_attention,
    multi_head_attention_fused,
    multi_head_attention_separate,
    scaled_dot_product_attention,
    self_attention,
    simplified_attention,
    softmax,
)
from binarylm.foundations.mlp import MLP, gradient_check, loss_and_gradients, sgd_step, train_step
from binarylm.foundations.norms import gelu, gelu_tanh, layer_norm, rms_norm

__all__ = [
    "MLP",
    "causal_mask",
    "causal_self_attention",
    "gelu",
    "gelu_tanh",
    "gradient_check",
    "layer_norm",
    "loss_and_gradients",
    "multi_head_attention_fused",
    "multi_head_attention_separate",
    "rms_norm",
    "scaled_dot_product_attention",
    "self_attention",
    "sgd_step",
    "simplified_attention",
    "softmax",
    "train_step",
]
