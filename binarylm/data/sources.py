"""Where text comes from: files, directories, iterables, and the built-in corpus.

Everything here streams: a source yields text one file (or one chunk of a big
file) at a time, so a corpus larger than memory can be read in one pass.

The built-in corpus is the standard library of the running Python: every `.py`
file under the stdlib directory except the `test/` and `idlelib/` packages and
installed `site-packages/`, about 12 MB of real code that every machine with
Python already has. Files are split into train and validation by a hash of
their relative path, so the split never changes when files are added.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from binarylm.errors import BinaryLMError

STDLIB_EXCLUDED_DIRS = ("test", "idlelib", "site-packages")
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
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise BinaryLMError(
                    f"directory {path} holds no text files (looked for {', '.join(TEXT_SUFFIXES)}); "
                    "point at the files themselves or at a directory that has some"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise BinaryLMError(f"input path {path} does not exist; check the spelling or create it first")
    return files


def read_texts(files: Iterable[Path], stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the text of each file (big files in line-aligned chunks), replacing invalid UTF-8."""
    stats = stats if stats is not None else ReadStats()
    for path in files:
        stats.files += 1
        with open(path, "rb") as handle:
            while True:
                raw = handle.read(CHUNK_CHARS)
                if not raw:
                    break
                raw += handle.readline()  # finish the line so no piece is cut in two
                stats.bytes += len(raw)
                yield _decode(raw, str(path), stats)


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


def text_source(inputs: Iterable[str | os.PathLike] | None, split: str = "all",
                stats: ReadStats | None = None) -> Iterator[str]:
    """Text from paths, or from the built-in corpus when `inputs` is empty or ["stdlib"]."""
    inputs = list(inputs or [])
    if not inputs or inputs == [STDLIB_NAME]:
        return read_texts(stdlib_files(split), stats)
    return read_texts(resolve_inputs(inputs), stats)
