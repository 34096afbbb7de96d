"""Parity with Hugging Face transformers: tiny random models imported into BinaryLM and exported back."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from binarylm.config import PRESETS, ModelConfig
from binarylm.errors import BinaryLMError
from binarylm.interop.hf import export_hf, import_hf, model_config_from_hf
from binarylm.model import Transformer
from binarylm.tokenizer import save_hf, train_bpe

transformers = pytest.importorskip("transformers")

TEXT = "def f(x):\n    return x + 1  # héllo wörld 🙂\n<|endoftext|>class A:\n\tpass\n"


@pytest.fixture(scope="module")
def tokenizer(val_texts):
    return train_bpe(val_texts[:20], vocab_size=300, progress=False)


def hf_models(vocab: int) -> dict:
    """Tiny random Hugging Face models of every supported kind, built here."""
    llama = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64)
    configs = {
        "gpt2": transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_layer=2, n_head=4, n_embd=32),
        "gpt2-untied": transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_layer=2, n_head=2, n_embd=32,
                                               n_inner=48, tie_word_embeddings=False),
        "llama-gqa": transformers.LlamaConfig(**llama, num_key_value_heads=2, rope_theta=500.0),
        "llama-mqa-tied": transformers.LlamaConfig(**llama, num_key_value_heads=1, tie_word_embeddings=True),
        "llama-bias-scaled": transformers.LlamaConfig(**llama, attention_bias=True, mlp_bias=True,
                                                      rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 10000.0}),
        "mistral-window": transformers.MistralConfig(**llama, num_key_value_heads=2, sliding_window=5),
        # head_dim 16: wavelengths 6.3, 20, 63, 199, ... against 16 and 64, so every llama3 band is used
        "llama-llama3": transformers.LlamaConfig(**{**llama, "hidden_size": 64, "intermediate_size": 96},
                                                 rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                                  "rope_theta": 10000.0, "low_freq_factor": 1.0,
                                                                  "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 64}),
    }
    model_classes = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
                     "mistral": transformers.MistralForCausalLM}
    built = {}
    for name, config in configs.items():
        torch.manual_seed(len(built))
        model = model_classes[name.split("-")[0]](config).eval()
        for parameter in model.parameters():  # random biases and norms too, not just their 0/1 inits
            parameter.data.add_(0.05 * torch.randn_like(parameter))
        built[name] = model
    return built


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-untied", "llama-gqa", "llama-mqa-tied", "llama-bias-scaled",
                                  "mistral-window", "llama-llama3"])
def test_logits_match_transformers_in_both_directions(kind, tokenizer, tmp_path):
    theirs = hf_models(tokenizer.vocab_size)[kind]
    theirs.save_pretrained(tmp_path / "hf")
    save_hf(tokenizer, tmp_path / "hf" / "tokenizer.json")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))

    ours, imported_tokenizer, _ = import_hf(tmp_path / "hf")
    assert (our_logits(ours, ids) - hf_logits(theirs, ids)).abs().max() < 1e-4

    export_hf(ours, imported_tokenizer, tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is type(theirs)
    assert (hf_logits(again, ids) - hf_logits(theirs, ids)).abs().max() < 1e-4
    assert imported_tokenizer.encode(TEXT, allowed_special="all") == tokenizer.encode(TEXT, allowed_special="all")


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_binarylm_models_export_to_transformers_with_a_tokenizer_autotokenizer_loads(preset, tokenizer, tmp_path):
    torch.manual_seed(3)
    ours = Transformer(ModelConfig(**{**PRESETS[preset], "vocab_size": tokenizer.vocab_size})).eval()
    export_hf(ours, tokenizer, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (1, 30))
    assert (hf_logits(theirs, ids) - our_logits(ours, ids)).abs().max() < 1e-4
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto(TEXT)["input_ids"] == tokenizer.encode(TEXT, allowed_special="all")
    assert auto.decode(tokenizer.encode(TEXT, allowed_special="all")) == TEXT
    assert theirs.config.eos_token_id == tokenizer.eot_id


def test_sharded_checkpoints_are_read_through_their_index(tokenizer, tmp_path):
    theirs = hf_models(tokenizer.vocab_size)["llama-gqa"]
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    save_hf(tokenizer, tmp_path / "tokenizer.json")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours, _, _ = import_hf(tmp_path)
    ids = torch.randint(0, tokenizer.vocab_size, (1, 9))
    assert (our_logits(ours, ids) - hf_logits(theirs, ids)).abs().max() < 1e-4


@pytest.fixture
def gpt2_dir(tokenizer, tmp_path):
    hf_models(tokenizer.vocab_size)["gpt2"].save_pretrained(tmp_path)
    save_hf(tokenizer, tmp_path / "tokenizer.json")
    return tmp_path


def rewrite_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_an_unsupported_architecture_is_named(gpt2_dir):
    rewrite_config(gpt2_dir, architectures=["BertForMaskedLM"])
    with pytest.raises(BinaryLMError, match="'BertForMaskedLM' is not supported; BinaryLM imports GPT2LMHeadModel"):
        import_hf(gpt2_dir)


def test_a_missing_tensor_is_named(gpt2_dir):
    tensors = load_file(gpt2_dir / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, gpt2_dir / "model.safetensors")
    with pytest.raises(BinaryLMError, match=r"missing \['transformer.h.1.mlp.c_fc.weight'\]"):
        import_hf(gpt2_dir)


def test_a_mis_shaped_tensor_is_named(gpt2_dir):
    tensors = load_file(gpt2_dir / "model.safetensors")
    tensors["transformer.h.0.mlp.c_fc.weight"] = tensors["transformer.h.0.mlp.c_fc.weight"][:, :100].contiguous()
    save_file(tensors, gpt2_dir / "model.safetensors")
    with pytest.raises(BinaryLMError, match=r"transformer.h.0.mlp.c_fc.weight has shape \(100, 32\)"):
        import_hf(gpt2_dir)


def test_unsupported_options_and_missing_files_are_clear(gpt2_dir, tokenizer, tmp_path):
    rewrite_config(gpt2_dir, activation_function="relu")
    with pytest.raises(BinaryLMError, match="activation 'relu' is not supported"):
        import_hf(gpt2_dir)
    rewrite_config(gpt2_dir, activation_function="gelu_new")
    llama = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, architectures=["LlamaForCausalLM"]).to_dict()
    with pytest.raises(BinaryLMError, match="rope scaling 'llama3' needs 'original_max_position_embeddings'"):
        model_config_from_hf({**llama, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "x")
    (gpt2_dir / "model.safetensors").unlink()
    with pytest.raises(BinaryLMError, match="model.safetensors does not exist"):
        import_hf(gpt2_dir)
    with pytest.raises(BinaryLMError, match="config.json does not exist"):
        import_hf(tmp_path / "nowhere")
    moe = Transformer(ModelConfig(**{**PRESETS["llama-tiny"], "vocab_size": tokenizer.vocab_size, "n_experts": 2}))
    with pytest.raises(BinaryLMError, match="llama needs model.n_experts=0"):
        export_hf(moe, tokenizer, tmp_path / "moe")


def test_open_tokenizer_reads_hugging_face_files_too(tokenizer, tmp_path):
    from binarylm.tokenizer import open_tokenizer

    save_hf(tokenizer, tmp_path / "tokenizer.json")
    for spec in (tmp_path, tmp_path / "tokenizer.json"):
        assert open_tokenizer(spec).encode(TEXT, allowed_special="all") == tokenizer.encode(TEXT, allowed_special="all")
