"""`binarylm convert`: any supported model format in, any out.

    BinaryLM checkpoint   a run directory or one of its ckpt-* folders (config.json + model.safetensors)
    Hugging Face          a transformers directory (config.json with "architectures" + safetensors)
    GGUF                  a .gguf file written for llama.cpp

The source format is recognised from what is on disk; the target is named.
"""

from __future__ import annotations

import json
from pathlib import Path

from binarylm.config import RunConfig
from binarylm.errors import BinaryLMError
from binarylm.model import Transformer
from binarylm.tokenizer import Tokenizer

TARGETS = ("binarylm", "hf", "gguf")
GGUF_MAGIC = b"GGUF"


def detect_format(source: str | Path) -> str:
    """'binarylm', 'hf' or 'gguf' for what lies at `source`; a clear error for anything else."""
    path = Path(source)
    if not path.exists():
        raise BinaryLMError(f"{path} does not exist; give a BinaryLM checkpoint or run directory, "
                            "a Hugging Face model directory, or a .gguf file")
    if path.is_file():
        with path.open("rb") as handle:
            if handle.read(4) == GGUF_MAGIC:
                return "gguf"
        raise BinaryLMError(f"{path} is a file but not a GGUF file; other formats are directories")
    config = path / "config.json"
    try:
        if config.is_file() and "architectures" in json.loads(config.read_text(encoding="utf-8")):
            return "hf"
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BinaryLMError(f"{config} is not valid JSON ({exc})") from None
    return "binarylm"  # resolve_checkpoint explains what is missing if it is not one


def load_any(source: str | Path) -> tuple[Transformer, Tokenizer, RunConfig]:
    """(model in eval mode, tokenizer, run config) from a source in any supported format."""
    kind = detect_format(source)
    if kind == "hf":
        from binarylm.interop.hf import import_hf

        return import_hf(source)
    if kind == "gguf":
        from binarylm.interop.gguf import read_gguf

        config, state, tokenizer = read_gguf(source)
        model = Transformer(config)
        model.load_state_dict(state)
        return model.eval(), tokenizer, RunConfig(model=config)
    from binarylm.checkpoint import load_checkpoint

    saved = load_checkpoint(source)
    return saved.model, saved.tokenizer, saved.config


def convert(source: str | Path, output: str | Path, to: str, gguf_dtype: str = "f32") -> Path:
    """Read `source` (any format) and write it to `output` in format `to`; returns what was written."""
    if to not in TARGETS:
        raise BinaryLMError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    output = Path(output)
    if output.resolve() == Path(source).resolve():
        raise BinaryLMError("the output would overwrite the source; choose another output path")
    model, tokenizer, config = load_any(source)
    if to != "binarylm" and getattr(model, "quantization", None):
        from binarylm.model.quant import dequantize_model

        model = dequantize_model(model)  # the other formats are written from float weights
    if to == "hf":
        from binarylm.interop.hf import export_hf

        return export_hf(model, tokenizer, output)
    if to == "gguf":
        from binarylm.interop.gguf import export_gguf

        export_gguf(model, tokenizer, output, dtype=gguf_dtype)
        return output
    from binarylm.checkpoint import write_checkpoint

    return write_checkpoint(output, model, tokenizer, config, metrics={"converted_from": str(source)})
