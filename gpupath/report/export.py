"""``gpupath query --format``: one registry of writers from a query plan to bytes.

A writer is ``write(plan, sink) -> rows written``: it encodes the plan's rows (:func:`gpupath.query.iter_query`)
into the binary file object ``sink`` and neither opens nor closes it. :func:`export` owns the file:
an atomic temporary beside ``dest`` (renamed when the writer returns), or standard output.
A new format is one new module with a ``write_plan(plan, sink)`` and one line in :data:`EXPORTERS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from gpupath.files import atomic_path
from gpupath.query import QueryPlan
from gpupath.report import geojson, tabular

__all__ = ["EXPORTERS", "EXPORT_FORMATS", "FILE_ONLY", "export"]

Writer = Callable[[QueryPlan, BinaryIO], int]

EXPORTERS: dict[str, Writer] = {
    "csv": tabular.write_csv,
    "parquet": tabular.write_parquet,
    "geojson": geojson.write_plan,
}
EXPORT_FORMATS = tuple(EXPORTERS)
FILE_ONLY = frozenset({"parquet"})  # binary formats never written to a terminal


def export(plan: QueryPlan, fmt: str, dest: Path | None = None, *, stdout: BinaryIO | None = None) -> int:
    """Stream a plan's rows in format ``fmt`` to ``dest`` (atomically) or, for text formats, to ``stdout``.

    Returns the number of rows written. Raises ValueError for an unknown format, a file-only
    format without ``dest``, or what the writer refuses (GeoJSON over several slides).
    """
    if fmt not in EXPORTERS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if fmt in FILE_ONLY and dest is None:
        raise ValueError(f"{fmt} output needs a file to write to")
    write = EXPORTERS[fmt]
    if dest is None:
        sink = stdout if stdout is not None else sys.stdout.buffer
        sys.stdout.flush()
        count = write(plan, sink)
        sink.flush()
        return count
    with atomic_path(Path(dest)) as tmp, open(tmp, "wb") as fh:
        return write(plan, fh)
