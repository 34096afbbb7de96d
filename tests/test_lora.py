"""LoRA and QLoRA (binarylm/model/lora.py) and PEFT adapters both ways (binarylm/interop/peft.py)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from binarylm.config import PRESETS, ModelConfig
from binarylm.errors import BinaryLMError
from binarylm.model import Transformer
from binarylm.model.lora import (
    LoRAConfig,
    LoRALinear,
    add_lora,
    describe_trainable,
    load_adapter,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
    strip_lora,
    trainable_parameters,
    unmerge_lora,
)
from binarylm.model.quant import Int4Linear, Int8Linear, dequantize_model, quantize_model

# transformers announces a rename that peft's loading path still calls; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

VOCAB = 270
ALL_LAYERS = ["qkv", "proj", "gate", "up", "down"]  # every linear layer of a block ("gate" only with SwiGLU)


def make_model(preset: str = "tiny", seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**PRESETS[preset], "vocab_size": VOCAB, **changes})).eval()


def targets_for(model: Transformer) -> list[str]:
    return [t for t in ALL_LAYERS if t != "gate" or model.config.mlp == "swiglu"]


def randomize_adapters(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Nonzero B (and fresh A), so that the adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * std)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * std)


def token_ids(batch: int = 2, length: int = 12, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


# ------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_at_init_the_adapted_model_computes_exactly_what_the_base_did(preset):
    model, ids = make_model(preset), token_ids()
    before = logits(model, ids)
    names = add_lora(model, LoRAConfig(rank=4, targets=targets_for(model)))
    assert len(names) == model.config.n_layer * len(targets_for(model))
    assert all(torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
               for _, layer in lora_layers(model))
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_merged_equals_unmerged_and_unmerging_restores_the_base(preset):
    model, ids = make_model(preset), token_ids()
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets_for(model)))
    randomize_adapters(model)
    unmerged = logits(model, ids)
    assert len(merge_lora(model)) == len(lora_layers(model))
    assert merge_lora(model) == []  # already merged: nothing to do
    merged = logits(model, ids)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    unmerge_lora(model)
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)
    for name, layer in lora_layers(model):
        assert torch.allclose(layer.base.weight, base_state[f"{name}.weight"], atol=1e-6)


def test_strip_lora_gives_a_plain_model_with_or_without_the_update():
    model, ids = make_model(), token_ids()
    base = logits(model, ids)
    add_lora(model, LoRAConfig(rank=2, targets=["qkv", "down"]))
    randomize_adapters(model)
    adapted = logits(model, ids)
    merged = copy.deepcopy(model)
    assert strip_lora(merged, merge=True) is merged
    assert not lora_layers(merged) and set(merged.state_dict()) == set(make_model().state_dict())
    assert torch.allclose(logits(merged, ids), adapted, atol=1e-5)
    strip_lora(model)
    assert torch.allclose(logits(model, ids), base, atol=1e-6)


def test_only_the_adapters_are_trainable_and_their_count_is_r_times_in_plus_out():
    model = make_model("llama-tiny")
    total_before = model.num_parameters()
    rank = 4
    add_lora(model, LoRAConfig(rank=rank, targets=["qkv", "attn.proj"]))
    trainable_names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable_names and all(name.endswith((".lora_A", ".lora_B")) for name in trainable_names)
    expected = sum(rank * (layer.in_features + layer.out_features) for _, layer in lora_layers(model))
    trainable, total = trainable_parameters(model)
    assert trainable == expected == 2 * rank * ((64 + 128) + (64 + 64))  # qkv: 4 + 2 + 2 heads of 16
    assert total == total_before + trainable
    assert 0 < trainable / total < 0.05
    assert describe_trainable(model) == f"trainable {trainable:,} of {total:,} parameters " \
                                        f"({100 * trainable / total:.2f}%)"


def test_optimizer_steps_change_the_adapters_and_nothing_else():
    model, ids = make_model(), token_ids(length=16)
    add_lora(model, LoRAConfig(rank=4, targets=["qkv", "proj", "up", "down"]))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == set(lora_state_dict(model))
    assert losses[-1] < losses[0]


def test_dropout_acts_on_the_adapter_input_in_training_only():
    model, ids = make_model(), token_ids()
    add_lora(model, LoRAConfig(rank=4, dropout=0.5, targets=["qkv"]))
    randomize_adapters(model)
    assert torch.equal(logits(model, ids), logits(model, ids))
    model.train()
    assert not torch.equal(logits(model, ids), logits(model, ids))
    with lora_disabled(model):  # no adapters: dropout has nothing left to act on (the model's own is 0)
        assert torch.equal(logits(model, ids), logits(make_model(), ids))


def test_an_adapted_output_head_trains_through_the_fused_loss():
    model, ids = make_model("llama-tiny", tie_embeddings=False), token_ids(length=16)
    add_lora(model, LoRAConfig(rank=4, targets=["lm_head"]))
    randomize_adapters(model)
    _, fused = model(ids[:, :-1], ids[:, 1:])
    plain = F.cross_entropy(model(ids[:, :-1])[0].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(fused, plain, atol=1e-5)
    fused.backward()
    assert model.lm_head.lora_B.grad.abs().sum() > 0


def test_a_tied_output_head_is_not_merged_into_the_embedding():
    model = make_model()
    add_lora(model, LoRAConfig(rank=2, targets=["lm_head", "qkv"]))
    with pytest.raises(BinaryLMError, match="lm_head: its weight is shared"):
        merge_lora(model)
    assert not any(layer.merged for _, layer in lora_layers(model))  # refused before anything changed


def test_adapters_disabled_give_the_base_model():
    model, ids = make_model(), token_ids()
    base = logits(model, ids)
    add_lora(model, LoRAConfig(targets=["qkv"]))
    randomize_adapters(model)
    with lora_disabled(model):
        assert torch.equal(logits(model, ids), base)
    assert not torch.allclose(logits(model, ids), base)


def test_save_and_load_an_adapter(tmp_path):
    model, ids = make_model("llama-tiny"), token_ids()
    config = LoRAConfig(rank=3, alpha=6, dropout=0.1, targets=["qkv", "blocks.1.mlp.*"])
    add_lora(model, config)
    randomize_adapters(model)
    expected = logits(model, ids)
    (tmp_path / "keep.txt").write_text("other files stay")
    save_adapter(tmp_path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors", "keep.txt"]
    description = json.loads((tmp_path / "adapter.json").read_text())
    assert description["config"] == config.to_dict()
    assert description["layers"]["blocks.1.mlp.gate"] == {"rank": 3, "alpha": 6.0}

    fresh = make_model("llama-tiny")
    assert load_adapter(tmp_path, fresh) == config
    assert torch.equal(logits(fresh, ids), expected)
    assert [name for name, _ in lora_layers(fresh)] == [name for name, _ in lora_layers(model)]
    assert isinstance(fresh.blocks[0].attn.qkv.dropout, torch.nn.Dropout)

    again = make_model("llama-tiny")
    add_lora(again, config)
    load_adapter(tmp_path, again)  # onto existing adapters of the same shape
    assert torch.equal(logits(again, ids), expected)


def test_loading_an_adapter_onto_the_wrong_model_is_a_clear_error(tmp_path):
    model = make_model("llama-tiny")
    add_lora(model, LoRAConfig(rank=3, targets=["qkv"]))
    save_adapter(tmp_path, model)
    with pytest.raises(BinaryLMError, match="wrong shape"):
        load_adapter(tmp_path, make_model("llama-tiny", d_model=32))
    with pytest.raises(BinaryLMError, match="no linear layer 'blocks.0.mlp.gate'"):
        other = make_model("tiny")
        json_path = tmp_path / "adapter.json"
        description = json.loads(json_path.read_text())
        description["layers"] = {"blocks.0.mlp.gate": {"rank": 3, "alpha": 16}}
        json_path.write_text(json.dumps(description))
        load_adapter(tmp_path, other)
    with pytest.raises(BinaryLMError, match="adapter.json does not exist"):
        load_adapter(tmp_path / "nowhere", make_model())


def test_targets_that_match_no_layer_name_the_available_layers():
    model = make_model()
    message = r"'fc' match no linear layer; the model's linear layers are blocks\.\*\.attn\.qkv, " \
              r"blocks\.\*\.attn\.proj, blocks\.\*\.mlp\.up, blocks\.\*\.mlp\.down, lm_head"
    with pytest.raises(BinaryLMError, match=message):
        add_lora(model, LoRAConfig(targets=["qkv", "fc"]))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched


def test_config_is_validated_and_targets_can_be_one_string():
    assert LoRAConfig(targets="qkv, proj").targets == ["qkv", "proj"]
    for bad, match in [(dict(rank=0), "lora.rank"), (dict(alpha=-1), "lora.alpha"), (dict(dropout=1.0), "dropout"),
                       (dict(targets=[]), "lora.targets")]:
        with pytest.raises(BinaryLMError, match=match):
            add_lora(make_model(), LoRAConfig(**bad))
    with pytest.raises(BinaryLMError, match="unknown LoRA setting"):
        LoRAConfig.from_dict({"rank": 4, "rnak": 2})
    model = make_model()
    add_lora(model, LoRAConfig(targets=["qkv"]))
    with pytest.raises(BinaryLMError, match="already has LoRA adapters"):
        add_lora(model, LoRAConfig(targets=["proj"]))


# ------------------------------------------------------------------ QLoRA


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_qlora_trains_adapters_over_a_frozen_quantized_base(scheme):
    model, ids = make_model(), token_ids(length=16)
    quantize_model(model, scheme, group_size=32, skip=["lm_head"])
    add_lora(model, LoRAConfig(rank=4, targets=["qkv", "proj", "up", "down"]))
    assert all(isinstance(layer.base, Int8Linear | Int4Linear) for _, layer in lora_layers(model))
    randomize_adapters(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.train()
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == set(lora_state_dict(model))
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in with_grad)
    torch.optim.SGD([model.get_parameter(name) for name in with_grad], lr=0.1).step()
    assert all(torch.equal(buffers[name], b) for name, b in model.named_buffers())
    trainable, total = trainable_parameters(model)
    assert total == make_model().num_parameters() + trainable  # quantized weights count as what they stand for

    with pytest.raises(BinaryLMError, match="dequantize_model"):
        merge_lora(model)
    model.eval()
    adapted = logits(model, ids)
    dequantize_model(model)  # keeps the adapters, now over float bases
    assert all(isinstance(layer.base, torch.nn.Linear) for _, layer in lora_layers(model))
    merge_lora(model)
    assert torch.allclose(logits(model, ids), adapted, atol=0.05 if scheme == "int8" else 0.2)


def test_lora_linear_refuses_a_layer_it_cannot_wrap():
    with pytest.raises(BinaryLMError, match="not Embedding"):
        LoRALinear(torch.nn.Embedding(4, 4), rank=2, alpha=4)


# ------------------------------------------------------------------ PEFT


@pytest.fixture(scope="module")
def tokenizer():
    from binarylm.tokenizer import train_bpe

    return train_bpe(["def f(x):\n    return x + 1\n" * 20, "hello world, the quick brown fox"], vocab_size=VOCAB,
                     progress=False)


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import peft

    return transformers, peft


def load_with_peft(hf, base_dir, adapter_dir):
    transformers, peft = hf
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def peft_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


PARITY_CASES = {
    # GPT-2: fused Conv1D c_attn; attn.proj only in block 0, so "c_proj" must not be a bare target
    "gpt2": (dict(preset="tiny"), ["qkv", "blocks.0.attn.proj", "up"], ["c_attn", "c_fc",
                                                                       "transformer.h.0.attn.c_proj"]),
    # Llama with grouped-query attention, an untied head and no adapter on up_proj
    "llama": (dict(preset="llama-tiny", tie_embeddings=False), ["qkv", "proj", "gate", "down", "lm_head"],
              ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "v_proj"]),
}


@pytest.mark.parametrize("kind", list(PARITY_CASES))
def test_an_exported_adapter_gives_the_same_logits_in_peft_and_transformers(kind, hf, tokenizer, tmp_path):
    from binarylm.interop.hf import export_hf
    from binarylm.interop.peft import export_peft

    model_args, targets, hf_targets = PARITY_CASES[kind]
    model, ids = make_model(**model_args), token_ids(length=20)
    add_lora(model, LoRAConfig(rank=4, alpha=12, targets=targets))
    randomize_adapters(model)
    export_hf(strip_lora(copy.deepcopy(model)), tokenizer, tmp_path / "base")
    export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))

    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(settings["target_modules"]) == hf_targets
    assert (settings["r"], settings["lora_alpha"], settings["fan_in_fan_out"]) == (4, 12, kind == "gpt2")
    theirs = load_with_peft(hf, tmp_path / "base", tmp_path / "adapter")
    adapted = {name.rsplit(".lora_", 1)[0] for name in theirs.state_dict() if ".lora_A." in name}
    assert len(adapted) == sum(len(link_parts) for link_parts in _hf_modules(model))  # nothing more, nothing less
    ours = logits(model, ids)
    assert (peft_logits(theirs, ids) - ours).abs().max() < 1e-4
    with lora_disabled(model):
        assert (peft_logits(theirs, ids) - logits(model, ids)).abs().max() > 1e-2  # the adapter does matter


def _hf_modules(model):
    from binarylm.interop.peft import module_links

    links = module_links(model)
    return [links[name].theirs for name, _ in lora_layers(model)]


@pytest.mark.parametrize("kind", list(PARITY_CASES))
def test_an_exported_peft_adapter_imports_back_unchanged(kind, hf, tmp_path):
    from binarylm.interop.peft import export_peft, import_peft

    model_args, targets, _ = PARITY_CASES[kind]
    model, ids = make_model(**model_args), token_ids()
    add_lora(model, LoRAConfig(rank=4, alpha=12, dropout=0.05, targets=targets))
    randomize_adapters(model)
    export_peft(model, tmp_path)
    fresh = make_model(**model_args)
    config = import_peft(tmp_path, fresh)
    assert (config.rank, config.alpha, config.dropout) == (4, 12.0, 0.05)
    assert config.targets == [name for name, _ in lora_layers(model)]
    theirs, ours = lora_state_dict(fresh), lora_state_dict(model)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[name], ours[name]) for name in ours)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_a_peft_trained_llama_adapter_imports_exactly_and_exports_again(hf, tokenizer, tmp_path):
    """q/k/v adapters with their own A (as PEFT trains them), k_proj left out, two ranks: all exact."""
    from binarylm.interop.hf import export_hf, import_hf
    from binarylm.interop.peft import export_peft, import_peft

    transformers, peft = hf
    export_hf(make_model("llama-tiny"), tokenizer, tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    settings = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                               rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})
    theirs = peft.get_peft_model(base, settings)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ids = token_ids(length=20)
    expected = peft_logits(theirs.eval(), ids)

    ours, _, _ = import_hf(tmp_path / "base")
    import_peft(tmp_path / "peft", ours)
    qkv = ours.blocks[0].attn.qkv
    assert qkv.rank == 4 + 2  # q's and v's A stacked
    assert torch.count_nonzero(qkv.lora_B[64:96]) == 0  # no k_proj adapter: zero rows for the keys
    assert (logits(ours, ids) - expected).abs().max() < 1e-4

    export_peft(ours, tmp_path / "again")
    again = load_with_peft(hf, tmp_path / "base", tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"]
    assert (peft_logits(again, ids) - expected).abs().max() < 1e-4


def test_importing_a_peft_adapter_that_does_not_fit_is_a_clear_error(hf, tmp_path):
    from binarylm.interop.peft import export_peft, import_peft

    model = make_model("llama-tiny")
    add_lora(model, LoRAConfig(rank=2, targets=["qkv"]))
    export_peft(model, tmp_path)
    with pytest.raises(BinaryLMError, match="not linear layers of this model"):
        import_peft(tmp_path, make_model("tiny"))
    with pytest.raises(BinaryLMError, match="rows but the model's layer has"):
        import_peft(tmp_path, make_model("llama-tiny", n_kv_heads=4))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": True}))
    with pytest.raises(BinaryLMError, match="use_dora=True is not supported"):
        import_peft(tmp_path, make_model("llama-tiny"))
    with pytest.raises(BinaryLMError, match="adapter_config.json does not exist"):
        import_peft(tmp_path / "missing", make_model("llama-tiny"))
