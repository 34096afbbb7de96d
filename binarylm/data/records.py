"""JSON records from a data file, each with the place it came from, for errors that name file and line.

A file whose text starts with "[" is one JSON list; anything else is JSONL, one object per line
(blank lines are skipped). Every record must be a JSON object.

    for where, record in json_records("train.jsonl", "chat"):   # where = "train.jsonl, line 3"
        ...
"""

from __future__ import annotations

import json
from pathlib import Path

from binarylm.errors import BinaryLMError


def json_records(path: str | Path, shape: str) -> list[tuple[str, dict]]:
    """("file, line N" or "file, item N", object) for each record; `shape` says in errors what a record holds."""
    path = Path(path)
    if not path.is_file():
        raise BinaryLMError(f"{path} is not a file; give a JSONL file of {shape} records")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BinaryLMError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from None
    records = _json_list(path, text) if text.lstrip().startswith("[") else _json_lines(path, text, shape)
    for where, record in records:
        if not isinstance(record, dict):
            raise BinaryLMError(f"{where}: expected a JSON object ({shape}), got {type(record).__name__}")
    return records


def _json_list(path: Path, text: str) -> list[tuple[str, object]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise BinaryLMError(
            f"{path}, line {error.lineno}, column {error.colno}: malformed JSON ({error.msg}); fix the file"
        ) from None
    if not isinstance(items, list):
        raise BinaryLMError(f"{path}: expected a JSON list of records, or one JSON object per line (JSONL)")
    return [(f"{path}, item {number}", item) for number, item in enumerate(items, start=1)]


def _json_lines(path: Path, text: str, shape: str) -> list[tuple[str, object]]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            records.append((f"{path}, line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise BinaryLMError(
                f"{path}, line {number}: malformed JSON ({error.msg} at column {error.colno}); "
                f"each line must hold one {shape} object (JSONL), or the whole file one JSON list"
            ) from None
    return records
