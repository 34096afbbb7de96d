"""Checkpoint directories and the config system."""

from pathlib import Path

import pytest
import torch

from binarylm.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from binarylm.config import PRESETS, build_config, load_config, parse_overrides
from binarylm.errors import BinaryLMError
from binarylm.files import FILE_MODE
from binarylm.model import Transformer
from binarylm.tokenizer import train_bpe

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    config = build_config({"model": {"preset": "tiny", "vocab_size": 300}})
    torch.manual_seed(0)
    model = Transformer(config.model)
    tokenizer = train_bpe(["def f(x):\n    return x + 1\n"] * 20, 300, progress=False)
    path = save_checkpoint(run_dir, 7, model, tokenizer, config, {"step": 7}, {"val_loss": 1.5})
    return run_dir, path, model, tokenizer, config


def test_checkpoint_round_trips(saved):
    run_dir, path, model, tokenizer, config = saved
    loaded = load_checkpoint(run_dir)
    assert loaded.path == path and loaded.config == config and loaded.metrics == {"val_loss": 1.5}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))
    assert loaded.model.lm_head.weight is loaded.model.token_embedding.weight  # still tied
    assert loaded.tokenizer.encode("def g(): pass") == tokenizer.encode("def g(): pass")
    assert load_train_state(path) == {"step": 7}
    assert sorted(p.name for p in run_dir.iterdir()) == ["ckpt-000007", "latest"]  # no temporary leftovers


def test_checkpoint_files_get_the_permissions_a_plain_open_would(saved):
    _, path, *_ = saved
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir() if f.is_file()}
    assert "model.safetensors" in modes  # which safetensors itself would create 0600
    assert set(modes.values()) == {FILE_MODE}, modes


def test_missing_and_corrupt_checkpoints_are_clear_errors(saved, tmp_path):
    with pytest.raises(BinaryLMError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(BinaryLMError, match="neither a checkpoint nor a run directory"):
        load_checkpoint(tmp_path)
    broken = tmp_path / "ckpt-000001"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((saved[1] / name).read_bytes())
    with pytest.raises(BinaryLMError, match="incomplete .*model.safetensors"):
        load_checkpoint(broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BinaryLMError, match="cannot be read"):
        load_checkpoint(broken)
    with pytest.raises(BinaryLMError, match="no train_state.pt"):
        load_train_state(broken)


def test_missing_or_mis_shaped_tensors_are_named(saved, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(saved[1], tmp_path / "ckpt")
    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["blocks.0.mlp.up.weight"] = tensors["blocks.0.mlp.up.weight"][:10].contiguous()
    del tensors["final_norm.bias"]
    save_file(tensors, weights)
    with pytest.raises(BinaryLMError) as error:
        load_checkpoint(copy)
    message = str(error.value)
    assert "missing final_norm.bias" in message and "\n" not in message
    assert "blocks.0.mlp.up.weight is (10, " in message and "where config.json implies" in message


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_loads_and_builds(path):
    config = load_config(path)
    with torch.device("meta"):
        model = Transformer(config.model)
    assert model.num_parameters() > 0


def test_gpt2_preset_has_gpt2_small_parameter_count():
    config = build_config({"model": {"preset": "gpt2-124m"}})
    with torch.device("meta"):
        assert round(Transformer(config.model).num_parameters() / 1e6) == 124


def test_presets_are_valid():
    for name in PRESETS:
        build_config({"model": {"preset": name}})


def test_overrides_are_typed():
    config = load_config(None, parse_overrides(["--train.lr", "3e-4", "--model.n_layer=3", "--model.bias", "false",
                                                "--data.inputs", "a.txt,b.txt"]))
    assert config.train.lr == 3e-4 and config.model.n_layer == 3 and config.model.bias is False
    assert config.data.inputs == ["a.txt", "b.txt"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.lrr": "1"}, "unknown key train.lrr .did you mean 'lr'.*valid keys in train"),
        ({"model.n_layer": "two"}, "must be a number of type int"),
        ({"trian.lr": "1"}, "SECTION one of model, data, train"),
        ({"model.preset": "gpt5"}, "unknown model preset"),
        ({"model.d_model": "100", "model.n_head": "3"}, "divisible"),
        ({"train.dtype": "float16"}, "train.dtype must be one of"),
        ({"model.rope_type": "yarn"}, "model.rope_type must be linear or llama3"),
        ({"model.preset": "llama-tiny", "model.rope_type": "llama3"}, "llama3 rope scaling needs model.rope_original"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(BinaryLMError, match=message):
        load_config(None, overrides)


def test_bad_yaml_files_are_clear_errors(tmp_path):
    with pytest.raises(BinaryLMError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(BinaryLMError, match="typo.yaml: unknown key train.max_step .did you mean 'max_steps'"):
        load_config(path)
    path.write_text("model: [1, 2\n")
    with pytest.raises(BinaryLMError, match="not valid YAML"):
        load_config(path)
    path.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(BinaryLMError, match="unknown config section 'trainer'"):
        load_config(path)
