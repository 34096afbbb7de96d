"""Byte-level BPE tokenization, written from scratch.

    from binarylm.tokenizer import train_bpe, load, save, cl100k_base
    tok = train_bpe(texts, vocab_size=8192)          # GPT-4 split pattern by default
    ids = tok.encode("hello world")                   # special tokens raise unless allowed
    tok.decode(ids)
"""

from binarylm.tokenizer.core import DEFAULT_SPECIAL_TOKENS, ENDOFTEXT, IM_END, IM_START, PAD, Tokenizer
from binarylm.tokenizer.formats import (
    cl100k_base,
    from_hf_json,
    load,
    load_hf,
    load_tiktoken,
    open_tokenizer,
    save,
    save_hf,
    save_tiktoken,
    to_hf_json,
)
from binarylm.tokenizer.patterns import GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from binarylm.tokenizer.train import train_bpe

__all__ = [
    "DEFAULT_SPECIAL_TOKENS", "ENDOFTEXT", "GPT2_PATTERN", "GPT4_PATTERN", "IM_END", "IM_START", "PAD",
    "PATTERNS", "Tokenizer", "cl100k_base", "from_hf_json", "load", "load_hf", "load_tiktoken", "open_tokenizer",
    "save", "save_hf", "save_tiktoken", "to_hf_json", "train_bpe",
]
