"""The model's own contracts: the fused head + loss equals the plain one, the cache equals recomputation."""

import pytest
import torch
import torch.nn.functional as F

from binarylm.config import ModelConfig
from binarylm.model import Transformer
from binarylm.model.losses import linear_cross_entropy


@pytest.mark.parametrize("chunk", [3, 16, 1000])
def test_fused_head_and_loss_match_the_plain_route(chunk):
    torch.manual_seed(0)
    x = torch.randn(37, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = -100  # some rows ignored
    fused = linear_cross_entropy(x, weight, targets, chunk=chunk)
    grad_x, grad_w = torch.autograd.grad(fused * 3.0, (x, weight))
    plain = F.cross_entropy(x @ weight.T, targets, ignore_index=-100)
    plain_x, plain_w = torch.autograd.grad(plain * 3.0, (x, weight))
    assert torch.allclose(fused, plain) and torch.allclose(grad_x, plain_x) and torch.allclose(grad_w, plain_w)


def test_fused_loss_passes_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, -100, 6, 1, 1, 2, -100, 5])
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, targets, chunk=4), (x, weight))


def test_model_loss_equals_cross_entropy_of_its_logits():
    torch.manual_seed(2)
    model = Transformer(ModelConfig(vocab_size=97, context_length=16, n_layer=2, n_head=2, d_model=32))
    ids = torch.randint(0, 97, (3, 16))
    logits, loss = model(ids, ids, return_logits=True)
    none, fused = model(ids, ids)
    assert none is None and torch.allclose(fused, loss, atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), ids.flatten()), atol=1e-6)
    fused.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss.backward()
    assert all(torch.allclose(grads[name], p.grad, atol=1e-5) for name, p in model.named_parameters())


def test_kv_cache_in_chunks_equals_full_forward():
    torch.manual_seed(3)
    model = Transformer(ModelConfig(vocab_size=97, context_length=32, n_layer=2, n_head=4, d_model=32)).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_cache(2)
        pieces = [model(ids[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_gpt2_initialisation_and_parameter_accounting():
    config = ModelConfig(vocab_size=1000, context_length=64, n_layer=8, n_head=4, d_model=128)
    torch.manual_seed(4)
    model = Transformer(config)
    assert model.lm_head.weight is model.token_embedding.weight
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.down.weight.std().item() - 0.02 / 4) < 0.001  # 1 / sqrt(2 * 8)
    per_block = 12 * 128 * 128 + 13 * 128  # weights + biases of attention, MLP and two norms
    assert model.num_parameters() == 1000 * 128 + 64 * 128 + 8 * per_block + 2 * 128
    assert model.flops_per_token() == 3 * (2 * (8 * per_block + 2 * 128 + 1000 * 128) + 4 * 8 * 64 * 128)
