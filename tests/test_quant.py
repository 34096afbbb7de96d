"""Weight-only quantization (model/quant.py): formats, error bounds, kernels against references, checkpoints."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from binarylm.checkpoint import load_checkpoint, write_checkpoint
from binarylm.config import build_config
from binarylm.errors import BinaryLMError
from binarylm.eval.lm import bits_per_byte
from binarylm.infer.generate import generate_ids
from binarylm.model import Transformer
from binarylm.model.linear import Linear
from binarylm.model.quant import (
    Int4Linear,
    Int8Linear,
    TorchDynamicInt8Linear,
    cpu_kernel_works,
    dequantize_int4,
    dequantize_int8,
    dequantize_model,
    pack_int4,
    quantize_checkpoint,
    quantize_int4,
    quantize_int8,
    quantize_model,
    relative_error,
    unpack_int4,
)
from binarylm.tokenizer import train_bpe

VOCAB = 300


def random_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """N(0, 0.02) like a trained layer's bulk, with one outlier and one all-zero row to test the edges."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    weight[0, 3] = 0.3  # an outlier stretches its row's (or group's) step
    weight[1] = 0.0
    return weight


def tiny_model(preset: str = "tiny", **fields) -> Transformer:
    config = build_config({"model": {"preset": preset, "vocab_size": VOCAB, **fields}})
    torch.manual_seed(0)
    return Transformer(config.model).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["def f(x):\n    return x + 1\n"] * 20, VOCAB, progress=False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def needs_kernel(scheme: str):
    """Skip where PyTorch lacks the op; where it has it, the tests assert that our layers use it."""
    op = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}[scheme]
    return pytest.mark.skipif(not hasattr(torch.ops.aten, op), reason=f"this PyTorch has no CPU {scheme} kernel")


# ------------------------------------------------------------------ int4 packing


def test_pack_unpack_round_trips_every_pair_of_nibbles():
    low, high = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    codes = torch.stack([low.flatten(), high.flatten()], dim=1).to(torch.uint8)  # (256, 2): every pair
    packed = pack_int4(codes)  # (256, 1)
    assert packed.shape == (256, 1)
    assert sorted(packed.flatten().tolist()) == list(range(256))  # every byte, each once
    assert packed[0x2F // 16 + 16 * (0x2F % 16)].item() == 0x2F  # low nibble = first code, high = second
    assert torch.equal(unpack_int4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    odd_shape = torch.randint(0, 16, (3, 5, 14), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4(odd_shape)), odd_shape)


def test_pack_rejects_odd_widths_out_of_range_codes_and_wrong_dtypes():
    with pytest.raises(BinaryLMError, match="even number of codes"):
        pack_int4(torch.zeros(4, 7, dtype=torch.uint8))
    with pytest.raises(BinaryLMError, match=r"in \[0, 15\], got 16"):
        pack_int4(torch.full((2, 2), 16, dtype=torch.uint8))
    with pytest.raises(BinaryLMError, match="must be uint8"):
        pack_int4(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(BinaryLMError, match="uint8"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int8))


# ------------------------------------------------------------------ error bounds


def test_int8_codes_are_within_half_a_step_of_the_weight():
    weight = random_weight(64, 96)
    codes, scales = quantize_int8(weight)
    assert codes.dtype == torch.int8 and scales.shape == (64,)
    error = (weight - dequantize_int8(codes, scales)).abs()  # (64, 96)
    assert (error <= scales[:, None] * (0.5 + 1e-5)).all()
    assert (codes[2:].abs().amax(dim=1) == 127).all()  # absmax: each row's largest weight hits +-127
    assert (codes[1] == 0).all() and scales[1] == 1.0  # an all-zero row stays zero


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_codes_are_within_half_a_step_of_the_weight_in_every_group(group_size):
    weight = random_weight(48, 256)
    weight[2, :group_size] = weight[2, :group_size].abs() + 0.01  # a group without negatives: 0 must stay in range
    codes, scales, zeros = quantize_int4(weight, group_size)
    groups = 256 // group_size
    assert codes.dtype == zeros.dtype == torch.uint8 and scales.shape == zeros.shape == (48, groups)
    assert int(codes.max()) <= 15 and int(zeros.max()) <= 15
    error = (weight - dequantize_int4(codes, scales, zeros)).abs().view(48, groups, group_size)
    assert (error <= scales[..., None] * (0.5 + 1e-5)).all()
    assert (dequantize_int4(codes, scales, zeros)[1] == 0).all()  # zero is exact


# ------------------------------------------------------------------ the matmul routes

# Relative output error ||y - y_float|| / ||y_float|| measured on these seeded N(0, 0.02) weights (one outlier row),
# without bias: int8 0.9%; int4 9.1% (group 32), 10.6% (64), 11.9% (128); each CPU kernel 0.3% from its reference
# (bfloat16 activations). On plain Gaussian 1536x384 weights: int8 0.7%, int4 8.0 / 9.0 / 10.0%, as the step
# (group range / 15) predicts: rms error = step / sqrt(12). The bounds below leave a margin over these.


@needs_kernel("int8")
@pytest.mark.parametrize("shape", [(1, 256), (8, 256), (2, 5, 256), (0, 256)])
def test_int8_kernel_matches_reference_and_float(shape):
    linear = nn.Linear(256, 96)
    linear.weight.data = random_weight(96, 256)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact, reference, fast = linear(x), layer.reference_forward(x), layer(x)
    assert layer.uses_kernel(x) and fast.shape == exact.shape and fast.dtype == torch.float32
    if x.numel():
        assert relative_error(fast, reference) < 0.005
        assert relative_error(reference, exact) < 0.01
        assert relative_error(fast, exact) < 0.012


def test_int8_layers_the_kernel_cannot_take_use_the_reference_route():
    layer = Int8Linear.from_weight(random_weight(32, 40), torch.randn(32))  # 40 inputs: not a multiple of 16
    x = torch.randn(3, 40)
    assert not layer.uses_kernel(x)
    assert torch.equal(layer(x), layer.reference_forward(x))
    x_grad = torch.randn(3, 40, requires_grad=True)
    wide = Int8Linear.from_weight(random_weight(32, 64))
    assert not wide.uses_kernel(torch.randn(3, 64, requires_grad=True))  # gradients flow through the reference
    layer(x_grad).sum().backward()
    assert x_grad.grad is not None


@needs_kernel("int4")
@pytest.mark.parametrize(("group_size", "fp32_bound"), [(32, 0.10), (64, 0.115), (128, 0.13)])
@pytest.mark.parametrize("shape", [(1, 256), (8, 256), (2, 3, 256)])
def test_int4_kernel_matches_reference_and_float(group_size, fp32_bound, shape):
    linear = nn.Linear(256, 40)  # 40 rows: padded to 48 for the kernel
    linear.weight.data = random_weight(40, 256)
    layer = Int4Linear.from_linear(linear, group_size)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact, reference, fast = linear(x), layer.reference_forward(x), layer(x)
    assert layer.uses_kernel(x) and fast.shape == exact.shape
    assert relative_error(fast, reference) < 0.005
    assert relative_error(reference, exact) < fp32_bound


@pytest.mark.parametrize("make", [Int8Linear.from_weight, lambda w: Int4Linear.from_weight(w, group_size=32)])
def test_the_kernels_copy_is_remade_after_loading_new_weights(make):
    layer, other = make(random_weight(16, 64)), make(random_weight(16, 64, seed=5))
    x = torch.randn(2, 64)
    with torch.no_grad():
        layer(x)  # makes the kernel's copy of the first weights
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))


def test_torch_dynamic_int8_is_close_to_float():
    linear = nn.Linear(256, 96)
    linear.weight.data = random_weight(96, 256)
    layer = TorchDynamicInt8Linear(linear)
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert relative_error(layer(x), linear(x)) < 0.03  # activations are int8 too: ~1-2%
    assert relative_error(layer.dequantized_weight(), linear.weight) < 0.01


def test_kernel_probe_leaves_the_global_random_state_alone():
    cpu_kernel_works.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    cpu_kernel_works("int8"), cpu_kernel_works("int4")
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------ whole models


@pytest.mark.parametrize(("scheme", "group_size", "bound"), [
    ("int8", 128, 0.02), ("int4", 32, 0.15), ("torch-dynamic-int8", 128, 0.04),
])
@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_quantized_transformer_stays_close_and_generates(preset, scheme, group_size, bound, ids):
    model = tiny_model(preset)
    quantized = quantize_model(copy.deepcopy(model), scheme, group_size)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())  # the head too
    assert isinstance(quantized.token_embedding, nn.Embedding)
    with torch.no_grad():
        exact, _ = model(ids)
        approx, _ = quantized(ids)
    assert relative_error(approx, exact) < bound  # random init (measured ~0.8%, ~10%, ~2%)
    new = list(generate_ids(quantized, ids[0, :5].tolist(), 6))
    assert len(new) == 6 and all(0 <= token < VOCAB for token in new)


def test_moe_experts_are_quantized_and_the_router_stays_float(ids):
    model = tiny_model("llama-tiny", n_experts=4)
    quantized = quantize_model(copy.deepcopy(model), "int8")
    moe = quantized.blocks[0].mlp
    assert type(moe.router) is nn.Linear and isinstance(moe.experts[0].gate, Int8Linear)
    with torch.no_grad():
        assert relative_error(quantized(ids)[0], model(ids)[0]) < 0.02


@pytest.mark.parametrize("scheme", ["int8", "int4", "torch-dynamic-int8"])
def test_the_loss_path_and_bits_per_byte_work_on_a_quantized_model(scheme, ids, tokenizer):
    model = tiny_model()
    quantized = quantize_model(copy.deepcopy(model), scheme, group_size=32)
    known = ids % tokenizer.vocab_size  # ids the tokenizer can turn into bytes
    x, y = known[:, :-1], known[:, 1:]
    with torch.no_grad():
        _, fused = quantized(x, targets=y)  # head through linear_cross_entropy with the dequantized weight
        logits, plain = quantized(x, targets=y, return_logits=True)
        _, exact = model(x, targets=y)
    assert abs(fused.item() - plain.item()) < 1e-2  # the fused route uses the reference head weight
    assert abs(fused.item() - exact.item()) < 0.05
    assert torch.allclose(plain, F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    quantized_bpb = bits_per_byte(quantized, tokenizer, [(x, y)], torch.device("cpu"))["bits_per_byte"]
    float_bpb = bits_per_byte(model, tokenizer, [(x, y)], torch.device("cpu"))["bits_per_byte"]
    assert abs(quantized_bpb - float_bpb) < 0.05 * float_bpb


def test_skip_keeps_layers_float_and_a_skipped_head_stays_tied():
    model = quantize_model(tiny_model(), "int8", skip=["lm_head", "blocks.0.*"])
    assert model.lm_head.weight is model.token_embedding.weight
    assert type(model.blocks[0].attn.qkv) is Linear and isinstance(model.blocks[1].attn.qkv, Int8Linear)
    assert model.quantization == {"scheme": "int8", "skip": ["lm_head", "blocks.0.*"]}


def test_dequantize_model_gives_back_nn_linear_and_ties_the_head(ids):
    model = tiny_model()
    quantized = quantize_model(copy.deepcopy(model), "int4", group_size=32)
    expected_up = quantized.blocks[0].mlp.up.dequantized_weight()
    back = dequantize_model(quantized)
    assert all(not isinstance(m, (Int8Linear, Int4Linear)) for m in back.modules())
    assert type(back.blocks[0].mlp.up) is Linear and torch.equal(back.blocks[0].mlp.up.weight, expected_up)
    assert back.lm_head.weight is back.token_embedding.weight  # the embedding was never quantized
    assert not hasattr(back, "quantization")
    with torch.no_grad():
        after, _ = back(ids)
        exact, _ = model(ids)
    assert relative_error(after, exact) < 0.15  # int4 blocks, but the exact float head again


def test_bad_schemes_group_sizes_and_patterns_are_clear_errors():
    with pytest.raises(BinaryLMError, match="unknown quantization scheme 'int3'"):
        quantize_model(tiny_model(), "int3")
    with pytest.raises(BinaryLMError, match="group size must be one of 32, 64, 128, 256, got 48"):
        quantize_model(tiny_model(), "int4", group_size=48)
    with pytest.raises(BinaryLMError, match=r"does not divide the input width: layer blocks\.0\.attn\.qkv has 64"):
        quantize_model(tiny_model(), "int4", group_size=128)  # tiny has d_model 64
    model = tiny_model()
    with pytest.raises(BinaryLMError, match="match no linear layer"):
        quantize_model(model, "int8", skip=["lm_haed"])
    assert type(model.lm_head) is Linear  # nothing was changed before the error
    quantize_model(model, "int8")
    with pytest.raises(BinaryLMError, match="already quantized"):
        quantize_model(model, "int4", group_size=32)


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize(("scheme", "group_size", "skip"), [
    ("int8", 128, []), ("int4", 32, []), ("int4", 64, ["lm_head", "blocks.1.*"]),
])
def test_quantized_checkpoint_round_trips_exactly(scheme, group_size, skip, ids, tokenizer, tmp_path):
    config = build_config({"model": {"preset": "llama-tiny", "vocab_size": VOCAB}})
    torch.manual_seed(0)
    model = quantize_model(Transformer(config.model), scheme, group_size, skip)
    path = write_checkpoint(tmp_path / "q", model, tokenizer, config)
    saved = json.loads((path / "config.json").read_text())
    assert saved["quantization"] == model.quantization and "quantization" not in saved["model"]
    stored = load_file(str(path / "model.safetensors"))
    assert stored["blocks.0.attn.qkv.weight"].dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    assert stored["blocks.0.attn.qkv.scales"].dtype == torch.float32
    loaded = load_checkpoint(path)
    assert loaded.config == config and loaded.model.quantization == model.quantization
    assert type(loaded.model.lm_head) is type(model.lm_head)
    assert type(loaded.model.blocks[1].mlp.up) is type(model.blocks[1].mlp.up)
    assert (loaded.model.lm_head.weight is loaded.model.token_embedding.weight) == ("lm_head" in skip)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids)[0], model(ids)[0])


def test_torch_dynamic_models_cannot_be_saved(tokenizer, tmp_path):
    config = build_config({"model": {"preset": "tiny", "vocab_size": VOCAB}})
    model = quantize_model(Transformer(config.model), "torch-dynamic-int8")
    with pytest.raises(BinaryLMError, match="cannot be saved"):
        write_checkpoint(tmp_path / "q", model, tokenizer, config)
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_quantized_checkpoints_are_named(tokenizer, tmp_path):
    config = build_config({"model": {"preset": "tiny", "vocab_size": VOCAB}})
    path = write_checkpoint(tmp_path / "q", quantize_model(Transformer(config.model), "int8"), tokenizer, config)
    values = json.loads((path / "config.json").read_text())
    values["quantization"] = {"scheme": "int2"}
    (path / "config.json").write_text(json.dumps(values))
    with pytest.raises(BinaryLMError, match="unknown quantization scheme 'int2'"):
        load_checkpoint(path)
    values["quantization"] = {"scheme": "int8"}
    (path / "config.json").write_text(json.dumps(values))
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].float()  # same shape, wrong kind
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(BinaryLMError, match="lm_head.weight is torch.float32 where config.json implies torch.int8"):
        load_checkpoint(path)


def test_quantize_checkpoint_writes_a_smaller_loadable_checkpoint(tokenizer, ids, tmp_path):
    config = build_config({"model": {"preset": "llama-tiny", "vocab_size": VOCAB}})
    torch.manual_seed(0)
    source = write_checkpoint(tmp_path / "float", Transformer(config.model), tokenizer, config)
    report = quantize_checkpoint(source, tmp_path / "int4", "int4", group_size=32)
    assert report["scheme"] == "int4" and report["group_size"] == 32 and report["layers"] == 2 * 5 + 1
    assert report["bytes_after"] < 0.6 * report["bytes_before"]  # the float embedding stays, so not 1/8
    assert report["bytes_before"] == (source / "model.safetensors").stat().st_size
    loaded = load_checkpoint(tmp_path / "int4")
    assert isinstance(loaded.model.lm_head, Int4Linear) and loaded.metrics["quantized_from"] == str(source)
    with pytest.raises(BinaryLMError, match="already quantized"):
        quantize_checkpoint(tmp_path / "int4", tmp_path / "again", "int8")
    with pytest.raises(BinaryLMError, match="overwrite the source"):
        quantize_checkpoint(source, source, "int8")
    with pytest.raises(BinaryLMError, match="exists and is not a checkpoint"):
        quantize_checkpoint(source, tmp_path, "int8")  # would replace the whole directory
    with pytest.raises(BinaryLMError, match="cannot be saved"):
        quantize_checkpoint(source, tmp_path / "dyn", "torch-dynamic-int8")
