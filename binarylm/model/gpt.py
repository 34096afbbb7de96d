"""The decoder-only transformer: GPT-2 by default, Llama and friends by configuration.

    ids (B, T) -> token embedding (+ learned or sinusoidal positions) -> n_layer x Block -> norm -> logits (B, T, V)

With rotary positions nothing is added at the bottom; queries and keys are rotated
inside each attention layer instead. The output head shares its weights with the
token embedding unless `tie_embeddings` is off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from binarylm.config import ModelConfig
from binarylm.errors import BinaryLMError
from binarylm.model.kv_cache import KVCache
from binarylm.model.layers import Block, dropout, make_norm, residual_init_std
from binarylm.model.linear import Linear
from binarylm.model.losses import linear_cross_entropy
from binarylm.model.moe import MixtureOfExperts
from binarylm.model.positions import rotary_tables, sinusoidal_positions


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        if config.position == "learned":
            self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        self.dropout = config.dropout
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
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
        return_logits: bool = False, last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, V), None) for ids (B, T); with targets (B, T), (None, mean cross-entropy).

        With targets the head and the loss run fused (model/losses.py), never holding the
        (B, T, V) logits; `return_logits=True` computes them as well, the plain way.
        With a cache, `ids` continue the sequence(s) already stored in it (each row at its own
        position for a batched cache). `last_only` computes the logits of the last position
        only, (B, 1, V): all that generation needs after a prompt.
        """
        B, T = ids.shape
        x = self.hidden_states(ids, cache)  # (B, T, C)
        if targets is None:
            return self.lm_head(self._last_positions(x, cache) if last_only else x), None
        if not return_logits:
            loss = linear_cross_entropy(x.view(B * T, -1), self._head_weight(), targets.reshape(B * T))
            return None, self.with_balancing_loss(loss)
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, self.with_balancing_loss(loss)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, C): the final norm's output for ids (B, T), the vectors the output head reads. Heads of other
        kinds (a reward, value or class head) read them too."""
        T = ids.shape[1]
        end = (cache.length if cache is not None else 0) + T
        if end > self.config.context_length:
            raise BinaryLMError(
                f"sequence of {end} tokens is longer than the model's context of {self.config.context_length}; "
                "shorten the input"
            )
        positions = cache.positions(T) if cache is not None else torch.arange(T, device=ids.device)  # (T,) or (B, T)
        x = dropout(self._embed(ids, positions), self.dropout, self.training)  # (B, T, C)
        rotary = rotary_tables(positions, self.config) if self.config.position == "rope" else None
        for layer, block in enumerate(self.blocks):
            x = block(x, rotary, cache, layer)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x)  # (B, T, C)

    def with_balancing_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Training adds the experts' load-balancing loss; evaluation reports cross-entropy alone."""
        experts = self._mixtures()
        if not experts or not self.training:
            return loss
        balance = torch.stack([moe.aux_loss for moe in experts]).mean()
        return loss + self.config.moe_aux_weight * balance.to(loss.dtype)

    @staticmethod
    def _last_positions(x: torch.Tensor, cache) -> torch.Tensor:
        """(B, 1, C): each row's last real position (padded prompts of a batched cache end at their own)."""
        last = cache.last_index if cache is not None else None  # (B,) for padded prompts, else None
        if last is None:
            return x[:, -1:]
        return x[torch.arange(x.shape[0], device=x.device), last][:, None]

    def _head_weight(self) -> torch.Tensor:
        """The output head's float weight (V, C); a quantized head (model/quant.py) dequantizes its own."""
        dequantized = getattr(self.lm_head, "dequantized_weight", None)
        return self.lm_head.weight if dequantized is None else dequantized()

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, T, C): token embeddings plus, for absolute position schemes, the positions' vectors."""
        x = self.token_embedding(ids)
        if self.config.position == "learned":
            return x + self.position_embedding(positions)
        if self.config.position == "sinusoidal":
            return x + sinusoidal_positions(positions, self.config.d_model).to(x.dtype)
        return x

    def _mixtures(self) -> list[MixtureOfExperts]:
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MixtureOfExperts)]

    def expert_usage(self) -> list[list[float]]:
        """Per MoE layer, the share of routing slots each expert took in the last forward."""
        return [moe.usage.tolist() for moe in self._mixtures() if moe.usage is not None]

    def new_cache(self, batch_size: int, max_length: int | None = None, device=None, dtype=None) -> KVCache:
        config = self.config
        weight = self.token_embedding.weight
        return KVCache(config.n_layer, batch_size, config.n_kv_heads, max_length or config.context_length,
                       config.head_dim, device or weight.device, dtype or weight.dtype, window=config.sliding_window)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    # ------------------------------------------------------------- accounting

    def num_parameters(self, non_embedding: bool = False, active: bool = False) -> int:
        """Distinct parameters (a tied head counts once).

        non_embedding: without the token and position embeddings (the N of scaling laws);
        active: only the experts a token is routed to (the same as the total without MoE).
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.token_embedding.weight.numel()
            if self.config.position == "learned":
                total -= self.position_embedding.weight.numel()
        if active:
            for moe in self._mixtures():
                per_expert = sum(p.numel() for p in moe.experts[0].parameters())
                total -= (moe.n_experts - moe.top_k) * per_expert
        return total

    def flops_per_token(self, training: bool = True) -> int:
        """Matmul FLOPs per token at full context: 2 per active weight per token forward, plus attention.

        Forward: 2 * (active non-embedding weights + output head) + 2 * 2 * n_layer * span * n_head * head_dim
        (QK^T and attention x V over `span` keys: the context, or the sliding window). Training
        (forward + backward) is 3x that: the 6N + 12 L T d of the scaling-law papers.
        """
        c = self.config
        weights = self.num_parameters(non_embedding=True, active=True)  # an untied head is among these
        if c.tie_embeddings:
            weights += c.vocab_size * c.d_model  # the tied head's matmul still runs
        forward = 2 * weights + 4 * c.n_layer * c.attention_span * c.n_head * c.head_dim
        return 3 * forward if training else forward
