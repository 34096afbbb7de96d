"""`binarylm convert` between formats and `binarylm info`, as a user runs them."""

import json

import pytest
import torch

from binarylm.checkpoint import load_checkpoint, write_checkpoint
from binarylm.cli import main
from binarylm.config import PRESETS, ModelConfig, RunConfig
from binarylm.interop.convert import load_any
from binarylm.model import Transformer
from binarylm.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tokenizer(val_texts):
    return train_bpe(val_texts[:10], vocab_size=280, progress=False)


def checkpoint(tmp_path, tokenizer, preset="llama-tiny", **changes):
    torch.manual_seed(0)
    config = ModelConfig(**{**PRESETS[preset], "vocab_size": tokenizer.vocab_size, **changes})
    return write_checkpoint(tmp_path / "ckpt", Transformer(config), tokenizer, RunConfig(model=config))


def logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_round_trips_through_every_format_keep_the_logits(preset, tokenizer, tmp_path, capsys):
    source = checkpoint(tmp_path, tokenizer, preset)
    assert main(["convert", str(source), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "model.gguf"), "--to", "gguf"]) == 0
    assert main(["convert", str(tmp_path / "model.gguf"), str(tmp_path / "back"), "--to", "binarylm"]) == 0
    assert "wrote gguf" in capsys.readouterr().out
    original, back = load_checkpoint(source), load_checkpoint(tmp_path / "back")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 16))
    assert torch.allclose(logits(original.model, ids), logits(back.model, ids), atol=1e-5)
    assert back.config.model == original.config.model
    assert back.tokenizer.encode("x = 1 <|endoftext|>", allowed_special="all") == \
        tokenizer.encode("x = 1 <|endoftext|>", allowed_special="all")


def test_info_reports_the_same_figures_for_a_preset_a_checkpoint_and_its_export(tokenizer, tmp_path, capsys):
    source = checkpoint(tmp_path, tokenizer)
    load_any(source)  # a sanity check that the checkpoint is whole
    main(["convert", str(source), str(tmp_path / "hf"), "--to", "hf"])
    capsys.readouterr()
    figures = []
    for target in (str(source), str(tmp_path / "hf")):
        assert main(["info", target, "--json"]) == 0
        figures.append(json.loads(capsys.readouterr().out))
    assert figures[0] == figures[1]
    model = load_checkpoint(source).model
    assert figures[0]["parameters"] == model.num_parameters()
    assert figures[0]["kv_cache_bytes_per_token"]["fp32"] == 4 * 2 * 2 * 2 * 16  # 2 layers, 2 KV heads, head 16


def test_info_for_presets_and_overrides(capsys):
    assert main(["info", "llama-1b"]) == 0
    text = capsys.readouterr().out
    assert "1.24B" in text and "32.0 KiB per token bf16" in text
    assert main(["info", "gpt2-124m", "--model.n_layer", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["non_embedding_parameters"] == 6 * (12 * 768**2 + 13 * 768) + 2 * 768


@pytest.mark.parametrize("argv, message", [
    (["info", "lama-1b"], "did you mean 'llama-1b'"),
    (["info", "tiny", "--model.n_head", "3"], "must be divisible by model.n_head"),
    (["convert", "no/such/dir", "out", "--to", "hf"], "no/such/dir does not exist"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_exporting_an_architecture_the_target_cannot_express_is_refused(tokenizer, tmp_path, capsys):
    source = checkpoint(tmp_path, tokenizer, n_experts=2)
    assert main(["convert", str(source), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "llama needs model.n_experts=0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quantize_command_writes_a_checkpoint_every_loader_reads(tokenizer, tmp_path, capsys):
    source = checkpoint(tmp_path, tokenizer)
    assert main(["quantize", "-c", str(source), "-o", str(tmp_path / "q8"), "--scheme", "int8"]) == 0
    assert "int8:" in capsys.readouterr().out
    quantized = load_checkpoint(tmp_path / "q8")
    original = load_checkpoint(source)
    ids = torch.randint(0, tokenizer.vocab_size, (1, 12))
    assert (logits(quantized.model, ids) - logits(original.model, ids)).abs().max() < 0.05
    assert main(["convert", str(tmp_path / "q8"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    exported = load_any(tmp_path / "hf")[0]
    assert (logits(exported, ids) - logits(quantized.model, ids)).abs().max() < 1e-2  # dequantized, not garbage
    assert main(["quantize", "-c", str(source), "-o", str(tmp_path / "q4"), "--scheme", "int4", "--group-size",
                 "48"]) == 2
    assert "group size must be one of 32, 64, 128, 256" in capsys.readouterr().err
