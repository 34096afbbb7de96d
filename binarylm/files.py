"""Writing files so that a reader never sees half of one: write a temporary name, then rename."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _process_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


# Files are written with the permissions a plain open() would give them (0666 less the umask). Some writers
# (safetensors' save_file) create theirs 0600, which a server running as another user could not read.
FILE_MODE = 0o666 & ~_process_umask()


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside `path`, for writers that want a name rather than bytes.

    When the block succeeds the file is flushed to disk and renamed over `path`; when it
    fails the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomically(path: str | os.PathLike, value: Any) -> None:
    write_atomically(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


@contextmanager
def staged_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; when the block succeeds it replaces `path` whole.

    If the block raises, the temporary directory is removed and `path` is left as it was.
    """
    final = Path(path)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for written in staging.rglob("*"):
        if written.is_file():
            os.chmod(written, FILE_MODE)
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
