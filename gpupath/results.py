"""Arrow schemas and atomic writers for a run's outputs.

Layout of a run folder (level-0 px everywhere; see DESIGN.md)::

    run.json                                   parameters, versions, device, timings, per-slide status
    slides.parquet                             one row per slide
    detections/slide_id=<id>/part-0.parquet    boxes, sorted by a spatial key (Morton code of the tile),
                                               in row groups of DETECTIONS_ROW_GROUP_ROWS with statistics
    tiles/slide_id=<id>/part-0.parquet         the tiles processed

Every file is written under a temporary name in its final folder and renamed when complete, so
a reader (or a resumed run) never sees half a file. Schemas carry a version and provenance in
their metadata; :func:`check_schema_version` is what every reader of a run folder calls first.

Schema versions are ``"MAJOR.MINOR"``: a minor version only adds (metadata keys, columns), so a
reader reads every minor of its major; another major is refused with a message saying what to do.

- 1 (1.0): the first layout (row groups of 65,536 rows).
- 1.1: ``gpupath.label_names`` (JSON list of the model's class names) in the metadata; detections
  in row groups of 16,384 rows, recorded as sorted by (tile_key, y0_px, x0_px).
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpupath._version import __version__
from gpupath.types import Detections
from gpupath.files import atomic_path, write_json_atomic
from gpupath.errors import ResultsError

__all__ = [
    "SCHEMA_VERSION",
    "DETECTIONS_ROW_GROUP_ROWS",
    "check_schema_version",
    "DETECTIONS_SCHEMA",
    "TILES_SCHEMA",
    "SLIDES_SCHEMA",
    "detections_table",
    "tiles_table",
    "write_slide_parts",
    "remove_slide_parts",
    "slide_part_paths",
    "write_slides_table",
    "write_error",
    "morton_code",
    "schema_major",
]

SCHEMA_VERSION = "1.1"

# Rows per Parquet row group of a detections partition. Rows are in Morton order of their tile, so
# a row group covers a compact patch of the slide and its min/max statistics on x0_px..y1_px let a
# region query skip the others (gpupath.query). bench/bench_query.py, 10M uniform detections on two
# 200k x 200k px slides, 2000 x 2000 px regions (~1000 hits): 65,536 rows/group read up to 8 of 154
# groups (5.2 %, 387k rows decoded on average), 16,384 up to 11 of 612 (1.8 %, 125k rows) in the same
# ~15-20 ms, with a 3 % smaller file; 8,192 decoded 69k rows but took longer (25 ms; full scans 2x
# slower) from per-group overhead. --row-group-rows compares them again.
DETECTIONS_ROW_GROUP_ROWS = 16384

DETECTIONS_SCHEMA = pa.schema([
    pa.field("x0_px", pa.float32(), nullable=False),   # level-0, left (inclusive)
    pa.field("y0_px", pa.float32(), nullable=False),   # level-0, top (inclusive)
    pa.field("x1_px", pa.float32(), nullable=False),   # level-0, right (exclusive)
    pa.field("y1_px", pa.float32(), nullable=False),   # level-0, bottom (exclusive)
    pa.field("score", pa.float32(), nullable=False),
    pa.field("label", pa.dictionary(pa.int16(), pa.string()), nullable=False),
    pa.field("tile_x_px", pa.int64(), nullable=False),  # level-0 origin of the source tile
    pa.field("tile_y_px", pa.int64(), nullable=False),
    pa.field("tile_key", pa.uint64(), nullable=False),  # Morton code of the tile (spatial sort key)
])

TILES_SCHEMA = pa.schema([
    pa.field("x_px", pa.int64(), nullable=False),       # level-0, left (inclusive)
    pa.field("y_px", pa.int64(), nullable=False),       # level-0, top (inclusive)
    pa.field("size_px", pa.int32(), nullable=False),    # level-0 edge
    pa.field("col", pa.int32(), nullable=False),
    pa.field("row", pa.int32(), nullable=False),
    pa.field("level", pa.int16(), nullable=False),      # pyramid level read
    pa.field("tissue_fraction", pa.float32(), nullable=False),
    pa.field("n_detections", pa.int32(), nullable=False),
    pa.field("tile_key", pa.uint64(), nullable=False),
])

SLIDES_SCHEMA = pa.schema([
    pa.field("slide_id", pa.string()),       # sha256 of the file ("" when it could not be read)
    pa.field("path", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("status", pa.string()),        # ok | failed
    pa.field("error", pa.string()),
    pa.field("warning", pa.string()),
    pa.field("vendor", pa.string()),
    pa.field("backend", pa.string()),
    pa.field("width_px", pa.int64()),
    pa.field("height_px", pa.int64()),
    pa.field("level_count", pa.int32()),
    pa.field("mpp", pa.float64()),           # level-0 µm/px
    pa.field("tile_mpp", pa.float64()),      # µm/px of the tiles processed
    pa.field("tissue_mm2", pa.float64()),
    pa.field("n_tiles", pa.int64()),
    pa.field("n_detections", pa.int64()),
    pa.field("seconds", pa.float64()),
    pa.field("resumed", pa.bool_()),         # True: complete outputs of an earlier run were kept, not redone
])


def morton_code(col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Interleave the bits of (col, row) < 2**32 into uint64 Z-order keys."""
    def spread(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.uint64) & np.uint64(0xFFFFFFFF)
        for shift, mask in ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
                            (2, 0x3333333333333333), (1, 0x5555555555555555)):
            v = (v | (v << np.uint64(shift))) & np.uint64(mask)
        return v

    return spread(np.asarray(col)) | (spread(np.asarray(row)) << np.uint64(1))


def _metadata(provenance: Mapping[str, Any]) -> dict[bytes, bytes]:
    meta = {"gpupath.schema_version": SCHEMA_VERSION, "gpupath.version": __version__}
    meta.update({f"gpupath.{k}": v if isinstance(v, str) else json.dumps(v, default=str) for k, v in provenance.items()})
    return {k.encode(): v.encode() for k, v in meta.items()}


def detections_table(det: Detections, *, stride_l0: float, label_names: list[str],
                     provenance: Mapping[str, Any]) -> pa.Table:
    """Detections as an Arrow table sorted by tile Morton code, then y, then x.

    ``stride_l0`` is the level-0 distance between tile origins; the tile key is the Morton code
    of the source tile's (col, row).
    """
    key = morton_code(*det.tile_cells(stride_l0))
    order = np.lexsort((det.x0, det.y0, key))
    labels = pa.DictionaryArray.from_arrays(pa.array(det.label[order], pa.int16()), pa.array(label_names, pa.string()))
    table = pa.table(
        [det.x0[order], det.y0[order], det.x1[order], det.y1[order], det.score[order], labels,
         det.tile_x[order], det.tile_y[order], key[order]],
        schema=DETECTIONS_SCHEMA,
    )
    return table.replace_schema_metadata(_metadata({**provenance, "label_names": list(label_names)}))


def tiles_table(*, x: np.ndarray, y: np.ndarray, size_l0_px: int, col: np.ndarray, row: np.ndarray, level: int,
                tissue_fraction: np.ndarray, n_detections: np.ndarray, provenance: Mapping[str, Any]) -> pa.Table:
    """The processed tile grid as an Arrow table (one row per tile, level-0 px, in grid order).

    Parameters
    ----------
    x, y : (N,) level-0 origins of the tiles.
    size_l0_px : level-0 tile edge, px.
    col, row : (N,) grid column and row.
    level : pyramid level the tiles were read from.
    tissue_fraction : (N,) tissue share of each tile, in [0, 1].
    n_detections : (N,) detections kept for each tile after de-duplication.
    provenance : written into the schema metadata.
    """
    n = len(x)
    table = pa.table(
        [x.astype(np.int64), y.astype(np.int64), np.full(n, size_l0_px, np.int32), col.astype(np.int32),
         row.astype(np.int32), np.full(n, level, np.int16), tissue_fraction.astype(np.float32),
         n_detections.astype(np.int32), morton_code(col, row)],
        schema=TILES_SCHEMA,
    )
    return table.replace_schema_metadata(_metadata(provenance))


def slide_part_paths(out_dir: Path, slide_id: str) -> dict[str, Path]:
    """Where one slide's partitions live."""
    return {name: out_dir / name / f"slide_id={slide_id}" / "part-0.parquet" for name in ("detections", "tiles")}


def marker_path(out_dir: Path, slide_id: str) -> Path:
    """The completion marker of one slide: written last, after both partitions are in place."""
    return out_dir / "done" / f"{slide_id}.json"


def remove_slide_parts(out_dir: Path, slide_id: str) -> None:
    """Delete a slide's completion marker, then its partitions and derived files (report, overlay,
    summary, GeoJSON) before it is re-run, so a failed or killed re-run leaves neither stale results
    nor a marker that vouches for them."""
    derived = [out_dir / folder / f"{slide_id}{ext}" for folder, ext in
               (("reports", ".html"), ("overlays", ".png"), ("summaries", ".json"), ("geojson", ".geojson"))]
    for path in (marker_path(out_dir, slide_id), *slide_part_paths(out_dir, slide_id).values(), *derived):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_error(path: Path, exc: OSError) -> ResultsError:
    """One line for an output that could not be written (the disk full, a read-only folder, ...): the
    temporary file is already gone (``atomic_path``), so nothing half-written is left."""
    text = exc.strerror or str(exc).replace("\n", " ")
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)
    return ResultsError(f"{path}: cannot write it: {text}" + ("; the disk is full" if full else ""))


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from exc


def write_marker(out_dir: Path, slide_id: str, *, results_key: str, result: Mapping[str, Any]) -> None:
    """Vouch that a slide's partitions are complete for ``results_key``: records their sizes, atomically."""
    parts = slide_part_paths(out_dir, slide_id)
    with _writing(marker_path(out_dir, slide_id)):
        write_json_atomic({"slide_id": slide_id, "results_key": results_key,
                           "sizes": {name: path.stat().st_size for name, path in parts.items()},
                           "result": dict(result)}, marker_path(out_dir, slide_id))


def completed_result(out_dir: Path, slide_id: str, results_key: str) -> dict[str, Any] | None:
    """The recorded result of a slide whose outputs are complete for ``results_key``, else None.

    Complete means: a readable marker with the same key, and both partitions present with the
    sizes the marker recorded (a partition replaced or truncated since does not count).
    """
    try:
        marker = json.loads(marker_path(out_dir, slide_id).read_text())
        if marker["results_key"] != results_key:
            return None
        for name, path in slide_part_paths(out_dir, slide_id).items():
            if path.stat().st_size != marker["sizes"][name]:
                return None
        return dict(marker["result"])
    except (OSError, ValueError, KeyError, TypeError):  # missing, half-written by a crash, or garbage: redo
        return None


def write_slide_parts(out_dir: Path, slide_id: str, detections: pa.Table, tiles: pa.Table, *,
                      row_group_rows: int = DETECTIONS_ROW_GROUP_ROWS) -> dict[str, Path]:
    """Write one slide's detection and tile partitions: both to temporary files first, renamed
    only when both are complete (a failure removes both temporaries). Returns their paths.

    ``detections`` (from :func:`detections_table`, already in spatial order) goes in row groups of
    ``row_group_rows`` rows with min/max statistics, marked as sorted by (tile_key, y0_px, x0_px).
    """
    paths = slide_part_paths(out_dir, slide_id)
    names = DETECTIONS_SCHEMA.names
    sorting = [pq.SortingColumn(names.index(c)) for c in ("tile_key", "y0_px", "x0_px")]
    with _writing(paths["detections"].parent.parent), contextlib.ExitStack() as stack:
        tmps = {name: stack.enter_context(atomic_path(paths[name])) for name in paths}
        pq.write_table(detections, tmps["detections"], row_group_size=row_group_rows, write_statistics=True,
                       compression="zstd", sorting_columns=sorting)
        pq.write_table(tiles, tmps["tiles"], row_group_size=65536, write_statistics=True, compression="zstd")
    return paths


def schema_major(version: str) -> int:
    """The major number of a schema version string (``"1"`` and ``"1.1"`` -> 1); ValueError if malformed."""
    major = version.split(".", 1)[0]
    if not major.isdigit():
        raise ValueError(f"malformed schema version {version!r}")
    return int(major)


def check_schema_version(path: Path, metadata: Mapping[bytes, bytes] | None) -> str:
    """The schema version of a gpupath Parquet file from its key-value ``metadata``, if this gpupath reads it.

    Raises
    ------
    ResultsError
        No version in the metadata (not written by gpupath), or a major version other than this
        gpupath's (older: re-run the slide; newer: upgrade gpupath).
    """
    raw = (metadata or {}).get(b"gpupath.schema_version")
    here = schema_major(SCHEMA_VERSION)
    if raw is None:
        raise ResultsError(f"{path}: no gpupath.schema_version in its Parquet metadata: not a gpupath output "
                           f"file; this gpupath reads schema version {here}.x")
    version = raw.decode(errors="replace")
    try:
        major = schema_major(version)
    except ValueError:
        raise ResultsError(f"{path}: malformed schema version {version!r}; this gpupath reads {here}.x") from None
    if major < here:
        raise ResultsError(f"{path}: schema version {version}, this gpupath ({__version__}) reads {here}.x; "
                           "re-run the slide with this gpupath (gpupath run --redo) to rewrite it")
    if major > here:
        raise ResultsError(f"{path}: schema version {version} is newer than this gpupath ({__version__}) reads "
                           f"({here}.x); upgrade gpupath to read it")
    return version


def write_slides_table(rows: list[Mapping[str, Any]], final: Path, *, provenance: Mapping[str, Any]) -> None:
    """slides.parquet: one row per slide (ok or failed), written atomically."""
    columns = {f.name: [row.get(f.name) for row in rows] for f in SLIDES_SCHEMA}
    table = pa.table(columns, schema=SLIDES_SCHEMA).replace_schema_metadata(_metadata(provenance))
    with _writing(final), atomic_path(final) as tmp:
        pq.write_table(table, tmp)
