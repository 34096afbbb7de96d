"""GGUF files for llama.cpp: export a BinaryLM model with its tokenizer, and read one back.

GGUF is llama.cpp's single-file format. One file holds everything a runtime needs:

    "GGUF", version, counts
    metadata       key -> typed value: general.architecture = "llama",
                   llama.context_length = 2048, tokenizer.ggml.tokens = [...], ...
    tensor infos   name, dims, storage type (F32, F16 or a quantized kind), offset
    tensor data    the raw numbers, each tensor aligned to 32 bytes

llama.cpp reads no model code from the file: the architecture name picks one of
its built-in graphs, the `{arch}.*` keys give that graph its sizes, and the
tensors must carry the names the graph looks up ("blk.0.attn_q.weight", ...).
BinaryLM configs map onto two of those graphs (see families.py):

- "gpt2": LayerNorm, GELU, learned positions, a fused qkv matrix: our layout as it is;
- "llama": RMSNorm, SwiGLU, rotary positions, grouped-query attention, with
  separate q, k and v matrices, so our fused qkv is split on the way out.

Three details need care:

1. Dimension order. ggml lists a tensor's dims fastest-varying first, so a
   PyTorch weight of shape (out, in) is a GGUF tensor of dims [in, out] with the
   very same bytes. The gguf package writes a NumPy shape reversed, so arrays
   go in exactly as PyTorch holds them.
2. Rotary pairs. BinaryLM, like Hugging Face's Llama, rotates dimension i of a
   head together with dimension i + head_dim/2 ("rotate half"); llama.cpp's
   llama graph rotates dimensions 2i and 2i+1. Renumbering the query and key
   rows inside every head, (i, i + head_dim/2) -> (2i, 2i+1), turns one layout
   into the other: each pair meets the same angle, and a dot product q.k does
   not change when q and k are renumbered alike. Values are not rotated, so v
   keeps its order.
3. The tokenizer is embedded as llama.cpp's "gpt2" (byte-level BPE) model: a
   list of token strings, one per id, and a list of merges "left right". Both
   spell bytes with GPT-2's printable stand-ins (a space is "Ġ"), so that any
   byte string is a plain Unicode string. Each multi-byte token is listed with
   every way to build it from two earlier tokens, in rank order: applying the
   lowest-ranked merge (llama.cpp) then picks the same step as joining the
   lowest-ranked pair (our encoder). The merge the tokenizer learned comes first
   in its group, so reading the file back restores it exactly. The split regex
   is named by llama.cpp's pre-tokenizer names, and also stored verbatim under
   `binarylm.tokenizer.pattern`.

Weights are written as float32, or with `dtype="f16"` as float16 for the
matrices (vectors such as norms and biases stay float32, as llama.cpp's own
converters keep them). Reading accepts any storage type the gguf package can
dequantize.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from binarylm.config import ModelConfig
from binarylm.errors import BinaryLMError
from binarylm.files import atomic_path
from binarylm.interop.families import FAMILIES, model_family
from binarylm.model import Transformer
from binarylm.model.positions import rope_frequencies
from binarylm.tokenizer import ENDOFTEXT, GPT2_PATTERN, GPT4_PATTERN, IM_END, PAD, Tokenizer
from binarylm.tokenizer.formats import byte_to_unicode

try:
    import gguf
except ImportError:  # an optional dependency, like the rest of interop
    gguf = None

# ------------------------------------------------------------------ names and keys

# BinaryLM module -> llama.cpp tensor name; a block's modules are numbered: blocks.{i}.X -> blk.{i}.Y.
MODULE_NAMES = {"token_embedding": "token_embd", "position_embedding": "position_embd",
                "final_norm": "output_norm", "lm_head": "output"}
BLOCK_MODULE_NAMES = {"norm1": "attn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output",
                      "norm2": "ffn_norm", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}

# ModelConfig field -> the metadata key llama.cpp reads it from ("{arch}" is the architecture name).
SHAPE_KEYS = {
    "vocab_size": "{arch}.vocab_size",
    "context_length": "{arch}.context_length",
    "d_model": "{arch}.embedding_length",
    "n_layer": "{arch}.block_count",
    "d_ff": "{arch}.feed_forward_length",
    "n_head": "{arch}.attention.head_count",
    "n_kv_heads": "{arch}.attention.head_count_kv",
}
NORM_EPS_KEYS = {"gpt2": "{arch}.attention.layer_norm_epsilon", "llama": "{arch}.attention.layer_norm_rms_epsilon"}
ROPE_DIMENSIONS_KEY = "{arch}.rope.dimension_count"
ROPE_BASE_KEY = "{arch}.rope.freq_base"
ROPE_SCALING_TYPE_KEY = "{arch}.rope.scaling.type"
ROPE_SCALING_FACTOR_KEY = "{arch}.rope.scaling.factor"
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling: each rotary pair's frequency divisor, (head_dim / 2,)

ARCHITECTURE_KEY = "general.architecture"
TOKENIZER_MODEL_KEY = "tokenizer.ggml.model"
PRE_TOKENIZER_KEY = "tokenizer.ggml.pre"
TOKENS_KEY = "tokenizer.ggml.tokens"
TOKEN_TYPES_KEY = "tokenizer.ggml.token_type"
MERGES_KEY = "tokenizer.ggml.merges"
PATTERN_KEY = "binarylm.tokenizer.pattern"  # ours: llama.cpp ignores keys it does not know
TOKENIZER_NAME_KEY = "binarylm.tokenizer.name"

# Which special token fills which of llama.cpp's roles (bos: what an empty prompt starts from).
SPECIAL_TOKEN_KEYS = {
    ENDOFTEXT: ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"),
    PAD: ("tokenizer.ggml.padding_token_id",),
    IM_END: ("tokenizer.ggml.eot_token_id",),  # end of a chat turn
}

# llama.cpp's names for the split patterns it has built in (it refuses names it does not know).
PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2", GPT4_PATTERN: "llama-bpe"}
OTHER_PATTERN = "default"

# gguf.TokenType values.
NORMAL_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN, UNUSED_TOKEN = 1, 3, 4, 5
# gguf.LlamaFileType: what most of the tensors are stored as.
FILE_TYPES = {"f32": 0, "f16": 1}
GGML_QUANT_VERSION = 2


def gguf_name(name: str) -> str:
    """The llama.cpp name of a BinaryLM tensor: 'blocks.3.attn.proj.weight' -> 'blk.3.attn_output.weight'."""
    return _rename(name, "blocks.", "blk.", BLOCK_MODULE_NAMES, MODULE_NAMES)


def binarylm_name(name: str) -> str:
    """The BinaryLM name of a llama.cpp tensor (the inverse of `gguf_name`); KeyError for one we have no place for."""
    return _rename(name, "blk.", "blocks.", _inverse(BLOCK_MODULE_NAMES), _inverse(MODULE_NAMES))


def _rename(name: str, block_from: str, block_to: str, block_parts: dict[str, str], modules: dict[str, str]) -> str:
    module, kind = name.rsplit(".", 1)
    if module.startswith(block_from):
        _, layer, part = module.split(".", 2)
        return f"{block_to}{layer}.{block_parts[part]}.{kind}"
    return f"{modules[module]}.{kind}"


def _inverse(mapping: dict[str, str]) -> dict[str, str]:
    return {value: key for key, value in mapping.items()}


# ------------------------------------------------------------------ rotary layouts


def interleave_rotary_pairs(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Query or key rows (n_heads * head_dim, ...) from "rotate half" pairs to llama.cpp's adjacent pairs.

    Within each head, row i and row i + head_dim/2 (a rotation pair) move to rows 2i and 2i + 1.
    """
    half = rows.shape[0] // n_heads // 2
    by_pair = rows.reshape(n_heads, 2, half, *rows.shape[1:])  # (heads, which of the pair, pair, ...)
    return by_pair.transpose(1, 2).reshape(rows.shape)  # (heads, pair, which of the pair, ...) flattened


def halve_rotary_pairs(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `interleave_rotary_pairs`: rows 2i and 2i + 1 of each head back to i and i + head_dim/2."""
    half = rows.shape[0] // n_heads // 2
    by_pair = rows.reshape(n_heads, half, 2, *rows.shape[1:])  # (heads, pair, which of the pair, ...)
    return by_pair.transpose(1, 2).reshape(rows.shape)


# ------------------------------------------------------------------ tensors both ways


def to_gguf_tensors(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A BinaryLM state dict as llama.cpp's tensors: renamed, the tied head left out, llama's qkv split."""
    tensors = {
        gguf_name(name): tensor
        for name, tensor in state_dict.items()
        if not (name == "lm_head.weight" and config.tie_embeddings)  # llama.cpp falls back to token_embd
    }
    if model_family(config) == "llama":
        tensors = _split_attention(tensors, config)
    if config.rope_type == "llama3":
        tensors[ROPE_FREQS] = rope_frequency_factors(config)
    return tensors


def from_gguf_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_gguf_tensors`: a BinaryLM state dict (a tied head shares the token embedding)."""
    if model_family(config) == "llama":
        tensors = _fuse_attention(tensors, config)
    state = {binarylm_name(name): tensor for name, tensor in tensors.items() if name != ROPE_FREQS}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["token_embedding.weight"]
    return state


def _split_attention(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Each fused attn_qkv (weight or bias) replaced, where it stood, by attn_q, attn_k and attn_v."""
    q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_heads * config.head_dim
    split: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if ".attn_qkv." not in name:
            split[name] = tensor
            continue
        q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
        split[name.replace(".attn_qkv.", ".attn_q.")] = interleave_rotary_pairs(q, config.n_head)
        split[name.replace(".attn_qkv.", ".attn_k.")] = interleave_rotary_pairs(k, config.n_kv_heads)
        split[name.replace(".attn_qkv.", ".attn_v.")] = v
    return split


def _fuse_attention(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Each attn_q, attn_k, attn_v trio joined back into one attn_qkv, rotary pairs in BinaryLM's order."""
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if ".attn_k." in name or ".attn_v." in name:
            continue  # joined with their attn_q
        if ".attn_q." not in name:
            fused[name] = tensor
            continue
        k, v = tensors[name.replace(".attn_q.", ".attn_k.")], tensors[name.replace(".attn_q.", ".attn_v.")]
        q, k = halve_rotary_pairs(tensor, config.n_head), halve_rotary_pairs(k, config.n_kv_heads)
        fused[name.replace(".attn_q.", ".attn_qkv.")] = torch.cat([q, k, v])
    return fused


def _stored_array(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """The array to write: float32, or float16 for matrices when dtype is 'f16' (vectors stay float32)."""
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return array.astype(np.float16) if dtype == "f16" and array.ndim == 2 else array


# ------------------------------------------------------------------ metadata


def exportable_family(config: ModelConfig) -> str:
    """'gpt2' or 'llama', or an error naming the option llama.cpp cannot run."""
    try:
        family = model_family(config)
    except BinaryLMError as exc:
        raise BinaryLMError(f"cannot export to GGUF: {exc}") from None
    if family == "llama" and config.sliding_window:
        raise BinaryLMError(
            f"cannot export to GGUF: model.sliding_window={config.sliding_window}, but llama.cpp's llama "
            "architecture attends to the whole context; export a model trained with model.sliding_window=0"
        )
    return family


def model_metadata(config: ModelConfig, dtype: str = "f32", name: str = "binarylm") -> dict[str, object]:
    """The general.* and {arch}.* keys llama.cpp needs to build the model's graph."""
    arch = exportable_family(config)
    values: dict[str, object] = {
        ARCHITECTURE_KEY: arch,
        "general.name": name,
        "general.file_type": FILE_TYPES[dtype],
        "general.quantization_version": GGML_QUANT_VERSION,
    }
    values.update({key.format(arch=arch): getattr(config, field) for field, key in SHAPE_KEYS.items()})
    values[NORM_EPS_KEYS[arch].format(arch=arch)] = float(config.norm_eps)
    if arch == "llama":
        values[ROPE_DIMENSIONS_KEY.format(arch=arch)] = config.head_dim
        values[ROPE_BASE_KEY.format(arch=arch)] = float(config.rope_base)
        if config.rope_scaling != 1 and config.rope_type == "linear":  # llama3's travels as rope_freqs
            values[ROPE_SCALING_TYPE_KEY.format(arch=arch)] = "linear"
            values[ROPE_SCALING_FACTOR_KEY.format(arch=arch)] = float(config.rope_scaling)
    return values


def tokenizer_metadata(tokenizer: Tokenizer, n_vocab: int) -> dict[str, object]:
    """The tokenizer.ggml.* keys: a byte-level BPE with `n_vocab` ids (ids the tokenizer lacks are unused)."""
    if tokenizer.vocab_size > n_vocab:
        raise BinaryLMError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's embedding only {n_vocab}; "
            "export the model with the tokenizer it was trained with"
        )
    if tokenizer.pattern not in PRE_TOKENIZERS:
        warnings.warn(
            "the tokenizer's split pattern is not one llama.cpp has built in, so llama.cpp will split text "
            "with its default pattern and may produce other token ids than BinaryLM does",
            stacklevel=3,
        )
    tokens, token_types = _token_table(tokenizer, n_vocab)
    values: dict[str, object] = {
        TOKENIZER_MODEL_KEY: "gpt2",
        PRE_TOKENIZER_KEY: PRE_TOKENIZERS.get(tokenizer.pattern, OTHER_PATTERN),
        TOKENS_KEY: tokens,
        TOKEN_TYPES_KEY: token_types,
        MERGES_KEY: spelled_merges(tokenizer),
        "tokenizer.ggml.add_bos_token": False,  # BinaryLM prompts start with their own text
        PATTERN_KEY: tokenizer.pattern,
        TOKENIZER_NAME_KEY: tokenizer.name,
    }
    for special, keys in SPECIAL_TOKEN_KEYS.items():
        if special in tokenizer.special_tokens:
            values.update(dict.fromkeys(keys, tokenizer.special_tokens[special]))
    return values


def _token_table(tokenizer: Tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Each id's string and type: a spelled token, a special token's text, or an unused placeholder."""
    specials = {token_id: text for text, token_id in tokenizer.special_tokens.items()}
    tokens, token_types = [], []
    for token_id in range(n_vocab):
        if token_id in specials:
            tokens.append(specials[token_id])
            token_types.append(CONTROL_TOKEN)
        elif token_id in tokenizer.token_bytes:
            tokens.append(spell(tokenizer.token_bytes[token_id]))
            token_types.append(NORMAL_TOKEN)
        else:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(UNUSED_TOKEN)
    return tokens, token_types


def spelled_merges(tokenizer: Tokenizer) -> list[str]:
    """Every merge "left right" that builds each multi-byte token, tokens in rank order, the learned one first."""
    merges = []
    for learned, splits in zip(tokenizer.merges, tokenizer.splits_by_token(first_only=False)):
        for left, right in [learned, *(split for split in splits if split != learned)]:
            merges.append(f"{spell(tokenizer.token_bytes[left])} {spell(tokenizer.token_bytes[right])}")
    return merges


def spell(token: bytes) -> str:
    """A token's bytes in GPT-2's printable spelling: b' hi' -> 'Ġhi'."""
    return "".join(_BYTE_TO_CHAR[byte] for byte in token)


def unspell(text: str) -> bytes:
    """The inverse of `spell`; KeyError for a character that stands for no byte."""
    return bytes(_CHAR_TO_BYTE[char] for char in text)


_BYTE_TO_CHAR = byte_to_unicode()
_CHAR_TO_BYTE = _inverse(_BYTE_TO_CHAR)


# ------------------------------------------------------------------ export


def export_gguf(
    model: Transformer, tokenizer: Tokenizer, path: str | os.PathLike, dtype: str = "f32",
    name: str = "binarylm", progress: bool = False,
) -> Path:
    """Write `model` and `tokenizer` as one GGUF file that llama.cpp loads; returns the path.

    dtype: "f32" (exact) or "f16" (matrices in float16, half the size; vectors stay float32).
    """
    _require_gguf()
    if dtype not in FILE_TYPES:
        raise BinaryLMError(f"GGUF dtype must be one of {', '.join(FILE_TYPES)}; got {dtype!r}")
    config = model.config
    metadata = {**model_metadata(config, dtype, name), **tokenizer_metadata(tokenizer, config.vocab_size)}
    tensors = to_gguf_tensors(model.state_dict(), config)
    arrays = {tensor_name: _stored_array(tensor, dtype) for tensor_name, tensor in tensors.items()}
    path = Path(path)
    with atomic_path(path) as temporary:
        _write_gguf(temporary, metadata, arrays, progress)
    return path


def _write_gguf(path: Path, metadata: dict[str, object], arrays: dict[str, np.ndarray], progress: bool) -> None:
    """One GGUF file: the header, the metadata, the tensor infos, then the tensors' data."""
    writer = gguf.GGUFWriter(path, metadata[ARCHITECTURE_KEY])  # which writes general.architecture itself
    try:
        _add_metadata(writer, {key: value for key, value in metadata.items() if key != ARCHITECTURE_KEY})
        for tensor_name, array in arrays.items():
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
    finally:
        writer.close()


def _add_metadata(writer, values: dict[str, object]) -> None:
    """Each value with the type llama.cpp expects: counts and ids uint32, reals float32, lists as arrays."""
    types = gguf.GGUFValueType
    for key, value in values.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif value:  # a list of strings or of int32 (token types); GGUF has no empty arrays
            writer.add_key_value(key, value, types.ARRAY)


# ------------------------------------------------------------------ reading back


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """(config, BinaryLM state dict, tokenizer) from a GGUF file of the gpt2 or llama architecture."""
    _require_gguf()
    path = Path(path)
    reader = _open_reader(path)
    metadata = _read_metadata(reader)
    tensors = {tensor.name: _dequantized(tensor, path) for tensor in reader.tensors}
    del reader  # closes the memory map; every tensor above is a copy
    try:
        config = config_from_metadata(metadata, set(tensors), tensors.get(ROPE_FREQS))
        _check_tensors(tensors, config)
        return config, from_gguf_tensors(tensors, config), tokenizer_from_metadata(metadata)
    except BinaryLMError as exc:
        raise BinaryLMError(f"{path}: {exc}") from None


def import_gguf(path: str | os.PathLike) -> tuple[Transformer, Tokenizer]:
    """A ready-to-run model (in eval mode) and its tokenizer from a GGUF file."""
    config, state_dict, tokenizer = read_gguf(path)
    model = Transformer(config)
    model.load_state_dict(state_dict)
    return model.eval(), tokenizer


def _open_reader(path: Path):
    if not path.is_file():
        raise BinaryLMError(f"GGUF file {path} does not exist; check the path")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as exc:
        raise BinaryLMError(f"{path} is not a GGUF file this reader understands ({exc})") from None


def _read_metadata(reader) -> dict[str, object]:
    """Every key's value as plain Python; float32 values as the shortest decimal that rounds to them (1e-05)."""
    values = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the header's counts, not metadata
        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))
        values[key] = value
    return values


def _dequantized(tensor, path: Path) -> torch.Tensor:
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise BinaryLMError(
            f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize; convert the file to F16 or F32 with llama.cpp first"
        ) from None
    return torch.tensor(array, dtype=torch.float32)  # a copy, off the memory map


def config_from_metadata(metadata: dict[str, object], tensor_names: set[str],
                         rope_freqs: torch.Tensor | None = None) -> ModelConfig:
    """The ModelConfig a file's metadata describes (bias and tied head are read off which tensors exist;
    llama3 rope scaling off the `rope_freqs` tensor's values)."""
    arch = metadata.get(ARCHITECTURE_KEY)
    if arch not in FAMILIES:
        raise BinaryLMError(
            f"the file holds a model of llama.cpp architecture {arch!r}; BinaryLM reads {' and '.join(FAMILIES)}"
        )
    value = lambda key: _required(metadata, key.format(arch=arch))
    fields = {field: value(key) for field, key in SHAPE_KEYS.items()}
    fields.update(FAMILIES[arch], norm_eps=value(NORM_EPS_KEYS[arch]),
                  tie_embeddings="output.weight" not in tensor_names)
    if arch == "llama":
        fields.update(bias="blk.0.attn_q.bias" in tensor_names, rope_base=value(ROPE_BASE_KEY),
                      rope_scaling=_rope_scaling(metadata, arch))
    config = ModelConfig(**fields)
    config.validate()
    if arch == "llama" and rope_freqs is not None:
        config = _with_frequency_factors(config, rope_freqs)
    if arch == "llama" and value(ROPE_DIMENSIONS_KEY) != config.head_dim:
        raise BinaryLMError(
            f"rotary positions cover {value(ROPE_DIMENSIONS_KEY)} of each head's {config.head_dim} dimensions; "
            "BinaryLM rotates whole heads only"
        )
    return config


def _rope_scaling(metadata: dict[str, object], arch: str) -> float:
    kind = metadata.get(ROPE_SCALING_TYPE_KEY.format(arch=arch), "none")
    if kind == "none":
        return 1.0
    if kind != "linear":
        raise BinaryLMError(f"rotary scaling of type {kind!r} is not supported; BinaryLM has linear scaling only")
    return metadata.get(ROPE_SCALING_FACTOR_KEY.format(arch=arch), 1.0)


def rope_frequency_factors(config: ModelConfig) -> torch.Tensor:
    """(head_dim / 2,) llama.cpp's `rope_freqs`: what each rotary pair's frequency is divided by."""
    unscaled = dataclasses.replace(config, rope_type="linear", rope_scaling=1.0)
    return rope_frequencies(unscaled) / rope_frequencies(config)


def _with_frequency_factors(config: ModelConfig, factors: torch.Tensor) -> ModelConfig:
    """`config` with the rope fields that give these per-pair divisors (Llama 3.1's rule), or an error.

    With s the largest divisor, a = (1/factor - 1/s) / (1 - 1/s) is 1 for a pair left alone, 0 for one
    divided by s, and for a pair in between equals (x - low / L0) / ((high - low) / L0), x = 1 / wavelength:
    a line in x, fitted to those pairs (or pinned to the band edges when fewer than two lie between).
    """
    unscaled = dataclasses.replace(config, rope_type="linear", rope_scaling=1.0)
    x = rope_frequencies(unscaled).double() / (2 * math.pi)  # (head_dim / 2,) 1 / wavelength
    factors = factors.double().flatten()
    scale = factors.max().item()
    if factors.shape != x.shape or factors.min().item() < 1 - 1e-6:
        raise BinaryLMError(f"rope_freqs holds {tuple(factors.shape)} values, some below 1; BinaryLM reads "
                            f"Llama 3.1-style divisors, one per rotary pair ({x.numel()})")
    if scale < 1 + 1e-6:
        return config
    blend = (1 / factors - 1 / scale) / (1 - 1 / scale)
    between = (blend > 1e-4) & (blend < 1 - 1e-4)
    if not between.any() and (blend < 1e-4).all():
        return _checked(config, factors, rope_scaling=round(scale, 4))  # every pair slowed alike: linear
    if between.sum() >= 2:
        slope, intercept = np.polyfit(x[between].numpy(), blend[between].numpy(), 1)
        low_x, high_x = -intercept / slope, (1 - intercept) / slope
    else:
        slowed, kept = x[blend <= 1e-4], x[blend >= 1 - 1e-4]
        low_x = slowed.max().item() if slowed.numel() else x.min().item() / 2
        high_x = low_x + (x[between] - low_x).item() / blend[between].item() if between.any() else kept.min().item()
    original = max(1, round(1 / low_x))
    return _checked(config, factors, rope_type="llama3", rope_scaling=round(scale, 4), rope_original_context=original,
                    rope_low_freq_factor=round(low_x * original, 4), rope_high_freq_factor=round(high_x * original, 4))


def _checked(config: ModelConfig, factors: torch.Tensor, **rope) -> ModelConfig:
    """`config` with `rope`, if that reproduces the stored divisors; otherwise an error saying so."""
    try:
        fitted = dataclasses.replace(config, **rope)
        fitted.validate()
        agrees = torch.allclose(rope_frequency_factors(fitted).double(), factors, rtol=1e-3)
    except BinaryLMError:
        agrees = False
    if not agrees:
        raise BinaryLMError("the rope_freqs tensor does not follow Llama 3.1's rope scaling rule (nor linear "
                            "scaling), the only per-frequency scaling BinaryLM has")
    return fitted


def _check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Every tensor the config needs is there with the right shape, and nothing else is."""
    with torch.device("meta"):  # shapes only, no memory
        expected = to_gguf_tensors(Transformer(config).state_dict(), config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise BinaryLMError(f"tensors {', '.join(missing[:5])} are missing ({len(missing)} in all)")
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise BinaryLMError(
            f"tensors {', '.join(unexpected[:5])} have no place in a BinaryLM {model_family(config)} model"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise BinaryLMError(
                f"tensor {name} has shape {tuple(tensor.shape)}, but the metadata implies {tuple(expected[name].shape)}"
            )


def tokenizer_from_metadata(metadata: dict[str, object]) -> Tokenizer:
    """The Tokenizer the tokenizer.ggml.* keys describe (special tokens are the control tokens)."""
    kind = metadata.get(TOKENIZER_MODEL_KEY)
    if kind != "gpt2":
        raise BinaryLMError(f"the tokenizer is of llama.cpp kind {kind!r}; BinaryLM reads byte-level BPE ('gpt2')")
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    tokens, token_types = _required(metadata, TOKENS_KEY), _required(metadata, TOKEN_TYPES_KEY)
    for token_id, (text, token_type) in enumerate(zip(tokens, token_types)):
        if token_type in (CONTROL_TOKEN, USER_DEFINED_TOKEN):
            specials[text] = token_id
        elif token_type != UNUSED_TOKEN:
            ranks[_unspelled_token(text, token_id)] = token_id
    merges = _learned_merges(metadata.get(MERGES_KEY, []), ranks)
    return Tokenizer(ranks, _split_pattern(metadata), specials, merges=merges,
                     name=metadata.get(TOKENIZER_NAME_KEY, "binarylm"))


def _unspelled_token(text: str, token_id: int) -> bytes:
    try:
        return unspell(text)
    except KeyError:
        raise BinaryLMError(f"token {token_id} ({text!r}) is not spelled in GPT-2's byte-level alphabet") from None


def _learned_merges(merges: list[str], ranks: dict[bytes, int]) -> list[tuple[int, int]] | None:
    """The merge that built each multi-byte token: the first one listed for it (export_gguf lists it first).

    None, so that the Tokenizer derives them, when some token has no merge listed.
    """
    first: dict[int, tuple[int, int]] = {}
    for merge in merges:
        try:
            left, right = (unspell(part) for part in merge.split(" "))
            first.setdefault(ranks[left + right], (ranks[left], ranks[right]))
        except (KeyError, ValueError):
            raise BinaryLMError(f"the merge {merge!r} does not join two tokens of the vocabulary") from None
    merged_ids = sorted(token_id for token, token_id in ranks.items() if len(token) > 1)
    if set(first) != set(merged_ids):
        return None
    return [first[token_id] for token_id in merged_ids]


def _split_pattern(metadata: dict[str, object]) -> str:
    """Our own stored pattern, else the one llama.cpp's pre-tokenizer name stands for."""
    if PATTERN_KEY in metadata:
        return metadata[PATTERN_KEY]
    pre = metadata.get(PRE_TOKENIZER_KEY, OTHER_PATTERN)
    by_name = _inverse(PRE_TOKENIZERS)
    if pre not in by_name:
        raise BinaryLMError(
            f"the pre-tokenizer {pre!r} is not one BinaryLM knows the split pattern of; "
            f"known: {', '.join(by_name)}"
        )
    return by_name[pre]


def _required(metadata: dict[str, object], key: str):
    if key not in metadata:
        raise BinaryLMError(f"the metadata lacks the key {key!r}")
    return metadata[key]


def _require_gguf() -> None:
    if gguf is None:
        raise BinaryLMError("GGUF files need the gguf package: pip install gguf")
