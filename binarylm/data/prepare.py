"""From a DataConfig to a tokenizer and train/validation token shards in a run's data directory.

Preparing is cached: `data_dir/prepared.json` records what the shards were made
from, and a later run with the same data settings reuses them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from binarylm.config import DataConfig
from binarylm.data.shards import TokenShards, prepare_shards
from binarylm.data.sources import ReadStats, text_source
from binarylm.errors import BinaryLMError
from binarylm.files import write_json_atomically
from binarylm.tokenizer import Tokenizer, load, open_tokenizer, save, train_bpe

log = logging.getLogger(__name__)
RECORD = "prepared.json"


def prepare_corpus(data: DataConfig, data_dir: str | Path, progress: bool = True
                   ) -> tuple[Tokenizer, TokenShards, TokenShards]:
    """The run's tokenizer and its (train, val) shards, made now or reused from an earlier run."""
    data_dir = Path(data_dir)
    wanted = asdict(data)
    record_path = data_dir / RECORD
    if record_path.is_file() and json.loads(record_path.read_text()) == wanted:
        return load(data_dir / "tokenizer.json"), TokenShards.open(data_dir, "train"), TokenShards.open(data_dir, "val")
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _run_tokenizer(data, data_dir, progress)
    stats = ReadStats()
    train_texts, val_texts = _split_texts(data, stats)
    prepare_shards(tokenizer, train_texts, data_dir, "train", progress=progress)
    prepare_shards(tokenizer, val_texts, data_dir, "val", progress=progress)
    if stats.invalid_utf8_files:
        log.warning(stats.report())
    write_json_atomically(record_path, wanted)
    return tokenizer, TokenShards.open(data_dir, "train"), TokenShards.open(data_dir, "val")


def _run_tokenizer(data: DataConfig, data_dir: Path, progress: bool) -> Tokenizer:
    if data.tokenizer:
        tokenizer = open_tokenizer(data.tokenizer)
    else:
        texts = text_source(data.inputs, split="train", text_field=data.text_field, val_fraction=data.val_fraction)
        tokenizer = train_bpe(texts, data.tokenizer_vocab_size, progress=progress)
    if tokenizer.eot_id is None:
        raise BinaryLMError("the tokenizer has no <|endoftext|> token, which separates documents; add it")
    save(tokenizer, data_dir / "tokenizer.json")
    return tokenizer


def _split_texts(data: DataConfig, stats: ReadStats):
    """Train and validation texts; a corpus too small to hold out whole files gives up its tail."""
    options = dict(text_field=data.text_field, val_fraction=data.val_fraction)
    val = list(text_source(data.inputs, split="val", **options))
    if val:
        return text_source(data.inputs, split="train", stats=stats, **options), val
    everything = "".join(text_source(data.inputs, split="all", stats=stats, **options))
    cut = everything.rfind("\n", 0, int(len(everything) * (1 - data.val_fraction))) + 1 or len(everything)
    if cut >= len(everything):
        raise BinaryLMError("the corpus is too small to hold out validation text; give more text")
    log.info("no whole file fell in the validation split; holding out the last %d characters", len(everything) - cut)
    return [everything[:cut]], [everything[cut:]]
