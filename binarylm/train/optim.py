"""The optimizer and the learning-rate schedule.

AdamW with decoupled weight decay, applied only to weight matrices: decaying
biases, norm gains or embeddings pulls them towards zero for no benefit.
The schedule warms up linearly (Adam's early steps are noisy because its
second-moment estimate is still empty), then follows a cosine down to a floor.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from binarylm.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear weights) decay; vectors (biases, norms) and embeddings do not."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # a tied weight appears once
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`, with the fused kernel where this PyTorch and device have it."""
    device = next(model.parameters()).device
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr,
        betas=(config.beta1, config.beta2), eps=1e-8, **({"fused": True} if fused else {}),
    )


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to config.lr, then cosine decay to config.lr * min_lr_ratio at max_steps."""
    floor = config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))
