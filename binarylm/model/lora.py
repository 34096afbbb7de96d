"""LoRA: fine-tune a frozen model through small low-rank corrections to chosen linear layers.

A linear layer computes y = x W^T + b with W (out, in). Fine-tuning changes W by some
update dW of the same size. LoRA bets that the useful update has low rank and writes it
as the product of two thin matrices, trained while W stays frozen:

    y = x W^T + b + (alpha / r) * (dropout(x) A^T) B^T        A (r, in),  B (out, r),  r << min(in, out)

so dW = (alpha / r) B A. Per adapted layer that is r * (in + out) trainable numbers instead
of in * out. B starts at zero, so at step 0 the adapted model computes exactly what the base
did; A starts random (Kaiming-uniform, as nn.Linear initialises its weights) so that the
gradient of B, which is proportional to A x, is not zero. The scale alpha / r keeps the
size of the update roughly independent of the rank chosen.

QLoRA is the same thing over a quantized base (Int8Linear or Int4Linear, model/quant.py):
the base stays frozen in 8 or 4 bits, gradients flow through its dequantized weight to the
layers below, and only A and B, kept in floating point, are trained.

Merging folds the update into the base weight (W <- W + (alpha / r) B A) so inference pays
nothing extra; unmerging subtracts it again. A quantized base is never merged into: adding a
small update to 8- or 4-bit codes would be lost to rounding. Dequantize first
(`dequantize_model(model)`, which keeps the adapters) and merge the float model.

Layers are chosen by name patterns. A bare name ("qkv", "proj", "up") matches the last part
of a layer's name, or its last parts ("attn.proj"); anything else is a glob over the whole
name ("blocks.0.*", "blocks.*.mlp.down"). In BinaryLM's Transformer the linear layers are
blocks.N.attn.qkv, blocks.N.attn.proj, blocks.N.mlp.up / .down (and .gate with SwiGLU) and lm_head.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from binarylm.errors import BinaryLMError
from binarylm.files import atomic_path, write_json_atomically
from binarylm.model.quant import QuantizedLinear, quantize_model

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_FORMAT = "binarylm-lora"
ADAPTER_VERSION = 1


# ------------------------------------------------------------------ configuration


@dataclass
class LoRAConfig:
    """Which layers get adapters and how big they are.

    rank: r, the inner width of each adapter; alpha: the update is scaled by alpha / rank;
    dropout: applied to the adapter's input only, while training;
    targets: layer name patterns (see the module docstring); a comma-separated string is split.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [part.strip() for part in self.targets.split(",") if part.strip()]
        else:
            self.targets = list(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> LoRAConfig:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise BinaryLMError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise BinaryLMError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise BinaryLMError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(target, str) and target for target in self.targets):
            raise BinaryLMError(f"lora.targets must be a non-empty list of layer name patterns (e.g. qkv,proj), "
                                f"got {self.targets!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "the LoRA config") -> LoRAConfig:
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise BinaryLMError(f"{source}: unknown LoRA setting(s) {', '.join(unknown)}; "
                                f"valid ones are {', '.join(sorted(valid))}")
        return cls(**values).validate()


# ------------------------------------------------------------------ the layer


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear, Int8Linear or Int4Linear) plus a trainable low-rank update.

        y = base(x) + scaling * B (A dropout(x))        A (rank, in), B (out, rank), scaling = alpha / rank

    `merged` says whether the update currently lives inside the base weight (then the
    adapter path is skipped); `enabled` switches the adapter off without touching it.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise BinaryLMError("this layer already has a LoRA adapter")
        if not isinstance(base, nn.Linear | QuantizedLinear):
            raise BinaryLMError(f"LoRA wraps nn.Linear, Int8Linear or Int4Linear layers, not {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(alpha)
        device, dtype = _adapter_placement(base)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init: U(-1/sqrt(in), 1/sqrt(in))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False
        self.enabled = True
        self.train(base.training)  # a new module starts in training mode; follow the model's mode instead

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def quantized(self) -> bool:
        return isinstance(self.base, QuantizedLinear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self.base(x)  # (..., out)
        if self.merged or not self.enabled:
            return y
        return y + self.adapter_output(x).to(y.dtype)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B (A dropout(x)): the update's contribution alone, (..., in) -> (..., out)."""
        inner = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        return F.linear(inner, self.lora_B.to(x.dtype)) * self.scaling  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, (out, in): the update as a full matrix, in the adapter's dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base's weight (out, in) in floating point (dequantized for a quantized base)."""
        if self.quantized:
            return self.base.dequantized_weight(dtype)
        weight = self.base.weight
        return weight if dtype is None else weight.to(dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight this layer computes with, (out, in): base plus the update unless merged or disabled.

        The Transformer's fused loss asks its output head for this (model/gpt.py), so an adapted
        lm_head trains through it; there the adapter's dropout is not applied.
        """
        weight = self.base_weight(dtype)
        if self.merged or not self.enabled:
            return weight
        return weight + self.delta_weight().to(weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


def _adapter_placement(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for the adapter: the base's own float dtype, float32 over a quantized base."""
    if isinstance(base, QuantizedLinear):
        return base.scales.device, torch.float32
    return base.weight.device, base.weight.dtype


# ------------------------------------------------------------------ choosing layers


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer LoRA can wrap: nn.Linear and the saveable quantized layers."""
    bases = {id(module.base) for module in model.modules() if isinstance(module, LoRALinear)}
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear | QuantizedLinear) and id(module) not in bases]


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every adapted layer, in model order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def matches(name: str, pattern: str) -> bool:
    """Whether a layer name matches a target: a glob over the whole name, or over its last dotted parts."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def layer_name_summary(names: list[str]) -> str:
    """Names with their layer numbers folded into '*': 'blocks.*.attn.qkv, ..., lm_head'."""
    folded = dict.fromkeys(re.sub(r"(?<![^.])\d+(?![^.])", "*", name) for name in names)
    return ", ".join(folded)


def select_layers(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the linear layers any target matches; an error naming the layers when a target matches none."""
    names = [name for name, _ in linear_layers(model)]
    unmatched = [pattern for pattern in targets if not any(matches(name, pattern) for name in names)]
    if unmatched:
        raise BinaryLMError(
            f"LoRA target(s) {', '.join(map(repr, unmatched))} match no linear layer; the model's linear layers "
            f"are {layer_name_summary(names) or '(none)'} (a bare name such as 'qkv' matches the end of a name, "
            "a glob such as 'blocks.0.*' the whole name)"
        )
    return [name for name in names if any(matches(name, pattern) for pattern in targets)]


# ------------------------------------------------------------------ adding and removing adapters


def frozen_base(model: nn.Module, quantize: str = "none") -> nn.Module:
    """Freeze every parameter, quantizing the linear layers first for QLoRA ("int8" or "int4").

    An output head tied to the token embedding stays float: it is the embedding table too.
    """
    if quantize != "none":
        tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
        quantize_model(model, quantize, skip=["lm_head"] if tied else [])
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and wrap the layers `config.targets` match; returns their names.

    The model is changed in place and remembers the config as `model.lora_config`.
    """
    config.validate()
    names = select_layers(model, config.targets)
    add_lora_to_layers(model, {name: (config.rank, config.alpha) for name in names}, config.dropout)
    model.lora_config = config
    return names


def add_lora_to_layers(model: nn.Module, layers: dict[str, tuple[int, float]], dropout: float = 0.0) -> list[str]:
    """Freeze the model and wrap each named layer with an adapter of its own (rank, alpha); returns the names.

    The building block of `add_lora`, for adapters whose layers differ in rank (a loaded or imported one).
    """
    _refuse_if_adapted(model)
    available = dict(linear_layers(model))
    missing = [name for name in layers if name not in available]
    if missing:
        raise BinaryLMError(f"the model has no linear layer {', '.join(map(repr, missing))}; its linear layers "
                            f"are {layer_name_summary(list(available))}: the adapter was made for another model")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, (rank, alpha) in layers.items():
        _set_submodule(model, name, LoRALinear(available[name], rank, alpha, dropout))
    return list(layers)


def _refuse_if_adapted(model: nn.Module) -> None:
    adapted = [name for name, _ in lora_layers(model)]
    if adapted:
        raise BinaryLMError(f"the model already has LoRA adapters ({layer_name_summary(adapted)}); "
                            "call strip_lora(model) first to start again")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def strip_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the plain base layers back in place of the adapted ones, in place; returns the model.

    merge=True keeps the adapters' effect (merged into the float base weights first);
    merge=False gives back the original base (unmerging first where needed). Either
    way the model is a plain one again: `export_hf` and checkpoints take it as it is.
    Parameters stay frozen; unfreeze them yourself for full fine-tuning.
    """
    if merge:
        merge_lora(model)
    else:
        unmerge_lora(model)
    for name, layer in lora_layers(model):
        _set_submodule(model, name, layer.base)
    model.__dict__.pop("lora_config", None)
    return model


# ------------------------------------------------------------------ merging


def merge_lora(model: nn.Module) -> list[str]:
    """Add scaling * B A into each adapted float base weight; returns the names merged (already merged ones skip).

    Refused, before anything changes, for a quantized base (dequantize_model(model) first) and for a
    weight shared with another layer (a tied output head: merging would change the embedding too).
    """
    layers = [(name, layer) for name, layer in lora_layers(model) if not layer.merged]
    _check_mergeable(model, layers)
    with torch.no_grad():
        for _, layer in layers:
            weight = layer.base.weight
            weight.add_(layer.delta_weight().to(weight.dtype))  # (out, in)
            layer.merged = True
    return [name for name, _ in layers]


def unmerge_lora(model: nn.Module) -> list[str]:
    """Subtract scaling * B A from each merged base weight again; returns the names unmerged."""
    layers = [(name, layer) for name, layer in lora_layers(model) if layer.merged]
    with torch.no_grad():
        for _, layer in layers:
            weight = layer.base.weight
            weight.sub_(layer.delta_weight().to(weight.dtype))  # (out, in)
            layer.merged = False
    return [name for name, _ in layers]


def _check_mergeable(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> None:
    quantized = [name for name, layer in layers if layer.quantized]
    if quantized:
        raise BinaryLMError(
            f"cannot merge LoRA into quantized layers ({layer_name_summary(quantized)}): the small update would be "
            "lost to rounding; call binarylm.model.quant.dequantize_model(model) first (it keeps the adapters), "
            "then merge"
        )
    uses = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    shared = [name for name, layer in layers if uses.get(id(layer.base.weight), 0) > 1]
    if shared:
        raise BinaryLMError(
            f"cannot merge LoRA into {', '.join(shared)}: its weight is shared with another layer (the output head "
            "tied to the token embedding), so merging would change both; keep the adapter unmerged"
        )


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (e.g. a reference model for DPO), adapters untouched.

    Merged adapters cannot be switched off this way; unmerge them first.
    """
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise BinaryLMError("merged LoRA adapters cannot be disabled; call unmerge_lora(model) first")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.enabled = enabled


# ------------------------------------------------------------------ counting


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each distinct tensor once (a tied head counts once).

    The total counts a quantized layer's weight as the in * out values it stands for (and its bias),
    although they are stored as buffers, so the fraction means the same for LoRA and QLoRA.
    """
    parameters = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    total = sum(p.numel() for p in parameters)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.in_features * module.out_features + (0 if module.bias is None else module.bias.numel())
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    """'trainable 12,288 of 1,234,567 parameters (1.00%)'."""
    trainable, total = trainable_parameters(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


# ------------------------------------------------------------------ adapter weights and files


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights alone: {'<layer>.lora_A': (r, in), '<layer>.lora_B': (out, r)}, detached."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the adapter") -> None:
    """Copy adapter weights into the model's adapters, checking that names and shapes agree exactly."""
    layers = dict(lora_layers(model))
    if any(layer.merged for layer in layers.values()):
        raise BinaryLMError("cannot load adapter weights into merged adapters; call unmerge_lora(model) first")
    expected = {name: tuple(t.shape) for name, t in lora_state_dict(model).items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise BinaryLMError(f"{source} does not fit the model's adapters (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); it was made for other layers or another model")
    wrong = [f"{name} {tuple(state[name].shape)} vs {shape}" for name, shape in expected.items()
             if tuple(state[name].shape) != shape]
    if wrong:
        raise BinaryLMError(f"{source} has tensors of the wrong shape ({'; '.join(wrong[:3])}); "
                            "it was made with another rank or for another model size")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(state[f"{name}.lora_A"])
            layer.lora_B.copy_(state[f"{name}.lora_B"])


def save_adapter(directory: str | Path, model: nn.Module, config: LoRAConfig | None = None) -> Path:
    """Write the adapter alone: adapter.safetensors (A and B of each layer) and adapter.json (config, ranks).

    Each file is written atomically; adapter.json goes last, so it marks a complete adapter.
    Other files in `directory` are left alone. `config` defaults to the one add_lora recorded.
    """
    directory = Path(directory)
    layers = lora_layers(model)
    if not layers:
        raise BinaryLMError("the model has no LoRA adapters to save; call add_lora(model, config) first")
    config = config or getattr(model, "lora_config", None) or LoRAConfig(targets=[name for name, _ in layers])
    tensors = {name: tensor.float().cpu().contiguous() for name, tensor in lora_state_dict(model).items()}
    with atomic_path(directory / ADAPTER_WEIGHTS) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    write_json_atomically(directory / ADAPTER_CONFIG, _adapter_description(model, config, layers))
    return directory


def _adapter_description(model: nn.Module, config: LoRAConfig, layers: list[tuple[str, LoRALinear]]) -> dict:
    description = {
        "format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "config": config.to_dict(),
        "layers": {name: {"rank": layer.rank, "alpha": layer.alpha} for name, layer in layers},
    }
    base = getattr(model, "config", None)
    if base is not None and hasattr(base, "__dataclass_fields__"):
        description["base_model"] = asdict(base)  # for the reader's information; shapes are what is checked
    return description


def load_adapter(directory: str | Path, model: nn.Module) -> LoRAConfig:
    """Load an adapter written by `save_adapter` onto `model`; returns its config.

    A model without adapters gets them (same layers and ranks) first; a model that has
    adapters must have the same ones, and receives the saved weights.
    """
    directory = Path(directory)
    description = _read_adapter_description(directory)
    source = str(directory / ADAPTER_CONFIG)
    config = LoRAConfig.from_dict(description.get("config", {}), source)
    ranks = _recorded_ranks(description, source)
    if lora_layers(model):
        _check_same_adapters(model, ranks, source)
    else:
        add_lora_to_layers(model, ranks, config.dropout)
        model.lora_config = config
    load_lora_state_dict(model, _read_adapter_weights(directory / ADAPTER_WEIGHTS), str(directory / ADAPTER_WEIGHTS))
    return config


def _read_adapter_description(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        hint = " (it holds a PEFT adapter: use binarylm.interop.peft.import_peft)" \
            if (directory / "adapter_config.json").is_file() else ""
        raise BinaryLMError(f"{path} does not exist; an adapter directory needs {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS}, as save_adapter writes them{hint}")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BinaryLMError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(description, dict) or description.get("format") != ADAPTER_FORMAT:
        raise BinaryLMError(f"{path} is not a BinaryLM LoRA adapter description (no \"format\": \"{ADAPTER_FORMAT}\")")
    if description.get("version") != ADAPTER_VERSION:
        raise BinaryLMError(f"{path} has adapter format version {description.get('version')!r}; "
                            f"this BinaryLM reads version {ADAPTER_VERSION}")
    return description


def _recorded_ranks(description: dict, source: str) -> dict[str, tuple[int, float]]:
    layers = description.get("layers")
    try:
        ranks = {name: (int(entry["rank"]), float(entry["alpha"])) for name, entry in layers.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise BinaryLMError(f"{source}: 'layers' must map each layer name to {{\"rank\": r, \"alpha\": a}}") from None
    if not ranks or any(rank <= 0 or alpha <= 0 for rank, alpha in ranks.values()):
        raise BinaryLMError(f"{source}: 'layers' must list at least one layer, with positive ranks and alphas")
    return ranks


def _check_same_adapters(model: nn.Module, ranks: dict[str, tuple[int, float]], source: str) -> None:
    present = {name: (layer.rank, layer.alpha) for name, layer in lora_layers(model)}
    if present != ranks:
        raise BinaryLMError(f"{source} describes adapters on {layer_name_summary(list(ranks))} but the model has "
                            f"{layer_name_summary(list(present))} (or other ranks); load into a model without "
                            "adapters, or strip_lora(model) first")


def _read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BinaryLMError(f"{path} does not exist; the adapter directory is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BinaryLMError(f"{path} cannot be read as safetensors ({exc})") from None
