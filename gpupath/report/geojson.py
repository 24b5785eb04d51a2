"""Detections as GeoJSON that QuPath imports as detection objects.

Takes a run folder (or a table from :func:`gpupath.query.query`) and writes a GeoJSON
``FeatureCollection`` (RFC 7946 structure, the subset QuPath >= 0.4 reads): one ``Feature`` per
detection with

- ``id``: a UUID derived from the slide id and the row's box, score and label (the same
  detection gets the same id in every export);
- ``geometry``: a ``Polygon`` of the box, one closed ring of 5 positions, counterclockwise in
  the numbers (``x0,y0 -> x1,y0 -> x1,y1 -> x0,y1 -> x0,y0``), in level-0 px: QuPath's image
  pixel space (x right, y down);
- ``properties``: ``objectType: "detection"``, ``classification: {name, color: [r, g, b]}``
  (the overlay colour of the label) and ``measurements: {"score": s}``.

Coordinates and scores are written as the shortest decimal that reads back to the same float32.
Runs on the host; :func:`write_geojson` streams record batches, so a slide with millions of
detections never becomes one Python list. Reference: QuPath's ``PathObjectTypeAdapters``
(GeoJSON import/export of path objects) and RFC 7946.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
import pyarrow as pa

from gpupath.query import QueryPlan, iter_query, plan_query
from gpupath.report.colours import label_colour, label_colours
from gpupath.files import atomic_path

__all__ = ["geojson_path", "write_geojson", "write_features", "detections_to_geojson", "feature_ids", "write_plan"]

_HEAD = '{"type":"FeatureCollection","features":[\n'
_TAIL = "\n]}\n"
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def geojson_path(out_dir: Path, slide_id: str) -> Path:
    """Where a slide's GeoJSON goes in a run folder: ``geojson/<slide_id>.geojson``."""
    return Path(out_dir) / "geojson" / f"{slide_id}.geojson"


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)


def feature_ids(slide_id: str, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray,
                score: np.ndarray, label: Sequence[str]) -> list[str]:
    """Deterministic UUIDs (RFC 9562 version 8 layout) of detections of one slide.

    Parameters
    ----------
    slide_id : the slide the rows belong to.
    x0, y0, x1, y1, score : (N,) float32 level-0 px box and score.
    label : (N,) class names.
    """
    salt = np.uint64(int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "little"))
    names = list(dict.fromkeys(label))
    name_hash = {n: int.from_bytes(hashlib.sha256(n.encode()).digest()[:4], "little") for n in names}
    lab = np.fromiter((name_hash[n] for n in label), np.uint64, count=len(label))
    with np.errstate(over="ignore"):
        hi = _mix(salt ^ ((_bits(x0) << np.uint64(32)) | _bits(y0)))
        lo = _mix(hi ^ ((_bits(x1) << np.uint64(32)) | _bits(y1)))
        lo = _mix(lo ^ ((_bits(score) << np.uint64(32)) | lab))
        hi = _mix(hi ^ lo)
    hi = (hi & (_M64 ^ np.uint64(0xF000))) | np.uint64(0x8000)                       # version 8
    lo = (lo & np.uint64(0x3FFFFFFFFFFFFFFF)) | np.uint64(0x8000000000000000)        # RFC variant
    out = []
    for h, v in zip(hi.tolist(), lo.tolist()):
        s = f"{h:016x}{v:016x}"
        out.append(f"{s[:8]}-{s[8:12]}-{s[12:16]}-{s[16:20]}-{s[20:]}")
    return out


def _numbers(column: pa.ChunkedArray | pa.Array, what: str) -> tuple[np.ndarray, list[str]]:
    values = np.asarray(column.to_numpy(zero_copy_only=False), np.float32)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what}: non-finite value {values[~np.isfinite(values)][0]} (GeoJSON numbers are finite)")
    return values, values.astype(str).tolist()   # shortest text that reads back as the same float32


def _label_strings(column: pa.Array) -> list[str]:
    if pa.types.is_dictionary(column.type):
        names = np.asarray(column.dictionary.to_pylist(), dtype=object)
        return names[column.indices.to_numpy(zero_copy_only=False)].tolist()
    return column.to_pylist()


def _feature_lines(batch: pa.RecordBatch, *, slide_id: str | None, colours: dict[str, Sequence[int]]) -> list[str]:
    """One GeoJSON Feature (compact JSON text) per row of a batch of detections."""
    n = batch.num_rows
    if n == 0:
        return []
    cols = {name: batch.column(name) for name in batch.schema.names}
    coords = {}
    for name in ("x0_px", "y0_px", "x1_px", "y1_px", "score"):
        coords[name] = _numbers(cols[name], name)
    labels = _label_strings(cols["label"])
    sids = np.asarray(cols["slide_id"].to_pylist() if "slide_id" in cols else [slide_id or ""] * n, dtype=object)
    ids = np.empty(n, dtype=object)
    for sid in dict.fromkeys(sids.tolist()):   # ids are salted by each row's slide
        rows = np.flatnonzero(sids == sid)
        ids[rows] = feature_ids(sid, *(coords[c][0][rows] for c in ("x0_px", "y0_px", "x1_px", "y1_px", "score")),
                                [labels[r] for r in rows.tolist()])
    for name in dict.fromkeys(labels):
        if name not in colours:   # a class the caller did not list: the next colour, the same in every batch
            colours[name] = label_colour(len(colours))
    cls = {name: '{"name":%s,"color":[%d,%d,%d]}' % (json.dumps(name), *colours[name]) for name in set(labels)}
    x0, y0, x1, y1, score = (coords[c][1] for c in ("x0_px", "y0_px", "x1_px", "y1_px", "score"))
    return [
        '{"type":"Feature","id":"%s","geometry":{"type":"Polygon","coordinates":[[[%s,%s],[%s,%s],[%s,%s],[%s,%s],'
        '[%s,%s]]]},"properties":{"objectType":"detection","classification":%s,"measurements":{"score":%s}}}'
        % (ids[i], x0[i], y0[i], x1[i], y0[i], x1[i], y1[i], x0[i], y1[i], x0[i], y0[i], cls[labels[i]], score[i])
        for i in range(n)
    ]


def _colours(label_names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """Class name -> RGB, the overlay's colour of its label index (a fresh dict: unlisted classes are added)."""
    return dict(label_colours(label_names))


def write_features(batches: Iterable[pa.RecordBatch | pa.Table], fh: IO[str], *, slide_id: str | None = None,
                   label_names: Sequence[str] = ()) -> int:
    """Stream a FeatureCollection of detections to a text file; returns the number of features.

    Parameters
    ----------
    batches : record batches (or tables) with x0_px, y0_px, x1_px, y1_px, score, label and
        optionally slide_id (else ``slide_id`` names the slide for every row; it salts the ids).
    fh : open text file.
    label_names : the detector's classes: class colours follow their index (the overlay's colours).
    """
    colours = _colours(label_names)
    fh.write(_HEAD)
    count = 0
    for item in batches:
        for batch in (item.to_batches() if isinstance(item, pa.Table) else [item]):
            lines = _feature_lines(batch, slide_id=slide_id, colours=colours)
            if lines:
                fh.write((",\n" if count else "") + ",\n".join(lines))
                count += len(lines)
    fh.write(_TAIL)
    return count


def detections_to_geojson(table: pa.Table, *, slide_id: str | None = None) -> dict[str, Any]:
    """A (small) table of detections as a GeoJSON FeatureCollection dict; see the module docstring.

    ``table`` has the columns of a :func:`gpupath.query.query` result (``slide_id`` optional:
    without it, ``slide_id`` salts the feature ids). Class colours follow the label dictionary's order.
    """
    names: list[str] = []
    label = table.column("label")
    if pa.types.is_dictionary(label.type) and label.num_chunks:
        names = label.chunk(0).dictionary.to_pylist()
    lines = []
    colours = _colours(names)
    for batch in table.to_batches():
        lines += _feature_lines(batch, slide_id=slide_id, colours=colours)
    return {"type": "FeatureCollection", "features": [json.loads(line) for line in lines]}


def write_geojson(out_dir: str | Path, slide_id: str, *, path: Path | None = None) -> Path:
    """Write ``geojson/<slide_id>.geojson`` of run folder ``out_dir`` (atomically) and return its path.

    Parameters
    ----------
    out_dir : run folder.
    slide_id : the slide (its id, or a unique prefix).
    path : write here instead.

    Raises
    ------
    ResultsError
        No detections partition, or one of a schema version this gpupath does not read.
    ValueError
        Unknown or ambiguous slide.
    """
    out_dir = Path(out_dir)
    plan = plan_query(out_dir, slide=slide_id)
    (sid,) = plan.slide_ids or [slide_id]
    final = geojson_path(out_dir, sid) if path is None else Path(path)
    with atomic_path(final) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        write_features(iter_query(plan), fh, slide_id=sid, label_names=plan.label_names)
    return final


def write_plan(plan: QueryPlan, sink: BinaryIO) -> int:
    """The export registry's geojson writer: the rows of one slide's plan as a FeatureCollection.

    Raises ValueError before writing anything when the plan spans several slides.
    """
    if len(plan.slide_ids) > 1:
        raise ValueError(f"GeoJSON holds the detections of one slide, and {len(plan.slide_ids)} slides match; "
                         f"choose one ({', '.join(s[:12] for s in plan.slide_ids[:5])})")
    text = io.TextIOWrapper(sink, encoding="utf-8", write_through=True)
    try:
        return write_features(iter_query(plan), text, label_names=plan.label_names)
    finally:
        text.detach()  # leave ``sink`` open for its owner
