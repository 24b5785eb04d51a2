"""Slide identity: streaming SHA-256 of a slide file.

The slide id used throughout a run (Parquet partitions, provenance) is the hex SHA-256 of the
file's bytes, computed in bounded memory. Verified copies into a store come with the ingest
command (a later stage builds on :func:`sha256_file`).
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file"]

_CHUNK_BYTES = 8 << 20


def sha256_file(path: str | os.PathLike[str], *, chunk_bytes: int = _CHUNK_BYTES) -> str:
    """Hex SHA-256 of a file, read in ``chunk_bytes`` chunks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
