"""The teaching code in binarylm/foundations gives the numbers of PyTorch and of the production modules.

Each attention step is checked against the step after it (and against PyTorch's own attention), the
fused NumPy heads against `binarylm.model.layers.CausalSelfAttention` with the same weights, the norms
and GELUs against torch.nn.functional, and the hand-written backprop against finite differences.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from binarylm.config import ModelConfig
from binarylm.foundations import attention as steps
from binarylm.foundations import mlp as mlp_module
from binarylm.foundations.mlp import MLP, gradient_check, loss_and_gradients, predict, train_step
from binarylm.foundations.norms import gelu, gelu_tanh, layer_norm, rms_norm
from binarylm.model import Transformer
from binarylm.model.layers import CausalSelfAttention

TIGHT = 1e-12  # NumPy float64 against NumPy or PyTorch float64: the same arithmetic, rounding aside
ATOL = 1e-5  # against PyTorch in float32


def t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def max_diff(ours: np.ndarray, theirs: np.ndarray | torch.Tensor) -> float:
    theirs = theirs.detach().to(torch.float64).numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max())


# ---------------------------------------------------------------- MLP and backprop


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_backprop_passes_the_gradient_check(activation):
    rng = np.random.default_rng(0)
    mlp = MLP.init([3, 5, 4, 3], activation, seed=1)
    for bias in mlp.biases:
        bias += rng.normal(0.0, 0.1, bias.shape)  # non-zero biases, so their gradients are exercised too
    x, targets = rng.normal(size=(7, 3)), rng.integers(0, 3, size=7)
    assert gradient_check(mlp, x, targets) < 1e-6


def test_gradient_check_catches_a_wrong_derivative(monkeypatch):
    rng = np.random.default_rng(0)
    mlp = MLP.init([3, 5, 3], "tanh", seed=1)
    x, targets = rng.normal(size=(6, 3)), rng.integers(0, 3, size=6)
    monkeypatch.setitem(mlp_module.ACTIVATIONS, "tanh", (np.tanh, lambda z: 1.0 - np.tanh(z)))  # forgot the square
    assert gradient_check(mlp, x, targets) > 1e-3


def test_backprop_equals_torch_autograd():
    rng = np.random.default_rng(2)
    mlp = MLP.init([4, 6, 6, 3], "tanh", seed=3)
    x, targets = rng.normal(size=(5, 4)), rng.integers(0, 3, size=5)
    loss, grads = loss_and_gradients(mlp, x, targets)
    params = [t(p.copy()).requires_grad_() for p in mlp.parameters()]
    h = t(x)
    for layer in range(0, len(params), 2):
        h = h @ params[layer] + params[layer + 1]
        h = torch.tanh(h) if layer + 2 < len(params) else h
    torch_loss = F.cross_entropy(h, t(targets))
    torch_loss.backward()
    assert abs(loss - torch_loss.item()) < TIGHT
    assert max(max_diff(g, p.grad) for g, p in zip(grads, params)) < TIGHT


def two_spirals(points_per_arm: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved spiral arms of 1.5 turns in the unit disc, labelled 0 and 1."""
    rng = np.random.default_rng(seed)
    radius = np.linspace(0.25, 3.0 * np.pi, points_per_arm)
    arms = []
    for label in (0, 1):
        angle = radius + label * np.pi
        arm = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1) / (3.0 * np.pi)
        arms.append(arm + rng.normal(0.0, 0.01, arm.shape))
    return np.concatenate(arms), np.repeat([0, 1], points_per_arm)


@pytest.mark.parametrize(
    "task, sizes, activation, lr, steps",
    [
        ("xor", [2, 8, 2], "tanh", 0.5, 1000),
        ("spirals", [2, 32, 32, 2], "tanh", 0.5, 3000),
        ("spirals", [2, 32, 32, 2], "relu", 0.3, 3000),
    ],
)
def test_mlp_learns_a_toy_task(task, sizes, activation, lr, steps):
    if task == "xor":
        x, targets = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), np.array([0, 1, 1, 0])
    else:
        x, targets = two_spirals(50)
    mlp = MLP.init(sizes, activation, seed=0)
    assert (predict(mlp, x) == targets).mean() < 0.9  # not solved by chance at initialisation
    losses = [train_step(mlp, x, targets, lr) for _ in range(steps)]
    assert losses[-1] < 0.1 * losses[0]
    assert (predict(mlp, x) == targets).all()


# ---------------------------------------------------------------- norms and GELU


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_equals_torch(affine):
    rng = np.random.default_rng(4)
    x = rng.normal(1.5, 3.0, size=(2, 5, 16))
    weight, bias = (rng.normal(size=16), rng.normal(size=16)) if affine else (None, None)
    theirs = F.layer_norm(t(x), (16,), None if weight is None else t(weight), None if bias is None else t(bias), 1e-5)
    assert max_diff(layer_norm(x, weight, bias, eps=1e-5), theirs) < ATOL


@pytest.mark.parametrize("affine", [False, True])
def test_rms_norm_equals_torch(affine):
    rng = np.random.default_rng(5)
    x = rng.normal(0.5, 2.0, size=(2, 5, 16))
    weight = rng.normal(size=16) if affine else None
    theirs = F.rms_norm(t(x), (16,), None if weight is None else t(weight), eps=1e-6)
    assert max_diff(rms_norm(x, weight, eps=1e-6), theirs) < ATOL


@pytest.mark.parametrize("ours, approximate", [(gelu, "none"), (gelu_tanh, "tanh")])
def test_gelu_equals_torch(ours, approximate):
    x = np.concatenate([np.linspace(-8.0, 8.0, 401), np.random.default_rng(6).normal(0.0, 3.0, 200)])
    assert max_diff(ours(x), F.gelu(t(x), approximate=approximate)) < ATOL
    assert max_diff(ours(x.astype(np.float32)), F.gelu(t(x.astype(np.float32)), approximate=approximate)) < ATOL


# ---------------------------------------------------------------- attention, step by step


def heads_weights(rng, d_model: int, n_head: int, n_kv_heads: int, head_dim: int, bias: bool = True) -> dict:
    """Random projections for `multi_head_attention_separate`: w_q, w_k, w_v, w_o and (optionally) biases."""
    def normal(*shape):
        return rng.normal(0.0, 0.5, size=shape)

    weights = dict(w_q=normal(d_model, n_head * head_dim), w_k=normal(d_model, n_kv_heads * head_dim),
                   w_v=normal(d_model, n_kv_heads * head_dim), w_o=normal(n_head * head_dim, d_model))
    if bias:
        weights.update(b_q=normal(n_head * head_dim), b_k=normal(n_kv_heads * head_dim),
                       b_v=normal(n_kv_heads * head_dim), b_o=normal(d_model))
    return weights


def fuse(weights: dict) -> dict:
    """The same weights as `multi_head_attention_fused` takes them: Q, K and V side by side."""
    fused = dict(w_qkv=np.concatenate([weights["w_q"], weights["w_k"], weights["w_v"]], axis=1), w_o=weights["w_o"])
    if "b_q" in weights:
        fused.update(b_qkv=np.concatenate([weights["b_q"], weights["b_k"], weights["b_v"]]), b_o=weights["b_o"])
    return fused


def band_mask(length: int, window: int) -> torch.Tensor:
    """Built the PyTorch way, independently of steps.causal_mask: True on and below the diagonal, within the window."""
    ones = torch.ones(length, length, dtype=torch.bool)
    return ones.tril() & ~ones.tril(-window)


def test_simplified_attention_equals_torch_with_unit_scale():
    x = np.random.default_rng(7).normal(size=(6, 4))
    theirs = F.scaled_dot_product_attention(t(x), t(x), t(x), scale=1.0)
    assert max_diff(steps.simplified_attention(x), theirs) < TIGHT


def test_simplified_attention_is_self_attention_with_identity_projections():
    x = np.random.default_rng(8).normal(size=(6, 4))
    d = x.shape[1]
    root = d**0.25 * np.eye(d)  # (x W)(x W)^T / sqrt(d) = x x^T when W = d^(1/4) I
    assert max_diff(steps.simplified_attention(x), steps.self_attention(x, root, root, np.eye(d))) < TIGHT


def test_self_attention_equals_torch():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(7, 8))
    w_q, w_k, w_v = rng.normal(size=(3, 8, 4))
    b_q, b_k, b_v = rng.normal(size=(3, 4))
    q, k, v = (t(x) @ t(w) + t(b) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
    theirs = F.scaled_dot_product_attention(q, k, v)
    assert max_diff(steps.self_attention(x, w_q, w_k, w_v, b_q, b_k, b_v), theirs) < TIGHT


def test_causal_self_attention_equals_torch_and_hides_the_future():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(7, 8))
    w_q, w_k, w_v = rng.normal(size=(3, 8, 4))
    ours = steps.causal_self_attention(x, w_q, w_k, w_v)
    theirs = F.scaled_dot_product_attention(t(x @ w_q), t(x @ w_k), t(x @ w_v), is_causal=True)
    assert max_diff(ours, theirs) < TIGHT
    assert max_diff(ours[0], x[0] @ w_v) < TIGHT  # the first token sees only itself
    assert max_diff(ours[-1], steps.self_attention(x, w_q, w_k, w_v)[-1]) < TIGHT  # the last token sees everyone
    changed_future = x.copy()
    changed_future[4:] += 1.0
    assert max_diff(steps.causal_self_attention(changed_future, w_q, w_k, w_v)[:4], ours[:4]) == 0.0


@pytest.mark.parametrize("window", [1, 3, 7])
def test_sliding_window_equals_torch_with_a_band_mask(window):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(7, 8))
    w_q, w_k, w_v = rng.normal(size=(3, 8, 4))
    ours = steps.causal_self_attention(x, w_q, w_k, w_v, window=window)
    theirs = F.scaled_dot_product_attention(t(x @ w_q), t(x @ w_k), t(x @ w_v), attn_mask=band_mask(7, window))
    assert max_diff(ours, theirs) < TIGHT
    if window == 1:
        assert max_diff(ours, x @ w_v) < TIGHT  # a window of one: every token sees only itself
    if window == 7:
        assert max_diff(ours, steps.causal_self_attention(x, w_q, w_k, w_v)) == 0.0  # as wide as the sequence


def test_one_head_is_causal_self_attention_then_the_output_projection():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(6, 8))
    w = heads_weights(rng, d_model=8, n_head=1, n_kv_heads=1, head_dim=8)
    single = steps.causal_self_attention(x, w["w_q"], w["w_k"], w["w_v"], w["b_q"], w["b_k"], w["b_v"])
    expected = single @ w["w_o"] + w["b_o"]
    assert max_diff(steps.multi_head_attention_separate(x, n_head=1, **w), expected) < TIGHT


@pytest.mark.parametrize("n_kv_heads", [0, 4, 2, 1])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_separate_and_fused_heads_agree(n_kv_heads, window, bias):
    rng = np.random.default_rng(13)
    x = rng.normal(size=(9, 16))
    w = heads_weights(rng, d_model=16, n_head=4, n_kv_heads=n_kv_heads or 4, head_dim=4, bias=bias)
    separate = steps.multi_head_attention_separate(x, n_head=4, n_kv_heads=n_kv_heads, window=window, **w)
    fused = steps.multi_head_attention_fused(x, n_head=4, n_kv_heads=n_kv_heads, window=window, **fuse(w))
    assert max_diff(separate, fused) < TIGHT


def test_fused_heads_run_a_batch_like_one_sequence_at_a_time():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(3, 9, 16))
    w = fuse(heads_weights(rng, d_model=16, n_head=4, n_kv_heads=2, head_dim=4))
    batched = steps.multi_head_attention_fused(x, n_head=4, n_kv_heads=2, **w)
    one_by_one = np.stack([steps.multi_head_attention_fused(seq, n_head=4, n_kv_heads=2, **w) for seq in x])
    assert max_diff(batched, one_by_one) < TIGHT


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_grouped_query_heads_equal_torch_enable_gqa(n_kv_heads):
    rng = np.random.default_rng(15)
    x = rng.normal(size=(9, 16))
    w = heads_weights(rng, d_model=16, n_head=4, n_kv_heads=n_kv_heads, head_dim=4, bias=False)
    ours = steps.multi_head_attention_separate(x, n_head=4, n_kv_heads=n_kv_heads, **w)
    q, k, v = (steps.split_heads(x @ w[name], heads) for name, heads in (("w_q", 4), ("w_k", n_kv_heads),
                                                                        ("w_v", n_kv_heads)))
    context = F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=True)  # (4, T, 4)
    theirs = steps.merge_heads(context.numpy()) @ w["w_o"]
    assert max_diff(ours, theirs) < TIGHT


def test_heads_must_divide_evenly_into_groups():
    rng = np.random.default_rng(16)
    w = fuse(heads_weights(rng, d_model=12, n_head=4, n_kv_heads=3, head_dim=3))
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        steps.multi_head_attention_fused(rng.normal(size=(5, 12)), n_head=4, n_kv_heads=3, **w)


# ---------------------------------------------------------------- against the production module


def numpy_attention(attn: CausalSelfAttention, config: ModelConfig, x: torch.Tensor) -> np.ndarray:
    """`multi_head_attention_fused` in float64 with the module's weights (nn.Linear stores W transposed)."""
    def as_numpy(tensor):
        return None if tensor is None else tensor.detach().to(torch.float64).numpy()

    return steps.multi_head_attention_fused(
        as_numpy(x), as_numpy(attn.qkv.weight).T, as_numpy(attn.proj.weight).T, config.n_head,
        n_kv_heads=getattr(config, "n_kv_heads", 0), b_qkv=as_numpy(attn.qkv.bias), b_o=as_numpy(attn.proj.bias),
        window=getattr(config, "sliding_window", 0),
    )


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(bias=False),
        pytest.param(dict(n_kv_heads=2), id="gqa-2"),
        pytest.param(dict(n_kv_heads=1), id="gqa-1"),
        pytest.param(dict(sliding_window=3), id="window-3"),
        pytest.param(dict(n_kv_heads=2, sliding_window=4), id="gqa-2-window-4"),
    ],
)
def test_fused_attention_equals_the_production_module(fields):
    torch.manual_seed(17)
    config = ModelConfig(vocab_size=32, context_length=16, n_layer=1, n_head=4, d_model=32, **fields)
    attn = CausalSelfAttention(config).eval()
    with torch.no_grad():
        for param in attn.parameters():
            param.normal_(0.0, 0.3)  # sharp attention patterns and non-zero biases, unlike the GPT-2 init
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        theirs = attn(x)  # (2, 11, 32), float32
    assert max_diff(numpy_attention(attn, config, x), theirs) < ATOL


def test_fused_attention_equals_a_transformers_first_block():
    torch.manual_seed(18)
    config = ModelConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, d_model=16)
    attn = Transformer(config).eval().blocks[0].attn  # as initialised for training
    x = torch.randn(3, 16, 16)
    with torch.no_grad():
        theirs = attn(x)
    assert max_diff(numpy_attention(attn, config, x), theirs) < ATOL
