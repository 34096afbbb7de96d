"""The decoder-only transformer (GPT-2 layout).

    ids (B, T) -> token embedding + position embedding -> n_layer x Block -> LayerNorm -> logits (B, T, V)

The output head shares its weights with the token embedding (tied), as GPT-2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from binarylm.config import ModelConfig
from binarylm.errors import BinaryLMError
from binarylm.model.kv_cache import KVCache
from binarylm.model.layers import Block, residual_init_std
from binarylm.model.losses import linear_cross_entropy


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual outputs scaled down, biases zero."""
        if isinstance(module, nn.Linear):
            std = residual_init_std(self.config.n_layer) if getattr(module, "is_residual_output", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, ids: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, V), None) for ids (B, T); with targets (B, T), (None, mean cross-entropy).

        With targets the head and the loss run fused (model/losses.py), never holding the
        (B, T, V) logits; `return_logits=True` computes them as well, the plain way.
        With a cache, `ids` continue the sequence already stored in it.
        """
        B, T = ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length:
            raise BinaryLMError(
                f"sequence of {start + T} tokens is longer than the model's context of {self.config.context_length}; "
                "shorten the input"
            )
        positions = torch.arange(start, start + T, device=ids.device)  # (T,)
        x = self.dropout(self.token_embedding(ids) + self.position_embedding(positions))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.advance(T)
        x = self.final_norm(x)  # (B, T, C)
        if targets is None:
            return self.lm_head(x), None
        if not return_logits:
            return None, linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T))
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def new_cache(self, batch_size: int, max_length: int | None = None, device=None, dtype=None) -> KVCache:
        config = self.config
        weight = self.token_embedding.weight
        return KVCache(config.n_layer, batch_size, config.n_head, max_length or config.context_length,
                       config.head_dim, device or weight.device, dtype or weight.dtype)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    # ------------------------------------------------------------- accounting

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied head counts once); optionally without the embeddings."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.position_embedding.weight.numel() + self.token_embedding.weight.numel()
        return total

    def flops_per_token(self, training: bool = True) -> int:
        """Matmul FLOPs per token at full context: 2 per weight per token forward, plus attention.

        Forward: 2 * (non-embedding weights + output head) + 2 * 2 * n_layer * context * d_model
        (QK^T and attention x V). Training (forward + backward) is 3x that: the 6N + 12 L T d of
        the scaling-law papers.
        """
        c = self.config
        weights = self.num_parameters(non_embedding=True) + c.vocab_size * c.d_model
        forward = 2 * weights + 4 * c.n_layer * c.context_length * c.d_model
        return 3 * forward if training else forward
