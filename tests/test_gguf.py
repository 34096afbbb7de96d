"""GGUF export for llama.cpp: names, rotary layout, metadata and tokenizer, checked with the gguf package's reader."""

import math

import numpy as np
import pytest
import torch

from binarylm.config import PRESETS, ModelConfig
from binarylm.errors import BinaryLMError
from binarylm.interop.gguf import (
    CONTROL_TOKEN,
    FILE_TYPES,
    NORM_EPS_KEYS,
    NORMAL_TOKEN,
    SHAPE_KEYS,
    UNUSED_TOKEN,
    USER_DEFINED_TOKEN,
    _with_frequency_factors,
    export_gguf,
    import_gguf,
    read_gguf,
)
from binarylm.model import Transformer
from binarylm.model.positions import apply_rotary, rotary_tables
from binarylm.tokenizer import to_hf_json, train_bpe

gguf = pytest.importorskip("gguf")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs on.\n" * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n" * 3,
    "Rotary positions turn each pair of dimensions; the turning depends on the position.\n" * 2,
    "xy\n" * 9 + "yz\n" * 6 + "xyz\n" * 4,  # "xyz" is learned as xy + z, though x + yz also builds it
]
SAMPLE = "The fox said: return a + b <|endoftext|> and then the dog slept. 12345 héllo"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, vocab_size=300, progress=False)


def gpt2_config(vocab_size: int, **overrides) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, context_length=32, n_layer=2, n_head=4, d_model=32, **overrides)


def llama_config(vocab_size: int, **overrides) -> ModelConfig:
    return ModelConfig(**{**PRESETS["llama-tiny"], "vocab_size": vocab_size, **overrides})


CASES = {
    "gpt2": gpt2_config,
    "llama": llama_config,
    "llama-untied": lambda vocab: llama_config(vocab, tie_embeddings=False),
    "llama-bias-scaled": lambda vocab: llama_config(vocab, bias=True, rope_scaling=2.0, rope_base=50000.0),
    # head_dim 16: wavelengths 6.3, 20, 63, 199, ... against 16 and 64, so every llama3 band is used
    "llama-llama3": lambda vocab: llama_config(vocab, rope_type="llama3", rope_scaling=8.0, rope_original_context=64),
}


def random_model(config: ModelConfig) -> Transformer:
    """A seeded model whose every parameter (biases and norms too) holds distinct random values."""
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tokenizer, tmp_path_factory):
    """(model, path of its GGUF file), for each case."""
    model = random_model(CASES[request.param](tokenizer.vocab_size))
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    export_gguf(model, tokenizer, path)
    return model, path


def stored_tensors(path) -> dict[str, np.ndarray]:
    return {tensor.name: np.array(tensor.data) for tensor in gguf.GGUFReader(path).tensors}


def stored_metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def adjacent_pair_rows(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's row order, by index arithmetic: in every head, rows (i, i + D/2) go to (2i, 2i + 1)."""
    head_dim = rows.shape[0] // n_heads
    order = [head * head_dim + i + half * head_dim // 2
             for head in range(n_heads) for i in range(head_dim // 2) for half in (0, 1)]
    return rows[order]


def expected_llama_cpp_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """What llama.cpp's gpt2 / llama graphs look up, spelled out by hand for each BinaryLM tensor."""
    config, state = model.config, model.state_dict()
    llama = config.position == "rope"
    expected = {"token_embd.weight": state["token_embedding.weight"], "output_norm.weight": state["final_norm.weight"]}
    if not llama:
        expected["position_embd.weight"] = state["position_embedding.weight"]
        expected["output_norm.bias"] = state["final_norm.bias"]
    if not config.tie_embeddings:
        expected["output.weight"] = state["lm_head.weight"]
    kinds = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}", f"blk.{i}"
        for norm, name in (("norm1", "attn_norm"), ("norm2", "ffn_norm")):
            for kind in ("weight", "bias") if not llama else ("weight",):
                expected[f"{theirs}.{name}.{kind}"] = state[f"{ours}.{norm}.{kind}"]
        for kind in kinds:
            modules = {"attn.proj": "attn_output", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}
            if llama:
                modules["mlp.gate"] = "ffn_gate"
            for module, name in modules.items():
                expected[f"{theirs}.{name}.{kind}"] = state[f"{ours}.{module}.{kind}"]
            qkv = state[f"{ours}.attn.qkv.{kind}"]
            if not llama:
                expected[f"{theirs}.attn_qkv.{kind}"] = qkv
                continue
            q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_heads * config.head_dim
            q, k, v = qkv[:q_rows], qkv[q_rows : q_rows + kv_rows], qkv[q_rows + kv_rows :]
            expected[f"{theirs}.attn_q.{kind}"] = adjacent_pair_rows(q, config.n_head)
            expected[f"{theirs}.attn_k.{kind}"] = adjacent_pair_rows(k, config.n_kv_heads)
            expected[f"{theirs}.attn_v.{kind}"] = v
    if config.rope_type == "llama3":
        expected["rope_freqs.weight"] = llama3_divisors(config)
    return {name: tensor.numpy() for name, tensor in expected.items()}


def llama3_divisors(config: ModelConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs for Llama 3.1 scaling, pair by pair, as its converter computes them."""
    original, low, high = config.rope_original_context, config.rope_low_freq_factor, config.rope_high_freq_factor
    divisors = []
    for pair in range(config.head_dim // 2):
        wavelength = 2 * math.pi * config.rope_base ** (2 * pair / config.head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(config.rope_scaling)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / config.rope_scaling + smooth))
    return torch.tensor(divisors)


# ------------------------------------------------------------------ tensors


def test_every_tensor_is_stored_under_its_llama_cpp_name(exported):
    model, path = exported
    stored, expected = stored_tensors(path), expected_llama_cpp_tensors(model)
    assert sorted(stored) == sorted(expected)
    for name, array in expected.items():
        assert stored[name].dtype == np.float32
        if name == "rope_freqs.weight":  # computed here in float64, there in float32
            np.testing.assert_allclose(stored[name], array, rtol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(stored[name], array, err_msg=name)


def test_tensor_names_and_dims_are_those_llama_cpp_looks_up(exported):
    model, path = exported
    config, reader = model.config, gguf.GGUFReader(path)
    arch = gguf.MODEL_ARCH.GPT2 if config.position == "learned" else gguf.MODEL_ARCH.LLAMA
    known = {gguf.TENSOR_NAMES[tensor].format(bid=i) for tensor in gguf.MODEL_TENSORS[arch] for i in range(2)}
    dims = {tensor.name: list(tensor.shape) for tensor in reader.tensors}  # ggml order: fastest-varying first
    assert {name.rsplit(".", 1)[0] for name in dims} <= known
    assert dims["token_embd.weight"] == [config.d_model, config.vocab_size]
    assert dims["blk.0.ffn_down.weight"] == [config.d_ff, config.d_model]
    if arch == gguf.MODEL_ARCH.LLAMA:
        assert dims["blk.1.attn_k.weight"] == [config.d_model, config.n_kv_heads * config.head_dim]
    else:
        assert dims["position_embd.weight"] == [config.d_model, config.context_length]


def rotate_adjacent_pairs(x: torch.Tensor, positions: torch.Tensor, base: float, scaling: float,
                          divisors: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's rotary embedding for the llama graph: dimensions (2i, 2i + 1) turn together. x: (T, D).
    `divisors` (D/2,): the file's rope_freqs, each pair's frequency divided by its own factor."""
    half = x.shape[-1] // 2
    angles = positions[:, None] / scaling * base ** (-torch.arange(half) * 2 / x.shape[-1])  # (T, D/2)
    if divisors is not None:
        angles = angles / divisors
    even, odd = x[:, 0::2], x[:, 1::2]
    turned = torch.stack((even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()), -1)
    return turned.flatten(1)


@pytest.mark.parametrize("case", ["llama", "llama-bias-scaled", "llama-llama3"])
def test_stored_rotary_pairs_give_the_same_attention_scores(case, tokenizer, tmp_path):
    """Our rotate-half attention on our rows equals llama.cpp's adjacent-pair attention on the stored rows."""
    model = random_model(CASES[case](tokenizer.vocab_size))
    export_gguf(model, tokenizer, tmp_path / "model.gguf")
    config, stored = model.config, stored_tensors(tmp_path / "model.gguf")
    D, q_rows = config.head_dim, config.n_head * config.head_dim
    torch.manual_seed(1)
    x, positions = torch.randn(6, config.d_model), torch.arange(3, 9)

    with torch.no_grad():
        projected = model.blocks[0].attn.qkv(x)  # (T, q rows | k rows | v rows)
    cos, sin = rotary_tables(positions, config)
    ours_q, ours_k = (apply_rotary(rows[None, None], cos, sin)[0, 0] for rows in
                      (projected[:, :D], projected[:, q_rows : q_rows + D]))  # query head 0, key head 0

    def theirs(name: str) -> torch.Tensor:
        """Head 0 of the stored projection `name`, rotated as llama.cpp does."""
        rows = x @ torch.from_numpy(stored[f"blk.0.{name}.weight"][:D]).T
        if config.bias:
            rows = rows + torch.from_numpy(stored[f"blk.0.{name}.bias"][:D])
        if config.rope_type == "llama3":  # the divisors travel as a tensor, nothing in the metadata
            divisors = torch.from_numpy(stored["rope_freqs.weight"])
            return rotate_adjacent_pairs(rows, positions, config.rope_base, 1.0, divisors)
        return rotate_adjacent_pairs(rows, positions, config.rope_base, config.rope_scaling)

    torch.testing.assert_close(theirs("attn_q") @ theirs("attn_k").T, ours_q @ ours_k.T)


def test_read_gguf_restores_config_and_state_dict_exactly(exported):
    model, path = exported
    config, state_dict, _ = read_gguf(path)
    assert config == model.config
    original = model.state_dict()
    assert list(state_dict) == list(original)
    for name, tensor in original.items():
        assert torch.equal(state_dict[name], tensor), name


def test_imported_model_gives_identical_logits(exported):
    model, path = exported
    imported, _ = import_gguf(path)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(imported(ids)[0], model(ids)[0])


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trips(tokenizer, tmp_path):
    export_gguf(random_model(gpt2_config(tokenizer.vocab_size)), tokenizer, tmp_path / "model.gguf")
    _, _, restored = read_gguf(tmp_path / "model.gguf")
    assert restored.ranks == tokenizer.ranks
    assert restored.special_tokens == tokenizer.special_tokens
    assert restored.merges == tokenizer.merges
    assert restored.pattern == tokenizer.pattern and restored.name == tokenizer.name
    ids = tokenizer.encode(SAMPLE, allowed_special="all")
    assert tokenizer.eot_id in ids
    assert restored.encode(SAMPLE, allowed_special="all") == ids
    assert restored.decode(ids) == SAMPLE


def test_tokens_are_spelled_as_gpt2_byte_level_bpe(tokenizer, exported):
    _, path = exported
    metadata = stored_metadata(path)
    hf_model = to_hf_json(tokenizer)["model"]
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == tokenizer.vocab_size
    for spelled, token_id in hf_model["vocab"].items():  # the same spelling as our Hugging Face export
        assert (tokens[token_id], types[token_id]) == (spelled, gguf.TokenType.NORMAL)
    for text, token_id in tokenizer.special_tokens.items():
        assert (tokens[token_id], types[token_id]) == (text, gguf.TokenType.CONTROL)
    merges = metadata["tokenizer.ggml.merges"]
    assert sorted(merges) == sorted(hf_model["merges"])  # every way to build each token, as for Hugging Face
    first_merge_for = {}  # each token's first merge is the one it was learned by
    for merge in merges:
        first_merge_for.setdefault(merge.replace(" ", ""), merge)
    assert list(first_merge_for.values()) == [f"{tokens[left]} {tokens[right]}" for left, right in tokenizer.merges]


@pytest.mark.parametrize("pattern, pre", [("gpt2", "gpt-2"), ("gpt4", "llama-bpe"), (r"\s+|\w+|[^\s\w]+", "default")])
def test_split_pattern_is_named_for_llama_cpp_and_kept_verbatim(pattern, pre, tmp_path):
    tokenizer = train_bpe(CORPUS, vocab_size=280, pattern=pattern, progress=False)
    model = random_model(gpt2_config(tokenizer.vocab_size))
    if pre == "default":
        with pytest.warns(UserWarning, match="default pattern"):
            export_gguf(model, tokenizer, tmp_path / "model.gguf")
    else:
        export_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert stored_metadata(tmp_path / "model.gguf")["tokenizer.ggml.pre"] == pre
    _, _, restored = read_gguf(tmp_path / "model.gguf")
    assert restored.pattern == tokenizer.pattern
    assert restored.encode(SAMPLE, allowed_special="all") == tokenizer.encode(SAMPLE, allowed_special="all")


def test_ids_the_tokenizer_lacks_become_unused_tokens(tokenizer, tmp_path):
    model = random_model(gpt2_config(tokenizer.vocab_size + 4))  # a padded embedding, as for GPU-friendly sizes
    export_gguf(model, tokenizer, tmp_path / "model.gguf")
    metadata = stored_metadata(tmp_path / "model.gguf")
    assert metadata["tokenizer.ggml.token_type"][-4:] == [gguf.TokenType.UNUSED] * 4
    config, _, restored = read_gguf(tmp_path / "model.gguf")
    assert config.vocab_size == tokenizer.vocab_size + 4
    assert restored.ranks == tokenizer.ranks and restored.special_tokens == tokenizer.special_tokens


def test_a_tokenizer_larger_than_the_model_is_refused(tokenizer, tmp_path):
    model = random_model(gpt2_config(tokenizer.vocab_size - 1))
    with pytest.raises(BinaryLMError, match="tokenizer has 300 ids"):
        export_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ metadata


def test_metadata_is_what_llama_cpp_reads(exported, tokenizer):
    model, path = exported
    config, metadata = model.config, stored_metadata(path)
    arch = "gpt2" if config.position == "learned" else "llama"
    assert metadata["general.architecture"] == arch
    assert metadata["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert metadata[f"{arch}.context_length"] == config.context_length
    assert metadata[f"{arch}.embedding_length"] == config.d_model
    assert metadata[f"{arch}.block_count"] == config.n_layer
    assert metadata[f"{arch}.feed_forward_length"] == config.d_ff
    assert metadata[f"{arch}.attention.head_count"] == config.n_head
    assert metadata[f"{arch}.attention.head_count_kv"] == config.n_kv_heads
    eps_key = f"{arch}.attention.layer_norm_epsilon" if arch == "gpt2" else f"{arch}.attention.layer_norm_rms_epsilon"
    assert metadata[eps_key] == pytest.approx(config.norm_eps)
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.bos_token_id"] == metadata["tokenizer.ggml.eos_token_id"] == tokenizer.eot_id
    if arch == "llama":
        assert metadata["llama.rope.dimension_count"] == config.head_dim
        assert metadata["llama.rope.freq_base"] == config.rope_base
        scaled = config.rope_scaling != 1 and config.rope_type == "linear"
        assert metadata.get("llama.rope.scaling.type") == ("linear" if scaled else None)
        assert metadata.get("llama.rope.scaling.factor") == (config.rope_scaling if scaled else None)


def test_metadata_keys_and_codes_agree_with_the_gguf_package():
    assert SHAPE_KEYS == {
        "vocab_size": gguf.Keys.LLM.VOCAB_SIZE, "context_length": gguf.Keys.LLM.CONTEXT_LENGTH,
        "d_model": gguf.Keys.LLM.EMBEDDING_LENGTH, "n_layer": gguf.Keys.LLM.BLOCK_COUNT,
        "d_ff": gguf.Keys.LLM.FEED_FORWARD_LENGTH, "n_head": gguf.Keys.Attention.HEAD_COUNT,
        "n_kv_heads": gguf.Keys.Attention.HEAD_COUNT_KV,
    }
    assert NORM_EPS_KEYS == {"gpt2": gguf.Keys.Attention.LAYERNORM_EPS, "llama": gguf.Keys.Attention.LAYERNORM_RMS_EPS}
    assert FILE_TYPES == {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    token_types = gguf.TokenType
    assert (NORMAL_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN, UNUSED_TOKEN) == (
        token_types.NORMAL, token_types.CONTROL, token_types.USER_DEFINED, token_types.UNUSED)


def test_f16_export_halves_the_matrices_and_reads_back_closely(tokenizer, tmp_path):
    model = random_model(llama_config(tokenizer.vocab_size, tie_embeddings=False))
    export_gguf(model, tokenizer, tmp_path / "f32.gguf")
    export_gguf(model, tokenizer, tmp_path / "f16.gguf", dtype="f16")
    full = {tensor.name: tensor for tensor in gguf.GGUFReader(tmp_path / "f32.gguf").tensors}
    for tensor in gguf.GGUFReader(tmp_path / "f16.gguf").tensors:
        matrix = len(tensor.shape) == 2
        assert tensor.tensor_type == (gguf.GGMLQuantizationType.F16 if matrix else gguf.GGMLQuantizationType.F32)
        assert tensor.n_bytes == full[tensor.name].n_bytes // (2 if matrix else 1)
    assert stored_metadata(tmp_path / "f16.gguf")["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    _, state_dict, _ = read_gguf(tmp_path / "f16.gguf")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(state_dict[name], tensor, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("overrides, option", [
    (dict(n_experts=2), "n_experts"),  # a mixture of experts
    (dict(norm="layernorm", mlp="gelu"), "model.norm"),  # rotary positions with LayerNorm: neither family
    (dict(sliding_window=8), "sliding_window"),  # llama.cpp's llama graph attends to everything
])
def test_configs_llama_cpp_cannot_run_are_refused(overrides, option, tokenizer, tmp_path):
    model = Transformer(llama_config(tokenizer.vocab_size, **overrides))
    with pytest.raises(BinaryLMError, match=option):
        export_gguf(model, tokenizer, tmp_path / "model.gguf")


def llama_3_1_shaped(**rope) -> ModelConfig:
    """A config with Llama 3.1's rotary shape: head_dim 128, base 500000."""
    return llama_config(100, d_model=512, n_head=4, n_kv_heads=4, rope_base=500000.0, **rope)


@pytest.mark.parametrize("low, high, original", [(1.0, 4.0, 8192), (1.0, 2.0, 4096)])
def test_llama_cpp_divisors_read_back_as_the_llama3_settings_that_made_them(low, high, original):
    """A llama.cpp-made Llama 3.1 file holds only rope_freqs; the settings come back from its values."""
    target = llama_3_1_shaped(rope_type="llama3", rope_scaling=8.0, rope_original_context=original,
                              rope_low_freq_factor=low, rope_high_freq_factor=high)
    assert _with_frequency_factors(llama_3_1_shaped(), llama3_divisors(target)) == target
    linear = _with_frequency_factors(llama_3_1_shaped(), torch.full((64,), 2.0))
    assert (linear.rope_type, linear.rope_scaling) == ("linear", 2.0)
    for nonsense in (torch.linspace(1.0, 8.0, 64), torch.full((64,), 0.5), torch.ones(3)):
        with pytest.raises(BinaryLMError, match="rope_freqs"):
            _with_frequency_factors(llama_3_1_shaped(), nonsense)


def test_an_unknown_dtype_is_refused(tokenizer, tmp_path):
    with pytest.raises(BinaryLMError, match="dtype"):
        export_gguf(Transformer(gpt2_config(tokenizer.vocab_size)), tokenizer, tmp_path / "model.gguf", dtype="q4")


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all\n", None])
def test_files_that_are_not_gguf_are_refused(content, tmp_path):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BinaryLMError, match="model.gguf"):
        read_gguf(path)


def rewrite_gguf(source, target, drop_tensor: str = "", changes: dict | None = None) -> None:
    """Copy a GGUF file with one tensor left out and some metadata values changed."""
    reader, changes = gguf.GGUFReader(source), changes or {}
    fields = {key: field for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    writer = gguf.GGUFWriter(target, changes.get("general.architecture", fields.pop("general.architecture").contents()))
    for key, field in fields.items():
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, changes.get(key, field.contents()), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name != drop_tensor:
            writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_missing_tensor_is_named(exported, tmp_path):
    _, path = exported
    rewrite_gguf(path, tmp_path / "broken.gguf", drop_tensor="blk.1.ffn_down.weight")
    with pytest.raises(BinaryLMError, match=r"broken\.gguf.*blk\.1\.ffn_down\.weight.*missing"):
        read_gguf(tmp_path / "broken.gguf")


def test_an_unsupported_architecture_is_named(exported, tmp_path):
    _, path = exported
    rewrite_gguf(path, tmp_path / "falcon.gguf", changes={"general.architecture": "falcon"})
    with pytest.raises(BinaryLMError, match=r"falcon\.gguf.*'falcon'"):
        read_gguf(tmp_path / "falcon.gguf")
