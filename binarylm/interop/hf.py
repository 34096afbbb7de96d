"""Hugging Face transformers directories in and out: GPT-2 and Llama families.

A Hugging Face model directory holds `config.json` (the architecture and its
sizes), the weights as safetensors (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) and a `tokenizer.json`. Reading one needs no
`transformers` at all: the config is plain JSON and the tensors are renamed,
and sometimes reshaped, into BinaryLM's layout:

- GPT-2 stores its linear layers as `Conv1D`, weight (in, out): transposed here;
- Llama keeps q, k and v as three matrices; BinaryLM fuses them into one `qkv`
  (rows: queries, then keys, then values), so they are concatenated on import
  and split on export. Both use the same "rotate half" rotary layout, so no
  permutation is needed (GGUF is different, see gguf.py).

Mistral is Llama with a sliding window, and maps onto the same options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from binarylm.config import ModelConfig, RunConfig
from binarylm.errors import BinaryLMError
from binarylm.files import staged_directory, write_json_atomically
from binarylm.interop.families import model_family
from binarylm.model import Transformer
from binarylm.tokenizer import Tokenizer, load_hf, save_hf

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
# Buffers some Hugging Face checkpoints carry that are not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclass(frozen=True)
class Link:
    """One BinaryLM tensor and the Hugging Face tensor(s) it is made of.

    Several `theirs` are concatenated along dim 0 to make `ours` (and `ours` is split
    back into them on export); `transpose` marks GPT-2's Conv1D weights, stored (in, out).
    """

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False


# ------------------------------------------------------------------ the tensor maps


def tensor_links(config: ModelConfig, family: str) -> list[Link]:
    """Every tensor of a BinaryLM model of this config with its Hugging Face counterpart."""
    links = _gpt2_links(config) if family == "gpt2" else _llama_links(config)
    if not config.tie_embeddings:
        links.append(Link("lm_head.weight", ("lm_head.weight",)))
    return links


def _gpt2_links(config: ModelConfig) -> list[Link]:
    links = [Link("token_embedding.weight", ("transformer.wte.weight",)),
             Link("position_embedding.weight", ("transformer.wpe.weight",))]
    parts = {"norm1": ("ln_1", False), "attn.qkv": ("attn.c_attn", True), "attn.proj": ("attn.c_proj", True),
             "norm2": ("ln_2", False), "mlp.up": ("mlp.c_fc", True), "mlp.down": ("mlp.c_proj", True)}
    for i in range(config.n_layer):
        for ours, (theirs, conv1d) in parts.items():
            links.append(Link(f"blocks.{i}.{ours}.weight", (f"transformer.h.{i}.{theirs}.weight",), conv1d))
            links.append(Link(f"blocks.{i}.{ours}.bias", (f"transformer.h.{i}.{theirs}.bias",)))
    links += [Link("final_norm.weight", ("transformer.ln_f.weight",)),
              Link("final_norm.bias", ("transformer.ln_f.bias",))]
    return links


def _llama_links(config: ModelConfig) -> list[Link]:
    links = [Link("token_embedding.weight", ("model.embed_tokens.weight",))]
    kinds = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        layer = f"model.layers.{i}"
        links.append(Link(f"blocks.{i}.norm1.weight", (f"{layer}.input_layernorm.weight",)))
        links.append(Link(f"blocks.{i}.norm2.weight", (f"{layer}.post_attention_layernorm.weight",)))
        for kind in kinds:
            qkv = tuple(f"{layer}.self_attn.{name}_proj.{kind}" for name in "qkv")
            links.append(Link(f"blocks.{i}.attn.qkv.{kind}", qkv))
            links.append(Link(f"blocks.{i}.attn.proj.{kind}", (f"{layer}.self_attn.o_proj.{kind}",)))
            for name in ("gate", "up", "down"):
                links.append(Link(f"blocks.{i}.mlp.{name}.{kind}", (f"{layer}.mlp.{name}_proj.{kind}",)))
    links.append(Link("final_norm.weight", ("model.norm.weight",)))
    return links


# ------------------------------------------------------------------ configs


def model_config_from_hf(hf: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    """(BinaryLM ModelConfig, family) for a Hugging Face config.json's contents."""
    architecture = (hf.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise BinaryLMError(
            f"{source}: architecture {architecture!r} is not supported; BinaryLM imports "
            f"{', '.join(ARCHITECTURES)}"
        )
    family = ARCHITECTURES[architecture]
    config = _gpt2_config(hf, source) if family == "gpt2" else _llama_config(hf, source)
    config.validate()
    return config, family


def _gpt2_config(hf: dict, source: str) -> ModelConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise BinaryLMError(f"{source}: activation {hf['activation_function']!r} is not supported "
                            "(BinaryLM's GPT-2 MLP uses the tanh-approximated GELU, gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise BinaryLMError(f"{source}: non-standard attention scaling is not supported")
    return ModelConfig(
        vocab_size=hf["vocab_size"], context_length=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        d_model=hf["n_embd"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=0.0,
    )


def _llama_config(hf: dict, source: str) -> ModelConfig:
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim", width // heads) != width // heads:
        raise BinaryLMError(f"{source}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads; "
                            "BinaryLM derives the head size from d_model / n_head")
    if hf.get("hidden_act", "silu") != "silu":
        raise BinaryLMError(f"{source}: activation {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
        raise BinaryLMError(f"{source}: attention_bias and mlp_bias differ; BinaryLM has one `bias` switch")
    rope = _rope_settings(hf, source)
    return ModelConfig(
        vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=heads, n_kv_heads=hf.get("num_key_value_heads") or heads, d_model=width,
        d_ff=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), bias=bool(hf.get("attention_bias")),
        tie_embeddings=hf.get("tie_word_embeddings", False), norm="rmsnorm", mlp="swiglu", position="rope",
        sliding_window=hf.get("sliding_window") or 0, dropout=0.0, **rope,
    )


def _rope_settings(hf: dict, source: str) -> dict:
    """ModelConfig's rope fields from transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling`."""
    parameters = dict(hf.get("rope_scaling") or {})
    parameters.update(hf.get("rope_parameters") or {})
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise BinaryLMError(f"{source}: rope scaling {kind!r} is not supported (BinaryLM has linear and llama3)")
    def setting(key: str) -> float:
        if key not in parameters:
            raise BinaryLMError(f"{source}: rope scaling {kind!r} needs {key!r} in rope_parameters (or rope_scaling)")
        return float(parameters[key])

    rope = {"rope_base": float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind != "default":
        rope.update(rope_type=kind, rope_scaling=setting("factor"))
    if kind == "llama3":
        rope.update(rope_original_context=int(setting("original_max_position_embeddings")),
                    rope_low_freq_factor=setting("low_freq_factor"), rope_high_freq_factor=setting("high_freq_factor"))
    return rope


def _rope_parameters(config: ModelConfig) -> dict:
    """transformers 5's `rope_parameters` for a BinaryLM ModelConfig."""
    if config.rope_type == "llama3":
        return {"rope_type": "llama3", "rope_theta": config.rope_base, "factor": config.rope_scaling,
                "original_max_position_embeddings": config.rope_original_context,
                "low_freq_factor": config.rope_low_freq_factor, "high_freq_factor": config.rope_high_freq_factor}
    if config.rope_scaling != 1.0:
        return {"rope_type": "linear", "rope_theta": config.rope_base, "factor": config.rope_scaling}
    return {"rope_type": "default", "rope_theta": config.rope_base}


def model_config_to_hf(config: ModelConfig, family: str, end_id: int | None = None) -> dict:
    """A Hugging Face config.json's contents for a BinaryLM ModelConfig of this family.

    `end_id` (the tokenizer's end-of-text id) becomes the beginning and end-of-sequence id.
    """
    special = dict(bos_token_id=end_id, eos_token_id=end_id)
    if family == "gpt2":
        return dict(**special,
            architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=config.vocab_size,
            n_positions=config.context_length, n_layer=config.n_layer, n_head=config.n_head, n_embd=config.d_model,
            n_inner=config.d_ff, activation_function="gelu_new", layer_norm_epsilon=config.norm_eps,
            tie_word_embeddings=config.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            dtype="float32",
        )
    names = ("MistralForCausalLM", "mistral") if config.sliding_window else ("LlamaForCausalLM", "llama")
    values = dict(
        **special, architectures=[names[0]], model_type=names[1], vocab_size=config.vocab_size,
        max_position_embeddings=config.context_length, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_heads, hidden_size=config.d_model,
        intermediate_size=config.d_ff, head_dim=config.head_dim, hidden_act="silu", rms_norm_eps=config.norm_eps,
        attention_bias=config.bias, mlp_bias=config.bias, tie_word_embeddings=config.tie_embeddings,
        rope_theta=config.rope_base, rope_parameters=_rope_parameters(config), attention_dropout=0.0,
        dtype="float32",
    )
    if config.sliding_window:
        values["sliding_window"] = config.sliding_window
    return values


# ------------------------------------------------------------------ import


def import_hf(directory: str | Path) -> tuple[Transformer, Tokenizer, RunConfig]:
    """A BinaryLM model (eval mode, fp32), its tokenizer and run config from a Hugging Face model directory."""
    directory = Path(directory)
    config, family = model_config_from_hf(_read_json(directory / "config.json"), str(directory / "config.json"))
    theirs = read_safetensors(directory)
    model = Transformer(config)
    model.load_state_dict(_to_ours(theirs, model, family, directory), strict=True)
    tokenizer = load_hf(directory)
    if tokenizer.vocab_size > config.vocab_size:
        raise BinaryLMError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                            f"{config.vocab_size} embeddings")
    return model.eval(), tokenizer, RunConfig(model=config)


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory: model.safetensors, or the shards its index lists."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            hint = " (pytorch_model.bin files are not read: they are pickles; re-save with safetensors)" \
                if (directory / "pytorch_model.bin").is_file() else ""
            raise BinaryLMError(f"{path} does not exist; a Hugging Face model directory needs its safetensors{hint}")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise BinaryLMError(f"{path} cannot be read as safetensors ({exc})") from None
    return tensors


def _to_ours(theirs: dict[str, torch.Tensor], model: Transformer, family: str, source: Path) -> dict:
    """The state dict for `model` from Hugging Face tensors, checking that every one is there and fits."""
    config = model.config
    if family == "gpt2" and not any(name.startswith("transformer.") for name in theirs):
        theirs = {f"transformer.{name}": tensor for name, tensor in theirs.items()}  # the original gpt2 layout
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    links = tensor_links(config, family)
    wanted = {name for link in links for name in link.theirs}
    missing = sorted(wanted - theirs.keys())
    unknown = sorted(n for n in theirs.keys() - wanted if not n.endswith(IGNORED_SUFFIXES)
                     and not (n == "lm_head.weight" and config.tie_embeddings))
    if missing or unknown:
        raise BinaryLMError(f"{source}: tensors do not match config.json (missing {missing[:3]}, "
                            f"unexpected {unknown[:3]}); the checkpoint is incomplete or of another architecture")
    ours = {}
    for link in links:
        parts = [theirs[name].t() if link.transpose else theirs[name] for name in link.theirs]
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if tuple(tensor.shape) != expected[link.ours]:
            raise BinaryLMError(f"{source}: {', '.join(link.theirs)} has shape {tuple(tensor.shape)} "
                                f"but config.json implies {expected[link.ours]} for {link.ours}")
        ours[link.ours] = tensor.float()
    if config.tie_embeddings:
        ours["lm_head.weight"] = ours["token_embedding.weight"]
    return ours


# ------------------------------------------------------------------ export


def export_hf(model: Transformer, tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write a directory that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load."""
    config = model.config
    family = model_family(config)
    state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    theirs = {}
    for link in tensor_links(config, family):
        tensor = state[link.ours]
        sizes = [config.n_head * config.head_dim] + [config.n_kv_heads * config.head_dim] * 2 \
            if len(link.theirs) == 3 else [tensor.shape[0]]
        for name, part in zip(link.theirs, tensor.split(sizes, dim=0)):
            theirs[name] = (part.t() if link.transpose else part).contiguous().clone()
    with staged_directory(directory) as staging:
        save_file(theirs, str(staging / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomically(staging / "config.json", model_config_to_hf(config, family, tokenizer.eot_id))
        save_hf(tokenizer, staging / "tokenizer.json")
        write_json_atomically(staging / "tokenizer_config.json", _tokenizer_config(tokenizer, config))
    return Path(directory)


def _tokenizer_config(tokenizer: Tokenizer, config: ModelConfig) -> dict:
    end = next((text for text, i in tokenizer.special_tokens.items() if i == tokenizer.eot_id), None)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.context_length,
            "bos_token": end, "eos_token": end, "clean_up_tokenization_spaces": False}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise BinaryLMError(f"{path} does not exist; give a Hugging Face model directory (config.json, "
                            "model.safetensors, tokenizer.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BinaryLMError(f"{path} is not valid JSON ({exc})") from None
