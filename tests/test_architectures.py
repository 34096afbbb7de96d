"""Every architecture option of the one Transformer: it trains, and cached decoding equals recomputation."""

import pytest
import torch

from binarylm.config import PRESETS, ModelConfig, build_config
from binarylm.errors import BinaryLMError
from binarylm.infer.generate import generate_ids
from binarylm.model import Transformer
from binarylm.model.positions import apply_rotary, rotary_tables

BASE = dict(vocab_size=61, context_length=48, n_layer=2, n_head=4, d_model=32)
OPTIONS = {
    "gpt2": {},
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "sinusoidal": dict(position="sinusoidal"),
    "rope": dict(position="rope"),
    "rope-scaled": dict(position="rope", rope_base=500.0, rope_scaling=4.0),
    "gqa": dict(n_kv_heads=2, position="rope"),
    "mqa": dict(n_kv_heads=1),
    "sliding-window": dict(sliding_window=5, position="rope"),
    "moe": dict(n_experts=4, n_experts_active=2),
    "no-bias-untied": dict(bias=False, tie_embeddings=False),
    "llama": dict(PRESETS["llama-tiny"], **BASE, n_kv_heads=2),
    "mistral-like": dict(PRESETS["llama-tiny"], **BASE, n_kv_heads=1, sliding_window=6, n_experts=3),
}


def make(option: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**BASE, **OPTIONS[option]}))


@pytest.mark.parametrize("option", OPTIONS)
def test_cached_decoding_in_chunks_equals_full_forward(option):
    model = make(option).eval()
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(ids)  # (2, 30, V)
        cache = model.new_cache(2)
        spans = ((0, 7), (7, 8), (8, 9), (9, 19), (19, 20), (20, 30))
        pieces = [model(ids[:, a:b], cache=cache)[0] for a, b in spans]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("option", OPTIONS)
def test_greedy_generation_with_cache_equals_recomputation(option):
    model = make(option, seed=2)
    prompt = [3, 14, 15, 9, 26, 5]
    cached = list(generate_ids(model, prompt, 30, use_cache=True))
    recomputed = list(generate_ids(model, prompt, 30, use_cache=False))
    assert cached == recomputed and len(cached) == 30


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_trains(option):
    """A few AdamW steps on one batch: the loss must fall well below its starting value."""
    model = make(option, seed=3).train()
    ids = torch.randint(0, 61, (4, 25), generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_gqa_caches_only_the_key_value_heads_and_the_window_bounds_the_cache():
    model = make("mistral-like")
    cache = model.new_cache(3)
    assert cache.keys[0].shape == (3, 1, 6, 8)  # (batch, n_kv_heads, window, head_dim)
    full = make("gqa").new_cache(3)
    assert full.keys[0].shape == (3, 2, 48, 8)
    assert cache.memory_bytes() * 16 == full.memory_bytes()  # half the heads, an eighth of the positions


def test_sliding_window_changes_what_distant_tokens_see():
    torch.manual_seed(5)
    windowed = Transformer(ModelConfig(**BASE, sliding_window=4)).eval()
    full = Transformer(ModelConfig(**BASE)).eval()
    full.load_state_dict(windowed.state_dict())
    ids = torch.randint(0, 61, (1, 12))
    a, b = windowed(ids)[0], full(ids)[0]
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)  # the first 4 tokens see the same keys
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


def test_rotary_dot_products_depend_on_the_offset_only():
    """q at position m and k at position n score the same as at m + s and n + s."""
    config = ModelConfig(**BASE, position="rope")
    q, k = torch.randn(2, 1, 1, 1, config.head_dim, dtype=torch.float64).unbind(0)  # (1, 1, 1, D) each

    def score(m: int, n: int) -> torch.Tensor:
        cos_m, sin_m = rotary_tables(torch.tensor([m]), config)
        cos_n, sin_n = rotary_tables(torch.tensor([n]), config)
        return (apply_rotary(q, cos_m.double(), sin_m.double()) * apply_rotary(k, cos_n.double(), sin_n.double())).sum()

    assert torch.allclose(score(7, 3), score(107, 103)) and torch.allclose(score(0, 0), (q * k).sum())
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_mixture_of_experts_reports_usage_and_adds_the_balancing_loss_only_in_training():
    model = make("moe", seed=6)
    ids = torch.randint(0, 61, (2, 16))
    model.train()
    _, train_loss = model(ids, ids)
    usage = model.expert_usage()
    assert len(usage) == 2 and all(abs(sum(layer) - 1) < 1e-6 and len(layer) == 4 for layer in usage)
    balance = torch.stack([block.mlp.aux_loss for block in model.blocks]).mean()
    model.eval()
    _, eval_loss = model(ids, ids)
    assert torch.allclose(train_loss, eval_loss + 0.01 * balance, atol=1e-5)
    dense_expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
    assert model.num_parameters() - model.num_parameters(active=True) == 2 * 2 * dense_expert


def test_llama_presets_have_the_expected_sizes():
    sizes = {}
    for name in ("llama-125m", "llama-350m", "llama-1b"):
        config = build_config({"model": {"preset": name}}).model
        with torch.device("meta"):
            sizes[name] = Transformer(config).num_parameters()
    assert 1.20e9 < sizes["llama-1b"] < 1.26e9  # Llama 3.2 1B has 1.24B
    assert sizes["llama-125m"] < sizes["llama-350m"] < sizes["llama-1b"]


@pytest.mark.parametrize("values, message", [
    (dict(n_head=4, n_kv_heads=3), "divisible by model.n_kv_heads"),
    (dict(norm="batchnorm"), "model.norm must be one of"),
    (dict(position="alibi"), "model.position must be one of"),
    (dict(n_experts=2, n_experts_active=3), "n_experts_active"),
    (dict(position="rope", n_head=4, d_model=36), "even head size"),
    (dict(sliding_window=-1), "sliding_window"),
])
def test_incompatible_options_are_clear_errors(values, message):
    with pytest.raises(BinaryLMError, match=message):
        ModelConfig(**{**BASE, **values}).validate()
