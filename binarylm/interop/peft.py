"""LoRA adapters in and out of PEFT's format, for the Hugging Face export of the base model.

A PEFT LoRA adapter is a directory of two files:

    adapter_config.json        peft_type LORA, r, lora_alpha, target_modules (Hugging Face module names), ...
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r)

`<module>` is the module's path in the transformers model that `export_hf` writes
(model.layers.0.self_attn.q_proj for Llama, transformer.h.0.attn.c_attn for GPT-2);
the saved file leaves out PEFT's adapter name ("default"). PEFT computes the same update
as BinaryLM, base(x) + (lora_alpha / r) B A x, with A and B as plain (r, in) and (out, r)
matrices whatever the base layer is. So:

- GPT-2's layers are Conv1D, whose weight is stored transposed (in, out), but PEFT's A and B
  are not: they are exported as they are. `fan_in_fan_out: true` only tells PEFT to transpose
  B A when it merges into such a weight.
- Llama has separate q_proj, k_proj and v_proj where BinaryLM fuses one qkv (rows: queries,
  keys, values). B A splits by rows: the rows of B that make the queries, times A, are the
  query part of the update. So each of q/k/v gets its slice of B and a copy of the shared A;
  exact. Importing goes back: equal A's give one rank-r adapter; different ones (PEFT trained
  q, k and v apart) are stacked into one adapter of rank r_q + r_k + r_v whose B is block
  diagonal, [[B_q, 0, 0], [0, B_k, 0], [0, 0, B_v]] times [A_q; A_k; A_v]: exact as well. A
  projection PEFT left out (commonly k_proj) gets zero rows.

Layers whose rank or alpha differ from the most common ones go into PEFT's `rank_pattern` and
`alpha_pattern`, keyed by their full (regex-escaped) module path.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from binarylm.errors import BinaryLMError
from binarylm.files import atomic_path, write_json_atomically
from binarylm.interop.families import model_family
from binarylm.interop.hf import tensor_links
from binarylm.model.lora import (
    LoRAConfig,
    add_lora_to_layers,
    linear_layers,
    load_lora_state_dict,
    lora_layers,
)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight$")
# PEFT settings that change what LoRA computes beyond W + (alpha / r) B A, and that BinaryLM does not have.
UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "target_parameters",
               "layer_replication", "use_qalora", "alora_invocation_tokens", "use_bdlora")


@dataclass(frozen=True)
class ModuleLink:
    """One BinaryLM linear layer and the Hugging Face module(s) it corresponds to.

    Several `theirs` (Llama's q_proj, k_proj, v_proj) share `ours`' output rows in order, `sizes` of them.
    """

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...]


@dataclass
class Piece:
    """The adapter of one Hugging Face module: A (r, in), B (out, r), and alpha: the update is (alpha / r) B A."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# ------------------------------------------------------------------ names


def module_links(model: nn.Module) -> dict[str, ModuleLink]:
    """Every linear layer of a BinaryLM Transformer, by its name, with its Hugging Face module(s).

    Derived from the weight map that export_hf uses (interop/hf.py), so the two always agree.
    """
    config = model.config
    family = model_family(config)
    linear = _linear_widths(model)
    qkv_sizes = (config.n_head * config.head_dim, config.n_kv_heads * config.head_dim,
                 config.n_kv_heads * config.head_dim)
    links = {}
    for link in tensor_links(config, family):
        ours = link.ours.removesuffix(".weight")
        if ours not in linear or ours == link.ours:
            continue
        theirs = tuple(name.removesuffix(".weight") for name in link.theirs)
        sizes = qkv_sizes if len(theirs) == 3 else (linear[ours],)
        links[ours] = ModuleLink(ours, theirs, sizes)
    links["lm_head"] = ModuleLink("lm_head", ("lm_head",), (config.vocab_size,))  # export_hf omits a tied one
    return links


def _linear_widths(model: nn.Module) -> dict[str, int]:
    """{layer name: output width} of every linear layer, adapted or not."""
    widths = {name: layer.out_features for name, layer in linear_layers(model)}
    widths.update({name: layer.out_features for name, layer in lora_layers(model)})
    return widths


# ------------------------------------------------------------------ export


def export_peft(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory for the `export_hf` export of its base.

    `base_model_name_or_path` is recorded in adapter_config.json (where the HF base lives).
    Each file is written atomically, the config last; other files in `directory` are left alone.
    Export the base with export_hf(strip_lora(copy.deepcopy(model)), ...) or before add_lora.
    """
    layers = lora_layers(model)
    if not layers:
        raise BinaryLMError("the model has no LoRA adapters to export; call add_lora(model, config) first")
    family = model_family(model.config)
    pieces = _split_into_modules(model)
    tensors = {}
    for module, piece in pieces.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = piece.A
        tensors[f"{PREFIX}{module}.lora_B.weight"] = piece.B
    dropout = _dropout_of(layers[0][1])
    settings = _peft_config(pieces, _all_modules(model), family, dropout, base_model_name_or_path)
    directory = Path(directory)
    with atomic_path(directory / PEFT_WEIGHTS) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    write_json_atomically(directory / PEFT_CONFIG, settings)
    return directory


def _split_into_modules(model: nn.Module) -> dict[str, Piece]:
    """{Hugging Face module path: its adapter}; a fused qkv gives three, each with a copy of A."""
    links = module_links(model)
    pieces = {}
    for name, layer in lora_layers(model):
        link = links[name]
        A = layer.lora_A.detach().float().cpu()  # (r, in)
        B = layer.lora_B.detach().float().cpu()  # (out, r)
        for module, rows in zip(link.theirs, B.split(link.sizes, dim=0)):  # rows: (size, r)
            pieces[module] = Piece(A.clone().contiguous(), rows.clone().contiguous(), layer.alpha)
    return pieces


def _all_modules(model: nn.Module) -> list[str]:
    return [module for link in module_links(model).values() for module in link.theirs]


def _dropout_of(layer: nn.Module) -> float:
    return float(getattr(layer.dropout, "p", 0.0))


def _peft_config(pieces: dict[str, Piece], all_modules: list[str], family: str, dropout: float,
                 base_model_name_or_path: str | None) -> dict:
    """adapter_config.json's contents: the most common (r, alpha) globally, the others as per-module patterns."""
    shapes = {module: (piece.rank, piece.alpha) for module, piece in pieces.items()}
    rank, alpha = Counter(shapes.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_module_names(list(pieces), all_modules),
        "rank_pattern": {re.escape(module): r for module, (r, _) in shapes.items() if r != rank},
        "alpha_pattern": {re.escape(module): a for module, (_, a) in shapes.items() if a != alpha},
        "fan_in_fan_out": family == "gpt2",  # GPT-2's Conv1D weights are (in, out): PEFT's merge must know
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def target_module_names(adapted: list[str], all_modules: list[str]) -> list[str]:
    """PEFT's target_modules: a short name ("q_proj") where every module of that name is adapted, else full paths.

    PEFT matches a target against the end of each module's path, so "c_proj" alone would also
    adapt the MLP's c_proj in GPT-2; full paths keep the selection exact.
    """
    adapted_set = set(adapted)
    short = lambda module: module.rpartition(".")[2]
    targets = []
    for name in sorted({short(module) for module in adapted}):
        everywhere = [module for module in all_modules if short(module) == name]
        if all(module in adapted_set for module in everywhere):
            targets.append(name)
        else:
            targets.extend(module for module in adapted if short(module) == name)
    return targets


# ------------------------------------------------------------------ import


def import_peft(directory: str | Path, model: nn.Module) -> LoRAConfig:
    """Load a PEFT LoRA adapter onto a BinaryLM model without adapters (e.g. from import_hf); returns its config.

    The model gets adapters on the layers the adapter's tensors name, with their ranks; see the
    module docstring for how Llama's q/k/v adapters become one adapter on the fused qkv.
    """
    if lora_layers(model):
        raise BinaryLMError("the model already has LoRA adapters; import a PEFT adapter into a model without them "
                            "(strip_lora(model) first)")
    directory = Path(directory)
    settings = read_peft_config(directory / PEFT_CONFIG)
    pieces = _pieces_from_tensors(_read_peft_tensors(directory), settings, str(directory / PEFT_WEIGHTS))
    adapters = _fuse_into_layers(pieces, module_links(model), str(directory / PEFT_WEIGHTS))
    dropout = float(settings.get("lora_dropout") or 0.0)
    add_lora_to_layers(model, {name: (piece.rank, piece.alpha) for name, piece in adapters.items()}, dropout)
    state = {}
    for name, piece in adapters.items():
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = piece.A, piece.B
    load_lora_state_dict(model, state, str(directory / PEFT_WEIGHTS))
    config = LoRAConfig(rank=int(settings["r"]), alpha=float(settings["lora_alpha"]), dropout=dropout,
                        targets=list(adapters))
    model.lora_config = config
    return config


def read_peft_config(path: Path) -> dict:
    """adapter_config.json's contents, checked to describe a plain LoRA adapter BinaryLM can represent."""
    if not path.is_file():
        hint = " (it holds a BinaryLM adapter: use binarylm.model.lora.load_adapter)" \
            if (path.parent / "adapter.json").is_file() else ""
        raise BinaryLMError(f"{path} does not exist; a PEFT adapter directory needs {PEFT_CONFIG} and "
                            f"{PEFT_WEIGHTS}{hint}")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BinaryLMError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(settings, dict) or settings.get("peft_type") != "LORA":
        kind = settings.get("peft_type") if isinstance(settings, dict) else None
        raise BinaryLMError(f"{path}: peft_type is {kind!r}; only LORA adapters can be imported")
    for key in UNSUPPORTED:
        if settings.get(key):
            raise BinaryLMError(f"{path}: {key}={settings[key]!r} is not supported; BinaryLM imports plain LoRA "
                                "adapters on linear layers")
    if settings.get("bias", "none") != "none":
        raise BinaryLMError(f"{path}: bias={settings['bias']!r} is not supported (BinaryLM's adapters train no biases)")
    for key in ("r", "lora_alpha"):
        if not isinstance(settings.get(key), int | float) or settings[key] <= 0:
            raise BinaryLMError(f"{path}: {key} must be a positive number, got {settings.get(key)!r}")
    return settings


def _read_peft_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / PEFT_WEIGHTS
    if not path.is_file():
        hint = " (adapter_model.bin is not read: it is a pickle; re-save it with safetensors)" \
            if (directory / "adapter_model.bin").is_file() else ""
        raise BinaryLMError(f"{path} does not exist{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BinaryLMError(f"{path} cannot be read as safetensors ({exc})") from None


def _pieces_from_tensors(tensors: dict[str, torch.Tensor], settings: dict, source: str) -> dict[str, Piece]:
    """{Hugging Face module path: Piece} from PEFT's tensor names, with each module's own scale."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = TENSOR_NAME.match(name)
        if match is None:
            raise BinaryLMError(f"{source}: tensor {name!r} is not a LoRA A or B matrix of a linear layer; "
                                "BinaryLM imports plain LoRA adapters only")
        found.setdefault(match["module"], {})[match["which"]] = tensor.float()
    if not found:
        raise BinaryLMError(f"{source} holds no LoRA tensors")
    pieces = {}
    for module, pair in found.items():
        if set(pair) != {"A", "B"} or pair["A"].dim() != 2 or pair["B"].dim() != 2 \
                or pair["A"].shape[0] != pair["B"].shape[1]:
            raise BinaryLMError(f"{source}: {module} needs lora_A (r, in) and lora_B (out, r) of the same rank, got "
                                f"{ {which: tuple(t.shape) for which, t in pair.items()} }")
        pieces[module] = Piece(pair["A"], pair["B"], _alpha(module, pair["A"].shape[0], settings))
    return pieces


def _alpha(module: str, rank: int, settings: dict) -> float:
    """The alpha that gives PEFT's scale for one module as alpha / r.

    PEFT scales by lora_alpha (or the module's alpha_pattern entry) over r, or over sqrt(r) with
    rsLoRA, which is alpha * sqrt(r) over r.
    """
    alpha = float(settings["lora_alpha"])
    for pattern, value in (settings.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's rule: the pattern matches the end of the path
            alpha = float(value)
            break
    return alpha * math.sqrt(rank) if settings.get("use_rslora") else alpha


def _fuse_into_layers(pieces: dict[str, Piece], links: dict[str, ModuleLink], source: str) -> dict[str, Piece]:
    """{BinaryLM layer name: Piece} from the Hugging Face modules' pieces (q/k/v joined into qkv)."""
    owner = {module: (link, index) for link in links.values() for index, module in enumerate(link.theirs)}
    unknown = sorted(module for module in pieces if module not in owner)
    if unknown:
        raise BinaryLMError(f"{source}: adapter module(s) {', '.join(unknown[:3])} are not linear layers of this "
                            "model; was the adapter made for another architecture or size?")
    by_layer: dict[str, dict[int, Piece]] = {}
    for module, piece in pieces.items():
        link, index = owner[module]
        if piece.B.shape[0] != link.sizes[index]:
            raise BinaryLMError(f"{source}: {module}'s lora_B has {piece.B.shape[0]} rows but the model's layer "
                                f"has {link.sizes[index]} outputs; the adapter was made for another model size")
        by_layer.setdefault(link.ours, {})[index] = piece
    return {name: _fuse(link, by_layer[name]) for name, link in links.items() if name in by_layer}  # model order


def _fuse(link: ModuleLink, parts: dict[int, Piece]) -> Piece:
    """One adapter for a BinaryLM layer whose output rows are split among `link.theirs`, exactly."""
    if len(link.theirs) == 1:
        return parts[0]
    first = parts[min(parts)]
    shared = all(p.A.shape == first.A.shape and torch.equal(p.A, first.A) and p.alpha == first.alpha
                 for p in parts.values())
    if shared:
        rows = [parts[i].B if i in parts else first.B.new_zeros(size, first.rank)  # (size_i, r)
                for i, size in enumerate(link.sizes)]
        return Piece(first.A, torch.cat(rows, dim=0), first.alpha)  # A (r, in), B (out, r)
    return _stack_block_diagonal(link, parts, first.scaling)


def _stack_block_diagonal(link: ModuleLink, parts: dict[int, Piece], scaling: float) -> Piece:
    """A = [A_q; A_k; A_v] (sum r, in) and B block diagonal (out, sum r), each block rescaled to `scaling`."""
    present = sorted(parts)
    A = torch.cat([parts[i].A for i in present], dim=0)  # (R, in), R = sum of the ranks
    B = A.new_zeros(sum(link.sizes), A.shape[0])  # (out, R)
    row_starts = [sum(link.sizes[:i]) for i in range(len(link.sizes))]
    column = 0
    for i in present:
        piece = parts[i]
        rows = slice(row_starts[i], row_starts[i] + link.sizes[i])
        B[rows, column:column + piece.rank] = piece.B * (piece.scaling / scaling)  # (size_i, r_i)
        column += piece.rank
    return Piece(A, B, scaling * A.shape[0])  # alpha / R = scaling
