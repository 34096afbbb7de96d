"""Checkpoint directories: everything a later stage needs to use a model.

    run/ckpt-000500/
      config.json         the RunConfig that built and trained the model
      model.safetensors   weights (safetensors, never pickle)
      tokenizer.json      the tokenizer, self-contained
      train_state.pt      optimizer, step, data position (only while training; weights-only load)
      metrics.json        the latest evaluation figures
      heads.safetensors   small modules trained beside the model (a reward, value or class head), if any

A LoRA fine-tuning run saves its adapter alone: adapter.safetensors and adapter.json
take the place of model.safetensors, and config.json's finetune.base names the base
checkpoint, which `load_checkpoint` loads (quantized again for QLoRA) before adding
the adapter and, over a float base, merging it.

A checkpoint is written into a temporary directory and renamed into place,
so a crash mid-write never leaves a half checkpoint behind. `run/latest`
names the newest complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from binarylm.config import RunConfig, config_from_dict
from binarylm.errors import BinaryLMError
from binarylm.files import staged_directory, write_atomically, write_json_atomically
from binarylm.model import Transformer
from binarylm.model.lora import ADAPTER_CONFIG, frozen_base, load_adapter, lora_layers, save_adapter, strip_lora
from binarylm.model.quant import apply_quantized_structure, quantization_record
from binarylm.tokenizer import Tokenizer
from binarylm.tokenizer import load as load_tokenizer
from binarylm.tokenizer import save as save_tokenizer

LATEST = "latest"
HEADS = "heads.safetensors"
FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Tokenizer
    config: RunConfig
    path: Path
    metrics: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, tokenizer: Tokenizer,
                    config: RunConfig, train_state: dict | None = None, metrics: dict | None = None,
                    heads: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write checkpoint `step` under `run_dir` atomically and point `latest` at it."""
    run_dir = Path(run_dir)
    final = write_checkpoint(run_dir / checkpoint_name(step), model, tokenizer, config, train_state, metrics, heads)
    write_atomically(run_dir / LATEST, (final.name + "\n").encode())
    return final


def write_checkpoint(path: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, config: RunConfig,
                     train_state: dict | None = None, metrics: dict | None = None,
                     heads: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write one checkpoint directory at `path`: staged under a temporary name, then renamed into place."""
    values = config.to_dict()
    adapted = bool(lora_layers(model))
    quantization = None if adapted else quantization_record(model)  # None for a float model
    if quantization is not None:
        values["quantization"] = quantization  # beside the RunConfig sections, read back by load_checkpoint
    with staged_directory(path) as staging:
        write_json_atomically(staging / "config.json", values)
        if adapted:
            save_adapter(staging, model)
        else:
            save_model(model, str(staging / "model.safetensors"))
        save_tokenizer(tokenizer, staging / "tokenizer.json")
        write_json_atomically(staging / "metrics.json", metrics or {})
        if train_state is not None:
            torch.save(train_state, staging / "train_state.pt")
        if heads:
            tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
                       for name, head in heads.items() for key, value in head.state_dict().items()}
            save_file(tensors, str(staging / HEADS))
    return Path(path)


def load_heads(path: str | Path, heads: dict[str, torch.nn.Module]) -> None:
    """Fill `heads` (name -> module) from the checkpoint's heads.safetensors; each one must be there."""
    file = resolve_checkpoint(path) / HEADS
    saved = load_file(str(file)) if file.is_file() else {}
    names = {key.split(".", 1)[0] for key in saved}
    if names != set(heads):
        raise BinaryLMError(f"{Path(path)} holds the heads {sorted(names) or 'none'} where {sorted(heads)} were "
                            "expected; resume or load it with the stage that trained it")
    for name, head in heads.items():
        head.load_state_dict({key.split(".", 1)[1]: value for key, value in saved.items()
                              if key.split(".", 1)[0] == name})


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself or from a run directory (its `latest`)."""
    path = Path(path)
    if not path.exists():
        raise BinaryLMError(f"checkpoint {path} does not exist; give a run directory or one of its ckpt-* folders")
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    elif not (path / "config.json").is_file():
        found = sorted(p.name for p in path.glob("ckpt-*") if p.is_dir())
        hint = f"; it holds {', '.join(found)}" if found else ""
        raise BinaryLMError(f"{path} is neither a checkpoint nor a run directory with a '{LATEST}' file{hint}")
    needed = [name for name in FILES if name != "model.safetensors" or not (path / ADAPTER_CONFIG).is_file()]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise BinaryLMError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); use another checkpoint")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Model (in eval mode, on `device`), tokenizer and config from a checkpoint or run directory."""
    path = resolve_checkpoint(path)
    try:
        values = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BinaryLMError(f"{path / 'config.json'} is corrupt ({exc}); use another checkpoint") from None
    quantization = values.pop("quantization", None)
    config = config_from_dict(values)
    if (path / ADAPTER_CONFIG).is_file() and not (path / "model.safetensors").is_file():
        model = _adapted_base(path, config)
    else:
        model = Transformer(config.model)
        if quantization is not None:  # quantized layers first, so the int8/uint8 tensors load into their shapes
            apply_quantized_structure(model, quantization)
        _load_weights(model, path / "model.safetensors")
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Checkpoint(model.to(device).eval(), load_tokenizer(path / "tokenizer.json"), config, path, metrics)


def _adapted_base(path: Path, config: RunConfig) -> Transformer:
    """The base named by an adapter checkpoint, with the adapter on top (merged into a float base)."""
    base = config.finetune.base
    if not base or not Path(base).exists():
        raise BinaryLMError(f"{path} holds a LoRA adapter whose base checkpoint {base!r} is not there; "
                            "put the base back at that path, or edit finetune.base in its config.json")
    model = frozen_base(load_checkpoint(base).model, config.finetune.quantize_base)
    load_adapter(path, model)
    if config.finetune.quantize_base == "none":
        strip_lora(model, merge=True)  # a plain model again, which every exporter takes
        model.requires_grad_(True)  # and trainable again, like any loaded model, for the next stage
    return model


def _load_weights(model: Transformer, file: Path) -> None:
    """Load `file` into `model`, naming any tensor that is missing, unexpected or of the wrong shape."""
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise BinaryLMError(f"{file} cannot be read ({exc}); use another checkpoint") from None
    if model.config.tie_embeddings:  # one of the two tied names is stored
        shared = tensors.get("token_embedding.weight", tensors.get("lm_head.weight"))
        if shared is not None:
            tensors.setdefault("token_embedding.weight", shared)
            tensors.setdefault("lm_head.weight", shared)
    expected = model.state_dict()
    problems = [f"missing {name}" for name in sorted(expected.keys() - tensors.keys())]
    problems += [f"unexpected {name}" for name in sorted(tensors.keys() - expected.keys())]
    problems += [
        f"{name} is {tuple(tensors[name].shape)} where config.json implies {tuple(expected[name].shape)}"
        for name in sorted(expected.keys() & tensors.keys()) if tensors[name].shape != expected[name].shape
    ]
    problems += [  # quantized codes are integers: a float tensor in their place would be silently cast
        f"{name} is {tensors[name].dtype} where config.json implies {expected[name].dtype}"
        for name in sorted(expected.keys() & tensors.keys())
        if tensors[name].is_floating_point() != expected[name].is_floating_point()
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BinaryLMError(f"{file} does not match config.json: {'; '.join(problems[:3])}{more}; "
                            "the checkpoint is inconsistent, use another one")
    model.load_state_dict(tensors)


def load_train_state(path: str | Path) -> dict:
    """The optimizer/step/data state saved beside the weights (weights-only unpickling)."""
    path = resolve_checkpoint(path)
    state_file = path / "train_state.pt"
    if not state_file.is_file():
        raise BinaryLMError(f"{path} has no train_state.pt, so training cannot resume from it")
    try:
        return torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise BinaryLMError(f"{state_file} cannot be read ({type(exc).__name__}); resume from an earlier checkpoint") \
            from None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("ckpt-*") if p.is_dir())


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names)."""
    run_dir = Path(run_dir)
    latest = (run_dir / LATEST).read_text().strip() if (run_dir / LATEST).is_file() else None
    old = [p for p in list_checkpoints(run_dir)[:-keep] if p.name != latest]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
