"""File helpers every part uses: the one streaming SHA-256 (slide ids, model checksums), and
files that appear whole or not at all: write to a temporary name beside the target, fsync, rename.
Every output of gpupath (Parquet parts, JSON, reports, model plans, converted slides)
goes through :func:`atomic_path`, so a crash or a full disk leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "fsync_path", "write_json_atomic", "sha256_file"]

_CHUNK_BYTES = 8 << 20


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` on success, delete it on error."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        fsync_path(tmp)  # data on disk before the name points at it (a power cut leaves old or new, whole)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # only left when the body raised


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (so the renames in it are durable); OSError where that cannot be done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(obj: Any, final: Path) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def sha256_file(path: str | os.PathLike[str], *, chunk_bytes: int = _CHUNK_BYTES) -> str:
    """Hex SHA-256 of a file, read in ``chunk_bytes`` chunks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
