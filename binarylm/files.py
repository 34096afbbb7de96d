"""Writing files so that a reader never sees half of one: write a temporary name, then rename."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json_atomically(path: str | os.PathLike, value: Any) -> None:
    write_atomically(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))
