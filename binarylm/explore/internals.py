"""What the model computes for one prompt, caught in one forward pass (the reply of POST /v1/internals).

Hooks on the real modules record what flows through them while the model runs as it always
does; nothing here is a second copy of its forward. Per block they catch:

- the residual stream entering the block, after its attention, and leaving it. Every block
  reads this stream and adds its result to it, so its size (the L2 norm at each position)
  shows how much each block writes.
- the attention's fused q/k/v projection, from which the attention pattern is rebuilt with
  the module's own head layout, rotary angles and key/value sharing. The fused kernel the
  model uses never materialises the pattern, so this rebuild is the only way to see it:

      raw     = q k^T                  how well query i matches key j (H, T, T)
      scaled  = raw / sqrt(head_dim)   a dot product of two random head_dim-vectors grows like
                                       sqrt(head_dim); dividing keeps the scores near unit size,
                                       so the softmax neither saturates nor flattens with width
      masked  = scaled, with -inf where query i may not look: at keys after it (the future a
                causal model must not see) and, with a sliding window, at keys too far back
      softmax = softmax(masked) along each row: the weights with which position i averages the
                values v; each row sums to 1, and exp(-inf) makes every masked weight exactly 0

  q and k are taken after the rotary rotation where the model uses rotary positions, which is
  what makes the scores depend on the distance between positions. With grouped-query attention
  several query heads share one key/value head; k and v are repeated so head h sits beside the
  key/value head it really reads (as `enable_gqa` pairs them).
- the MLP's hidden activations, the input of its down projection: gelu(up x) for GPT-2,
  silu(gate x) * up x for SwiGLU. A mixture of experts has no single hidden layer (each token
  runs through its own experts), so there it is null.
- the logit lens: the final norm and the output head applied to each block's output, as if the
  model stopped there. It shows what the stream "predicts" after each block and how the guess
  sharpens with depth. After the last block it is the model's own prediction; this reply takes
  that row from the model's own logits, so the two are the same numbers.

The hooks record only the calling thread's forward: a served model may be generating for
someone else at the same moment, through the same modules.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import nn

from binarylm.errors import BinaryLMError
from binarylm.explore.arrays import encode_array
from binarylm.model.kv_cache import visible_keys
from binarylm.model.moe import MixtureOfExperts
from binarylm.model.positions import apply_rotary, sinusoidal_positions

MAX_TOP_K = 20
NEXT_IDS = 200
CONFIG_FIELDS = ("n_layer", "n_head", "n_kv_heads", "head_dim", "d_model", "d_ff", "vocab_size", "context_length",
                 "position", "norm", "mlp")

Rotary = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (T, head_dim)


@dataclass
class BlockCapture:
    """What one block received, computed and returned for the prompt (batch dimension dropped)."""

    input: torch.Tensor  # (T, C) the residual stream entering the block
    rotary: Rotary | None  # the rotary tables the attention used, or None
    qkv: torch.Tensor  # (T, (H + 2 KV) * D) the fused query/key/value projection
    after_attention: torch.Tensor  # (T, C) the stream after the attention's contribution
    hidden: torch.Tensor | None  # (T, d_ff) the MLP's activations; None for a mixture of experts
    output: torch.Tensor  # (T, C) the stream leaving the block


@dataclass
class Capture:
    token: torch.Tensor  # (T, C) token embeddings
    position: torch.Tensor | None  # (T, C) the added position vectors; None with rotary positions
    blocks: list[BlockCapture]
    logits: torch.Tensor  # (T, V) the model's own output


# ------------------------------------------------------------------ the reply


def internals(model: nn.Module, tokenizer, ids: list[int], top_k: int = 5, next_ids: int = NEXT_IDS) -> dict:
    """The reply of POST /v1/internals for `ids` (see binarylm/explore/__init__.py), less `checkpoint` and
    `timing_ms`, which the server adds. One forward pass; the model's train/eval mode is restored after."""
    ids = check_request(model.config, ids, top_k, next_ids)
    with _evaluating(model):
        captured = capture(model, ids)
        layers = [_layer_reply(block, seen, lens, top_k, tokenizer)
                  for block, seen, lens in zip(model.blocks, captured.blocks, _lens_logits(model, captured))]
    return {
        "config": {name: getattr(model.config, name) for name in CONFIG_FIELDS},
        "tokens": [{"id": i, "text": text, "bytes": _token_bytes(tokenizer, i).hex()}
                   for i, text in zip(ids, token_texts(tokenizer, ids))],
        "embeddings": {"token": encode_array(captured.token),
                       "position": None if captured.position is None else encode_array(captured.position),
                       "sum": encode_array(captured.blocks[0].input)},  # the stream entering block 0
        "layers": layers,
        "next_token": _next_token(captured.logits[-1], next_ids, tokenizer),
    }


def check_request(config, ids, top_k: int, next_ids: int) -> list[int]:
    """The ids as a list of ints, or a BinaryLMError naming what is wrong with the request."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise BinaryLMError(f"ids must be a list of token ids; got {type(ids).__name__}")
    ids = list(ids)
    if not ids:
        raise BinaryLMError("the prompt has no tokens; give at least one token id (or non-empty text)")
    if not all(_is_int(i) for i in ids):
        raise BinaryLMError(f"token ids must be integers; got {next(i for i in ids if not _is_int(i))!r}")
    if len(ids) > config.context_length:
        raise BinaryLMError(f"the prompt has {len(ids)} tokens, more than the model's context of "
                            f"{config.context_length}; shorten it")
    outside = [i for i in ids if not 0 <= i < config.vocab_size]
    if outside:
        raise BinaryLMError(f"token id {outside[0]} is outside the vocabulary (ids run from 0 to "
                            f"{config.vocab_size - 1})")
    if not _is_int(top_k) or not 1 <= top_k <= MAX_TOP_K:
        raise BinaryLMError(f"top_k must be an integer from 1 to {MAX_TOP_K}; got {top_k!r}")
    if not _is_int(next_ids) or next_ids < 1:
        raise BinaryLMError(f"next_ids must be a positive integer; got {next_ids!r}")
    return [int(i) for i in ids]


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _layer_reply(block: nn.Module, seen: BlockCapture, lens: torch.Tensor, top_k: int, tokenizer) -> dict:
    q, k, v = attention_heads(block.attn, seen.qkv, seen.rotary)  # (H, T, D) each
    pattern = attention_pattern(q, k, block.attn.window)
    return {
        "attention": {name: encode_array(scores) for name, scores in pattern.items()},
        "q": encode_array(q), "k": encode_array(k), "v": encode_array(v),
        "mlp": None if seen.hidden is None else encode_array(seen.hidden),
        "residual_norm": {name: _norms(stream) for name, stream in
                          (("input", seen.input), ("after_attention", seen.after_attention), ("output", seen.output))},
        "logit_lens": _top_tokens(lens, top_k, tokenizer),
    }


def _next_token(logits: torch.Tensor, count: int, tokenizer) -> dict:
    """The raw last-position logits (V,) and the `count` likeliest ids with their texts."""
    ids = logits.topk(min(count, logits.shape[-1])).indices.tolist()
    return {"logits": encode_array(logits), "ids": ids, "texts": token_texts(tokenizer, ids)}


def _top_tokens(logits: torch.Tensor, k: int, tokenizer) -> dict:
    """The k likeliest tokens at each position of logits (T, V), with their probabilities."""
    probs, ids = torch.softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)  # (T, k) each
    ids = ids.tolist()
    return {"ids": ids, "texts": [token_texts(tokenizer, row) for row in ids], "probs": probs.tolist()}


def _norms(stream: torch.Tensor) -> list[float]:
    return torch.linalg.vector_norm(stream.float(), dim=-1).tolist()  # (T,)


# ------------------------------------------------------------------ tokens as text


def token_texts(tokenizer, ids: Iterable[int]) -> list[str]:
    """Each token decoded alone; bytes that are not valid UTF-8 on their own become U+FFFD."""
    return [_token_bytes(tokenizer, i).decode("utf-8", errors="replace") for i in ids]


def _token_bytes(tokenizer, token_id: int) -> bytes:
    """The token's bytes; empty for an id the model has but the tokenizer never assigned (a padded vocabulary)."""
    try:
        return tokenizer.decode_bytes([token_id])
    except BinaryLMError:
        return b""


# ------------------------------------------------------------------ attention, rebuilt


def attention_heads(attn: nn.Module, qkv: torch.Tensor, rotary: Rotary | None) -> tuple[torch.Tensor, ...]:
    """q, k, v (H, T, D) each, float32, from the fused projection's output (T, (H + 2 KV) * D).

    Split as the module splits it, rotated where it rotates, and k, v repeated from KV to H heads
    so query head h sits beside the key/value head h // (H / KV) it reads.
    """
    H, KV, D = attn.n_head, attn.n_kv_heads, attn.head_dim
    T = qkv.shape[0]
    q, k, v = qkv.float().split([H * D, KV * D, KV * D], dim=-1)  # (T, H*D), (T, KV*D), (T, KV*D)
    q = q.reshape(T, H, D).transpose(0, 1)  # (H, T, D)
    k = k.reshape(T, KV, D).transpose(0, 1)  # (KV, T, D)
    v = v.reshape(T, KV, D).transpose(0, 1)  # (KV, T, D)
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)  # (H, T, D), (KV, T, D)
    group = H // KV
    return q, k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # (H, T, D) each


def attention_pattern(q: torch.Tensor, k: torch.Tensor, window: int = 0) -> dict[str, torch.Tensor]:
    """raw, scaled, masked and softmax (H, T, T) each, from q and k (H, T, D) (see the module docstring)."""
    T, D = q.shape[1], q.shape[2]
    raw = q @ k.transpose(1, 2)  # (H, T, T): query i . key j
    scaled = raw / math.sqrt(D)  # (H, T, T)
    positions = torch.arange(T, device=q.device)  # (T,)
    visible = visible_keys(positions, positions, window)  # (T, T): key j <= query i (and within the window)
    masked = scaled.masked_fill(~visible, float("-inf"))  # (H, T, T)
    return {"raw": raw, "scaled": scaled, "masked": masked, "softmax": torch.softmax(masked, dim=-1)}


# ------------------------------------------------------------------ the forward pass, recorded


def capture(model: nn.Module, ids: list[int]) -> Capture:
    """Run the model once on `ids` with hooks on its modules; what they saw, and its logits (T, V).

    Call it under torch.no_grad() with the model in eval mode (as `internals` does).
    """
    recorder = _Recorder()
    _hook_modules(recorder, model)
    try:
        logits, _ = model(torch.tensor([ids], device=model.device))  # (1, T, V)
    finally:
        recorder.remove()
    seen = recorder.seen
    return Capture(token=seen["token"][0], position=_position_vectors(model, seen, len(ids)),
                   blocks=[_block_capture(seen, layer) for layer in range(len(model.blocks))], logits=logits[0])


def _hook_modules(recorder: _Recorder, model: nn.Module) -> None:
    recorder.outputs(model.token_embedding, "token")
    if model.config.position == "learned":
        recorder.outputs(model.position_embedding, "position")
    for layer, block in enumerate(model.blocks):
        recorder.inputs(block, f"{layer}.input")
        recorder.outputs(block.attn.qkv, f"{layer}.qkv")
        recorder.inputs(block.norm2, f"{layer}.after_attention")  # norm2 reads the stream after attention
        if not isinstance(block.mlp, MixtureOfExperts):
            recorder.inputs(block.mlp.down, f"{layer}.hidden")  # down reads the activated hidden units
        recorder.outputs(block, f"{layer}.output")


def _block_capture(seen: dict, layer: int) -> BlockCapture:
    hidden = f"{layer}.hidden"
    return BlockCapture(
        input=_argument(seen, f"{layer}.input")[0],  # (T, C)
        rotary=_argument(seen, f"{layer}.input", 1, "rotary"),  # Block.forward(x, rotary, cache, layer)
        qkv=seen[f"{layer}.qkv"][0],  # (T, (H + 2 KV) * D)
        after_attention=_argument(seen, f"{layer}.after_attention")[0],  # (T, C)
        hidden=_argument(seen, hidden)[0] if hidden in seen else None,  # (T, d_ff)
        output=seen[f"{layer}.output"][0],  # (T, C)
    )


def _argument(seen: dict, name: str, index: int = 0, keyword: str = ""):
    """Argument `index` (or `keyword`) of the call recorded as seen[name]."""
    args, kwargs = seen[name]
    return args[index] if len(args) > index else kwargs.get(keyword)


def _position_vectors(model: nn.Module, seen: dict, length: int) -> torch.Tensor | None:
    """(T, C): what was added to the token embeddings for position; None where nothing was (rotary)."""
    if model.config.position == "learned":
        return seen["position"]  # (T, C)
    if model.config.position == "sinusoidal":
        positions = torch.arange(length, device=model.device)  # (T,)
        return sinusoidal_positions(positions, model.config.d_model)  # (T, C), the table the model adds
    return None


def _lens_logits(model: nn.Module, captured: Capture) -> Iterator[torch.Tensor]:
    """(T, V) per block, one at a time: the final norm and output head on the block's output.

    The last block's are the model's own logits, which that same computation produced in the forward.
    """
    for seen in captured.blocks[:-1]:
        yield model.lm_head(model.final_norm(seen.output))  # (T, V)
    yield captured.logits  # (T, V)


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the model's own mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class _Recorder:
    """Forward hooks that keep what modules receive (inputs) or return (outputs), for this thread only."""

    def __init__(self):
        self.seen: dict[str, object] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._thread = threading.get_ident()

    def inputs(self, module: nn.Module, name: str) -> None:
        """Keep (args, kwargs) of each call of `module` as seen[name]."""
        def hook(_module, args, kwargs):
            self._keep(name, (args, kwargs))
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def outputs(self, module: nn.Module, name: str) -> None:
        """Keep the output of each call of `module` as seen[name]."""
        def hook(_module, _args, output):
            self._keep(name, output)
        self._handles.append(module.register_forward_hook(hook))

    def _keep(self, name: str, value) -> None:
        if threading.get_ident() == self._thread:
            self.seen[name] = value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
