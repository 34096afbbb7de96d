"""Where text comes from: files, directories, iterables, and the built-in corpus.

Everything here streams: a source yields text one file (or one chunk of a big
file) at a time, so a corpus larger than memory can be read in one pass.

The built-in corpus is the standard library of the running Python: every `.py`
file under the stdlib directory except the `test/`, `idlelib/` and `pydoc_data/` packages and
installed `site-packages/`, about 11 MB of real code that every machine with
Python already has. Files are split into train and validation by a hash of
their relative path, so the split never changes when files are added. The
user's own files are split the same way, by a hash of the path as listed.

A `.jsonl` file is read as one text per line, taken from one field of each
JSON object (`text_field`, "text" by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from binarylm.errors import BinaryLMError

# pydoc_data/ holds one generated file, 0.76 MB of English help text in a string: not Python
# source, and big enough that whichever split it lands in stops resembling the other.
STDLIB_EXCLUDED_DIRS = ("test", "idlelib", "site-packages", "pydoc_data")
STDLIB_NAME = "stdlib"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".html", ".csv", ".tsv")
CHUNK_CHARS = 1 << 24  # files above this many bytes are read in line-aligned chunks
REPLACEMENT = "\ufffd"


@dataclass
class ReadStats:
    """What reading a source saw: files, bytes, and invalid UTF-8 that was replaced."""

    files: int = 0
    bytes: int = 0
    invalid_utf8_files: list[str] = field(default_factory=list)
    replaced_chars: int = 0

    def report(self) -> str:
        line = f"read {self.files} files, {self.bytes / 1e6:.1f} MB"
        if self.invalid_utf8_files:
            shown = ", ".join(self.invalid_utf8_files[:3])
            more = "" if len(self.invalid_utf8_files) <= 3 else ", ..."
            line += (
                f"; invalid UTF-8 in {len(self.invalid_utf8_files)} files ({shown}{more}): "
                f"{self.replaced_chars} bad byte sequences replaced by U+FFFD"
            )
        return line


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str = "all", val_fraction: float = 0.05) -> list[Path]:
    """The built-in corpus files in sorted order; split is "train", "val" or "all"."""
    if split not in ("train", "val", "all"):
        raise BinaryLMError(f"unknown split {split!r}: use 'train', 'val' or 'all'")
    root = stdlib_root()
    files = sorted(
        path
        for path in root.rglob("*.py")
        if not set(path.relative_to(root).parts[:-1]) & set(STDLIB_EXCLUDED_DIRS)
    )
    if split == "all":
        return files
    want_val = split == "val"
    return [p for p in files if _is_validation(p.relative_to(root).as_posix(), val_fraction) == want_val]


def _is_validation(relative_path: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def resolve_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (recursively, text suffixes only) into a sorted file list."""
    return [path for path, _ in _keyed_files(inputs)]


def _keyed_files(inputs: Iterable[str | os.PathLike]) -> list[tuple[Path, str]]:
    """Each input file with its split key: its path inside the directory given, or its name.

    The key, not the absolute path, decides train or validation, so moving a
    corpus elsewhere keeps its split.
    """
    files: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise BinaryLMError(
                    f"directory {path} holds no text files (looked for {', '.join(TEXT_SUFFIXES)}); "
                    "point at the files themselves or at a directory that has some"
                )
            files.extend((p, p.relative_to(path).as_posix()) for p in found)
        elif path.is_file():
            files.append((path, path.name))
        else:
            raise BinaryLMError(f"input path {path} does not exist; check the spelling or create it first")
    return files


def read_texts(files: Iterable[Path], stats: ReadStats | None = None, *,
               text_field: str = "text") -> Iterator[str]:
    """Yield the text of each file (big files in line-aligned chunks), replacing invalid UTF-8.

    A `.jsonl` file yields one text per line instead: the `text_field` of each JSON object.
    """
    stats = stats if stats is not None else ReadStats()
    for path in files:
        stats.files += 1
        if Path(path).suffix == ".jsonl":
            yield from _read_jsonl(Path(path), text_field, stats)
        else:
            yield from _read_plain(Path(path), stats)


def _read_plain(path: Path, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as handle:
        while True:
            raw = handle.read(CHUNK_CHARS)
            if not raw:
                break
            raw += handle.readline()  # finish the line so no piece is cut in two
            stats.bytes += len(raw)
            yield _decode(raw, str(path), stats)


def _read_jsonl(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """One text per non-blank line: the `text_field` of the JSON object on that line."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            stats.bytes += len(raw)
            line = _decode(raw, str(path), stats)
            if line.strip():
                yield _jsonl_text(line, path, line_number, text_field)


def _jsonl_text(line: str, path: Path, line_number: int, text_field: str) -> str:
    where = f"{path} line {line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BinaryLMError(
            f"{where} is not valid JSON ({exc.msg}); each line of a .jsonl file must be one JSON object "
            f"with a {text_field!r} field: fix or remove that line"
        ) from None
    if not isinstance(record, dict):
        raise BinaryLMError(
            f"{where} holds a JSON {type(record).__name__}, not an object; each line of a .jsonl file "
            f"must be one JSON object with a {text_field!r} field"
        )
    if text_field not in record:
        fields = ", ".join(map(repr, record)) or "none"
        raise BinaryLMError(
            f"{where} has no {text_field!r} field (its fields: {fields}); "
            "set data.text_field to the field that holds the text, or fix that line"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise BinaryLMError(
            f"{where}: field {text_field!r} holds a {type(text).__name__}, not a string; "
            "set data.text_field to the field that holds the text, or fix that line"
        )
    return text


def _decode(raw: bytes, name: str, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        already_there = raw.count(REPLACEMENT.encode())
        stats.replaced_chars += text.count(REPLACEMENT) - already_there
        if name not in stats.invalid_utf8_files:
            stats.invalid_utf8_files.append(name)
        return text


def split_files(files: Iterable[Path], split: str, val_fraction: float, keys: list[str] | None = None) -> list[Path]:
    """The user's files of one split ("train", "val" or "all"), by a hash of each key (default: file name).

    The same rule as the built-in corpus. The validation split never takes every
    file: if the hash sends them all there (one file, say), they all stay in
    train and the validation split is empty.
    """
    if split not in ("train", "val", "all"):
        raise BinaryLMError(f"unknown split {split!r}: use 'train', 'val' or 'all'")
    files = list(files)
    if split == "all":
        return files
    keys = keys if keys is not None else [Path(p).name for p in files]
    is_val = [_is_validation(key, val_fraction) for key in keys]
    if all(is_val):
        is_val = [False] * len(files)
    want_val = split == "val"
    return [p for p, in_val in zip(files, is_val) if in_val == want_val]


def text_source(inputs: Iterable[str | os.PathLike] | None, split: str = "all",
                stats: ReadStats | None = None, *, text_field: str = "text",
                val_fraction: float = 0.05) -> Iterator[str]:
    """Text of one split, from paths, or from the built-in corpus when `inputs` is empty or ["stdlib"].

    The validation split of the user's files may be empty (see `split_files`):
    then this yields nothing.
    """
    inputs = list(inputs or [])
    if not inputs or inputs == [STDLIB_NAME]:
        return read_texts(stdlib_files(split, val_fraction), stats, text_field=text_field)
    keyed = _keyed_files(inputs)
    files = split_files([path for path, _ in keyed], split, val_fraction, keys=[key for _, key in keyed])
    return read_texts(files, stats, text_field=text_field)
