"""A mixture-of-experts feed-forward: many MLPs, each token routed to the top k of them.

    router(x) -> softmax over experts -> keep the k most probable -> renormalise
    y = sum over the chosen experts e of  p_e * expert_e(x)

Parameters grow with the number of experts; compute per token grows only with
k. Left alone, a router tends to send everything to a few experts, so training
adds a load-balancing loss (the Switch Transformer's):

    aux = n_experts * sum_e  f_e * P_e

where f_e is the fraction of routing slots that went to expert e and P_e the
mean router probability of e. It is 1 when the load is perfectly even and grows
as the router concentrates. `usage` keeps the last forward's f for reporting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from binarylm.config import ModelConfig


class MixtureOfExperts(nn.Module):
    def __init__(self, config: ModelConfig, make_expert: Callable[[ModelConfig], nn.Module]):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.n_experts_active
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert(config) for _ in range(config.n_experts))
        self.aux_loss: torch.Tensor | None = None  # the last forward's load-balancing loss (a scalar)
        self.usage: torch.Tensor | None = None  # (n_experts,) the last forward's share of routing slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)  # (N, C)
        probs = F.softmax(self.router(tokens).float(), dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k) each
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)  # (N, k)
        out = torch.zeros_like(tokens)  # (N, C)
        for index, expert in enumerate(self.experts):
            rows, slot = (chosen == index).nonzero(as_tuple=True)  # tokens routed to this expert
            out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot, None])
        self._account(probs, chosen)
        return out.view(B, T, C)

    def _account(self, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        share = F.one_hot(chosen, self.n_experts).float().mean(dim=(0, 1))  # (E,) f_e, sums to 1
        self.aux_loss = self.n_experts * (share * probs.mean(dim=0)).sum()
        self.usage = share.detach()
