"""Evaluate a checkpoint on its run's held-out text: loss, perplexity, bits per byte, and xz -9e."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from binarylm.checkpoint import load_checkpoint
from binarylm.data.shards import TokenShards, WindowLoader
from binarylm.errors import BinaryLMError
from binarylm.eval.lm import bits_per_byte, xz_bits_per_byte
from binarylm.files import write_json_atomically

EVAL_BATCH = 8


def evaluate_checkpoint(path: str | Path, max_tokens: int = 0, device: str = "cpu") -> dict:
    """Figures for the checkpoint at `path`, also written to its eval.json."""
    saved = load_checkpoint(path, device=device)
    val = _validation_shards(saved.path)
    figures = evaluate_held_out(saved.model, saved.tokenizer, val, max_tokens, torch.device(device))
    figures["checkpoint"] = str(saved.path)
    write_json_atomically(saved.path / "eval.json", figures)
    return figures


def evaluate_held_out(model, tokenizer, val: TokenShards, max_tokens: int, device: torch.device) -> dict:
    """Model and xz bits per byte on the same held-out bytes (non-overlapping context windows)."""
    context = model.config.context_length
    loader = WindowLoader(val, context, EVAL_BATCH)
    batches = loader.num_windows // EVAL_BATCH if not max_tokens else max(1, max_tokens // (context * EVAL_BATCH))
    if batches == 0:
        raise BinaryLMError(f"the held-out text ({len(val)} tokens) is shorter than {EVAL_BATCH} context windows")
    result = bits_per_byte(model, tokenizer, loader.eval_batches(EVAL_BATCH, batches), device, keep_text=True)
    xz = xz_bits_per_byte(result.pop("text"))
    return {
        "loss": result["loss"],
        "perplexity": math.exp(min(result["loss"], 50.0)),
        "bits_per_byte": result["bits_per_byte"],
        "xz_bits_per_byte": xz,
        "beats_xz": result["bits_per_byte"] < xz,
        "tokens": result["tokens"],
        "bytes": result["bytes"],
    }


def _validation_shards(checkpoint_dir: Path) -> TokenShards:
    data_dir = checkpoint_dir.parent / "data"
    if not (data_dir / "val.json").is_file():
        raise BinaryLMError(
            f"no held-out shards at {data_dir} (they are written by `binarylm pretrain`); "
            "evaluate a checkpoint inside its run directory"
        )
    return TokenShards.open(data_dir, "val")
