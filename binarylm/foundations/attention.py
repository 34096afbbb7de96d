"""Self-attention, built up one idea at a time, in NumPy.

Read from top to bottom; each step adds one idea to the step before it.

1. `simplified_attention`: every token becomes an average of all tokens, weighted by dot-product similarity.
2. `self_attention`: learned projections turn tokens into queries, keys and values; scores are scaled by
   1/sqrt(d_k).
3. `causal_self_attention`: a mask hides the future (and, with a sliding window, the distant past).
4. `multi_head_attention_separate`: several small heads side by side, concatenated, then mixed by an
   output projection.
5. `multi_head_attention_fused`: the same arithmetic as one matmul and a few reshapes, as
   `binarylm.model.layers.CausalSelfAttention` runs it; with grouped-query attention several query heads
   share one key/value head.

Conventions: a sequence x is (T, d_model): T tokens, one row each. Leading batch axes, (..., T, d_model),
work as well, since every operation broadcasts over them. A projection's weight is (d_in, d_out), so it
reads `x @ w + b`; PyTorch's nn.Linear stores the transpose, (d_out, d_in). tests/test_foundations.py
checks every step against the next one, against PyTorch, and against the production module.
"""

from __future__ import annotations

import numpy as np


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(s_j) / sum_j' exp(s_j') along `axis`. A score of -inf gets weight exactly 0.

    Subtracting the maximum first changes nothing mathematically and keeps exp from overflowing.
    """
    exps = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return exps / exps.sum(axis=axis, keepdims=True)


def project(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """A linear layer: (..., d_in) @ (d_in, d_out) + (d_out,) -> (..., d_out)."""
    y = x @ weight
    return y if bias is None else y + bias


# ---------------------------------------------------------------- step 1: no weights at all


def simplified_attention(x: np.ndarray) -> np.ndarray:
    """Each output row is a weighted average of all rows of x; similar rows weigh more.

        scores  = x x^T                 scores[i, j] = <x_i, x_j>
        weights = softmax(scores)       row by row: each row is positive and sums to 1
        context = weights x             row i = sum_j weights[i, j] x_j

    x: (T, d). Returns (T, d).
    """
    scores = x @ x.swapaxes(-1, -2)  # (T, d) @ (d, T) -> (T, T)
    weights = softmax(scores)  # (T, T)
    return weights @ x  # (T, T) @ (T, d) -> (T, d)


# ---------------------------------------------------------------- step 2: queries, keys, values


def scaled_dot_product_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                                 mask: np.ndarray | None = None) -> np.ndarray:
    """softmax(q k^T / sqrt(d_k)) v, where the mask (True = may attend) sets hidden scores to -inf.

    Why divide by sqrt(d_k): a dot product of d_k terms of unit variance has variance d_k; scaling it
    back to about 1 keeps the softmax from saturating into a one-hot (and its gradients from vanishing).

    q: (..., T_q, d_k); k: (..., T_k, d_k); v: (..., T_k, d_v); mask: (T_q, T_k) booleans or None.
    Returns (..., T_q, d_v).
    """
    d_k = q.shape[-1]
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(d_k)  # (..., T_q, d_k) @ (..., d_k, T_k) -> (..., T_q, T_k)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)  # (..., T_q, T_k)
    weights = softmax(scores)  # (..., T_q, T_k), each row sums to 1
    return weights @ v  # (..., T_q, T_k) @ (..., T_k, d_v) -> (..., T_q, d_v)


def self_attention(x: np.ndarray, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray,
                   b_q: np.ndarray | None = None, b_k: np.ndarray | None = None, b_v: np.ndarray | None = None,
                   mask: np.ndarray | None = None) -> np.ndarray:
    """Scaled dot-product attention over learned projections of x.

        q = x W_q + b_q,   k = x W_k + b_k,   v = x W_v + b_v
        context = softmax(q k^T / sqrt(d_k)) v

    A token's query asks "what am I looking for?", each key answers "what do I contain?", and the
    values are what gets mixed. x: (T, d_model); w_q, w_k: (d_model, d_k); w_v: (d_model, d_v).
    Returns (T, d_v).
    """
    q = project(x, w_q, b_q)  # (T, d_k)
    k = project(x, w_k, b_k)  # (T, d_k)
    v = project(x, w_v, b_v)  # (T, d_v)
    return scaled_dot_product_attention(q, k, v, mask)  # (T, d_v)


# ---------------------------------------------------------------- step 3: no peeking at the future


def causal_mask(length: int, window: int = 0) -> np.ndarray:
    """(T, T) booleans, True where query i may see key j: j <= i, and with a window also i - j < window.

    A window of w lets each query see at most w keys, itself included; window 0 means no limit.
    """
    query = np.arange(length)[:, None]  # (T, 1)
    key = np.arange(length)[None, :]  # (1, T)
    visible = key <= query  # (T, T): lower triangle, diagonal included
    if window > 0:
        visible &= query - key < window  # (T, T): a band of width `window` below the diagonal
    return visible


def causal_self_attention(x: np.ndarray, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray,
                          b_q: np.ndarray | None = None, b_k: np.ndarray | None = None,
                          b_v: np.ndarray | None = None, window: int = 0) -> np.ndarray:
    """`self_attention` where token i attends only to tokens 0 .. i (the last `window` of them, if set).

    This is what lets a language model train on every position at once: the prediction at position i
    cannot see the token it is asked to predict. x: (T, d_model). Returns (T, d_v).
    """
    mask = causal_mask(x.shape[-2], window)  # (T, T)
    return self_attention(x, w_q, w_k, w_v, b_q, b_k, b_v, mask=mask)  # (T, d_v)


# ---------------------------------------------------------------- step 4: several heads, one by one


def head_columns(head: int, head_dim: int) -> slice:
    """The columns of a projection that belong to one head: [head * head_dim, (head + 1) * head_dim)."""
    return slice(head * head_dim, (head + 1) * head_dim)


def _columns(array: np.ndarray | None, columns: slice) -> np.ndarray | None:
    """array[..., columns] for a weight (d_in, d_out) or a bias (d_out,); None stays None."""
    return None if array is None else array[..., columns]


def multi_head_attention_separate(x: np.ndarray, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray,
                                  w_o: np.ndarray, n_head: int, *, n_kv_heads: int = 0,
                                  b_q: np.ndarray | None = None, b_k: np.ndarray | None = None,
                                  b_v: np.ndarray | None = None, b_o: np.ndarray | None = None,
                                  window: int = 0) -> np.ndarray:
    """Multi-head causal attention as a loop: each head is step 3 on its own slice of the projections.

    Head h owns columns h * head_dim .. (h + 1) * head_dim of w_q. Each head attends in its own small
    subspace, so different heads can follow different relations; their outputs are concatenated and
    mixed by the output projection w_o.

    With grouped-query attention (0 < n_kv_heads < n_head), consecutive groups of n_head // n_kv_heads
    query heads share one key/value head: query head h reads key/value head h // group.

    x: (T, d_model); w_q: (d_model, n_head * head_dim); w_k, w_v: (d_model, n_kv_heads * head_dim);
    w_o: (n_head * head_dim, d_model); n_kv_heads 0 means n_head. Returns (T, d_model).
    """
    n_kv_heads = _kv_heads(n_head, n_kv_heads)
    head_dim = w_q.shape[-1] // n_head
    group = n_head // n_kv_heads  # query heads per key/value head
    head_outputs = []
    for head in range(n_head):
        q_cols = head_columns(head, head_dim)
        kv_cols = head_columns(head // group, head_dim)
        head_output = causal_self_attention(
            x, w_q[:, q_cols], w_k[:, kv_cols], w_v[:, kv_cols],
            _columns(b_q, q_cols), _columns(b_k, kv_cols), _columns(b_v, kv_cols), window=window,
        )  # (T, head_dim)
        head_outputs.append(head_output)
    concatenated = np.concatenate(head_outputs, axis=-1)  # (T, n_head * head_dim)
    return project(concatenated, w_o, b_o)  # (T, d_model)


def _kv_heads(n_head: int, n_kv_heads: int) -> int:
    """The number of key/value heads (0 means n_head), checked to divide the query heads evenly."""
    n_kv_heads = n_kv_heads or n_head
    if n_head % n_kv_heads:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_heads ({n_kv_heads})")
    return n_kv_heads


# ---------------------------------------------------------------- step 5: all heads in one matmul


def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """(..., T, n_heads * head_dim) -> (..., n_heads, T, head_dim): each head becomes its own sequence."""
    *batch, length, width = x.shape
    x = x.reshape(*batch, length, n_heads, width // n_heads)  # (..., T, n_heads, head_dim)
    return x.swapaxes(-2, -3)  # (..., n_heads, T, head_dim)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(..., n_heads, T, head_dim) -> (..., T, n_heads * head_dim): the heads side by side, as concatenation."""
    x = x.swapaxes(-2, -3)  # (..., T, n_heads, head_dim)
    return x.reshape(*x.shape[:-2], -1)  # (..., T, n_heads * head_dim)


def multi_head_attention_fused(x: np.ndarray, w_qkv: np.ndarray, w_o: np.ndarray, n_head: int, *,
                               n_kv_heads: int = 0, b_qkv: np.ndarray | None = None,
                               b_o: np.ndarray | None = None, window: int = 0) -> np.ndarray:
    """Step 4 without the loop: one projection makes q, k and v for every head; reshapes make the heads.

    w_qkv is the three projections side by side, np.concatenate([w_q, w_k, w_v], axis=1): its columns are
    [all query heads | all key heads | all value heads], head_dim columns per head; b_qkv likewise.
    The heads then run as one batched matmul over a (heads, T, head_dim) array instead of a Python loop.
    With grouped-query attention each key/value head is repeated for its group of query heads.

    x: (..., T, d_model); w_qkv: (d_model, (n_head + 2 * n_kv_heads) * head_dim);
    w_o: (n_head * head_dim, d_model); n_kv_heads 0 means n_head. Returns (..., T, d_model).
    """
    n_kv_heads = _kv_heads(n_head, n_kv_heads)
    head_dim = w_qkv.shape[-1] // (n_head + 2 * n_kv_heads)
    qkv = project(x, w_qkv, b_qkv)  # (..., T, (n_head + 2 * n_kv_heads) * head_dim)
    q, k, v = np.split(qkv, [n_head * head_dim, (n_head + n_kv_heads) * head_dim], axis=-1)
    q = split_heads(q, n_head)  # (..., n_head, T, head_dim)
    k = split_heads(k, n_kv_heads)  # (..., n_kv_heads, T, head_dim)
    v = split_heads(v, n_kv_heads)  # (..., n_kv_heads, T, head_dim)
    group = n_head // n_kv_heads
    k = np.repeat(k, group, axis=-3)  # (..., n_head, T, head_dim): kv head g serves query heads g*group ..
    v = np.repeat(v, group, axis=-3)  # (..., n_head, T, head_dim)
    mask = causal_mask(x.shape[-2], window)  # (T, T), shared by every head
    context = scaled_dot_product_attention(q, k, v, mask)  # (..., n_head, T, head_dim)
    return project(merge_heads(context), w_o, b_o)  # (..., T, n_head * head_dim) -> (..., T, d_model)
