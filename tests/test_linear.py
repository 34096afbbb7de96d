"""model/linear.py: the MKL-packed copy of a Linear's weight, used only where it is exact and current."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binarylm.config import ModelConfig
from binarylm.infer.engine import Engine
from binarylm.infer.sampling import SamplingParams
from binarylm.model import Transformer
from binarylm.model.linear import Linear, pack_for_rows, packing_available

needs_mkl = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no MKL packed linear ops")


def layer_of(rows: int, in_features: int = 48, out_features: int = 80) -> Linear:
    torch.manual_seed(0)
    layer = Linear(in_features, out_features)
    pack_for_rows(nn.Sequential(layer), rows)
    return layer


def used_packing(layer: Linear) -> bool:
    return getattr(layer, "_packed_key", None) is not None


@needs_mkl
@pytest.mark.parametrize("shape", [(8, 48), (8, 1, 48), (2, 4, 48)])
def test_at_its_row_count_a_packed_layer_gives_f_linear_results(shape):
    layer = layer_of(rows=8)
    x = torch.randn(shape)
    with torch.inference_mode():
        y = layer(x)
    assert used_packing(layer)
    assert y.shape == (*shape[:-1], 80)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


@needs_mkl
def test_the_packed_copy_follows_in_place_weight_updates():
    layer = layer_of(rows=4)
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight.mul_(2.0)  # what an optimizer step does: the same tensor, changed in place
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.load_state_dict({"weight": torch.zeros(80, 48), "bias": torch.ones(80)})
        torch.testing.assert_close(layer(x), torch.ones(4, 80))
    assert used_packing(layer)


@needs_mkl
def test_packing_again_drops_a_copy_that_a_fused_optimizer_step_left_stale():
    layer = layer_of(rows=4)
    x = torch.randn(4, 48)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        layer(x)
    F.linear(torch.randn(8, 48), layer.weight, layer.bias).square().sum().backward()
    optimizer.step()  # changes the weight without moving its version counter
    pack_for_rows(nn.Sequential(layer), 4)  # what building an engine does
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_mkl
def test_other_row_counts_gradients_and_other_dtypes_take_the_plain_route():
    layer = layer_of(rows=4)
    with torch.inference_mode():
        layer(torch.randn(3, 48))
    assert not used_packing(layer)
    x = torch.randn(4, 48, requires_grad=True)
    layer(x).sum().backward()  # the packed op has no backward: with gradients on, F.linear runs
    assert not used_packing(layer) and x.grad is not None and layer.weight.grad is not None
    with torch.inference_mode():
        layer.double()(torch.randn(4, 48, dtype=torch.float64))
    assert not used_packing(layer)


def test_a_model_too_big_to_copy_on_this_machine_is_not_packed(monkeypatch):
    model = Transformer(ModelConfig(vocab_size=61, context_length=32, n_layer=1, n_head=2, d_model=16))
    monkeypatch.setattr("binarylm.model.linear.physical_memory", lambda: 4 * 1024)  # a 4 KiB machine
    assert pack_for_rows(model, 4) == 0
    assert all(m.packed_rows == 0 for m in model.modules() if isinstance(m, Linear))


def test_packing_can_be_turned_off_and_a_model_without_mkl_reports_no_packed_layers():
    model = Transformer(ModelConfig(vocab_size=61, context_length=32, n_layer=1, n_head=2, d_model=16))
    expected = 5 if packing_available() else 0  # qkv, proj, up, down and the head
    assert pack_for_rows(model, 4) == expected
    assert pack_for_rows(model, 0) == 0
    assert all(m.packed_rows == 0 for m in model.modules() if isinstance(m, Linear))


@needs_mkl
def test_an_engine_with_packed_weights_decodes_exactly_what_one_without_does():
    torch.manual_seed(1)
    config = ModelConfig(vocab_size=97, context_length=64, n_layer=2, n_head=4, d_model=64)
    model = Transformer(config).eval()  # float32: the dtype packing serves
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=generator).tolist() for n in (5, 9, 3, 7)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = Engine(model, max_batch=4, pack_weights=False)
    assert plain.packed_layers == 0
    expected = [c.samples[0].token_ids for c in plain.generate(prompts, params)]
    packed = Engine(model, max_batch=4)
    assert packed.packed_layers == 2 * 4 + 1
    assert [c.samples[0].token_ids for c in packed.generate(prompts, params)] == expected
    assert used_packing(model.lm_head)
