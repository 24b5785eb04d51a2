"""Indexed retrieval of detections from a run folder: by slide, region, label and score.

Takes a run folder ``OUT`` (``OUT/detections/slide_id=<id>/*.parquet``, see
:mod:`gpupath.results`) and returns a :class:`pyarrow.Table` of the matching detections: the
columns of :data:`gpupath.results.DETECTIONS_SCHEMA` plus ``slide_id``, level-0 px boxes
``x0_px, y0_px, x1_px, y1_px`` (half-open), in file order (slide, then spatial order). Runs on the
host (pyarrow, NumPy).

How a region query reads little: the rows of a partition are sorted by the Morton code of their
tile, so each Parquet row group covers a compact patch of the slide, and its min/max statistics
of ``x0_px .. y1_px`` bound that patch. :func:`plan_query` reads only the file footers, keeps the
row groups whose bounds can intersect the region (and whose ``score`` maximum reaches
``min_score``), and :func:`iter_query` decodes just those row groups and filters their rows
exactly. ``QueryPlan.row_groups_read`` is therefore the number of row groups actually read.

Every file's schema version is checked first (:func:`gpupath.results.check_schema_version`):
the current major version is read (a 1.0 file, which lacks ``gpupath.label_names``, gets its
label names from the label column's dictionary); others are refused with what to do.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpupath.errors import ResultsError
from gpupath.results import DETECTIONS_SCHEMA, check_schema_version

__all__ = ["BBox", "FilePlan", "QueryPlan", "RESULT_SCHEMA", "parse_bbox", "slide_ids",
           "plan_query", "iter_query", "query", "label_names"]

# what a query returns: the stored columns, then the partition's slide id
RESULT_SCHEMA = DETECTIONS_SCHEMA.append(pa.field("slide_id", pa.string(), nullable=False))

_BATCH_ROWS = 65536


@dataclass(frozen=True, slots=True)
class BBox:
    """A query region in level-0 px; a box matches when it intersects it (both half-open)."""

    x0: float   # level-0 px, left (inclusive)
    y0: float   # level-0 px, top (inclusive)
    x1: float   # level-0 px, right (exclusive)
    y1: float   # level-0 px, bottom (exclusive)

    def __post_init__(self) -> None:
        values = (self.x0, self.y0, self.x1, self.y1)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"bbox needs four finite numbers x0, y0, x1, y1 (level-0 px), got {values}")
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"bbox x0,y0,x1,y1 = {self.x0:g},{self.y0:g},{self.x1:g},{self.y1:g}: "
                             "needs x1 > x0 and y1 > y0 (level-0 px, right/bottom exclusive)")
        for name, v in zip(("x0", "y0", "x1", "y1"), values):
            object.__setattr__(self, name, float(v))   # NumPy scalars in, plain floats kept


def parse_bbox(text: str) -> BBox:
    """``"X0,Y0,X1,Y1"`` (level-0 px) -> :class:`BBox`; ValueError naming the text otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 4:
            raise ValueError
        return BBox(*(float(p) for p in parts))
    except ValueError as exc:
        why = f": {exc}" if str(exc) else ""
        raise ValueError(f"bbox {text!r}: expected X0,Y0,X1,Y1 in level-0 px with X1 > X0, Y1 > Y0{why}") from None


@dataclass(frozen=True, slots=True)
class FilePlan:
    """What a query reads of one detections file."""

    path: Path
    slide_id: str
    schema_version: str
    label_names: tuple[str, ...]        # the detector's classes, in label-index order
    row_groups: tuple[int, ...]         # the row groups to read (ascending)
    n_row_groups: int                   # row groups in the file
    n_rows_read: int                    # rows in ``row_groups``
    metadata: pq.FileMetaData = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class QueryPlan:
    """The files and row groups a query reads, and the row filter applied to them."""

    files: tuple[FilePlan, ...]
    row_filter: pc.Expression | None = field(compare=False)

    @property
    def row_groups_read(self) -> int:
        return sum(len(f.row_groups) for f in self.files)

    @property
    def row_groups_total(self) -> int:
        return sum(f.n_row_groups for f in self.files)

    @property
    def rows_read(self) -> int:
        return sum(f.n_rows_read for f in self.files)

    @property
    def slide_ids(self) -> list[str]:
        return sorted({f.slide_id for f in self.files})

    @property
    def label_names(self) -> list[str]:
        """Class names of the files, in first-seen order."""
        return list(dict.fromkeys(name for f in self.files for name in f.label_names))


def _detections_root(out: Path) -> Path:
    if not out.is_dir():
        raise ResultsError(f"{out}: no such run folder")
    root = out / "detections"
    if not root.is_dir():
        raise ResultsError(f"{out}: no detections/ folder (no slide of this run succeeded, or not a gpupath run folder)")
    return root


def slide_ids(out: str | Path) -> list[str]:
    """Slide ids with a detections partition in run folder ``out`` (sorted)."""
    root = _detections_root(Path(out))
    return sorted(p.name.removeprefix("slide_id=") for p in root.glob("slide_id=*") if p.is_dir())


def _ids_by_name(out: Path, slide: str) -> list[str]:
    """Slide ids whose path or file name in the run's slides.parquet is ``slide``."""
    table = out / "slides.parquet"
    if not table.is_file():
        return []
    rows = pq.read_table(table, columns=["path", "slide_id"]).to_pylist()
    return sorted({r["slide_id"] for r in rows if r["slide_id"] and slide in (r["path"], Path(r["path"]).name)})


def _resolve_slide(out: Path, slide: str) -> str:
    """A slide id, a unique prefix of one (as ``gpupath ingest`` prints 12 hex digits), or the slide's
    path or file name as the run recorded it."""
    ids = slide_ids(out)
    if slide in ids:
        return slide
    found = [s for s in ids if slide and s.startswith(slide)]
    if not found:
        found = [s for s in _ids_by_name(out, slide) if s in ids]
        if len(found) > 1:
            raise ValueError(f"{slide!r} names {len(found)} slides of {out} ({', '.join(s[:12] for s in found)}); "
                             "give the slide id")
    if len(found) == 1:
        return found[0]
    shown = ", ".join(s[:12] for s in (found or ids)[:5]) + (" ..." if len(found or ids) > 5 else "")
    if found:
        raise ValueError(f"slide {slide!r} is a prefix of {len(found)} slides in {out / 'detections'} ({shown}); "
                         "give more of the id")
    raise ValueError(f"no slide {slide!r} in {out / 'detections'} (slides: {shown or 'none'})")


def _files(out: Path, slide: str | None) -> list[tuple[str, Path]]:
    root = _detections_root(out)
    ids = [_resolve_slide(out, slide)] if slide is not None else slide_ids(out)
    files = []
    for sid in ids:
        part = root / f"slide_id={sid}"
        # a name starting with "." is a temporary file still being written (gpupath.files.atomic_path)
        files += [(sid, p) for p in sorted(part.glob("*.parquet")) if not p.name.startswith((".", "_"))]
    return files


def _read_footer(path: Path) -> tuple[pq.FileMetaData, str]:
    try:
        md = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        raise ResultsError(f"{path}: not a readable Parquet file ({exc})") from None
    version = check_schema_version(path, md.metadata)
    names = set(md.schema.to_arrow_schema().names)
    missing = [n for n in DETECTIONS_SCHEMA.names if n not in names]
    if missing:
        raise ResultsError(f"{path}: schema version {version} detections without column(s) {', '.join(missing)}; "
                           "the file is damaged or not a detections partition")
    return md, version


def _file_label_names(path: Path, md: pq.FileMetaData) -> tuple[str, ...]:
    raw = (md.metadata or {}).get(b"gpupath.label_names")
    if raw is not None:
        return tuple(json.loads(raw))
    # schema 1.0 adapter: the names are the label column's dictionary (all classes, used or not)
    if md.num_row_groups == 0:
        return ()
    with pq.ParquetFile(path, metadata=md) as reader:
        col = reader.read_row_group(0, columns=["label"]).column("label")
    return tuple(col.chunk(0).dictionary.to_pylist()) if col.num_chunks else ()


def _group_bounds(md: pq.FileMetaData, columns: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per row group (min, max) of each column from the footer statistics; (-inf, inf) where absent."""
    index = {md.schema.column(j).path: j for j in range(md.num_columns)}
    n = md.num_row_groups
    bounds = {c: (np.full(n, -np.inf), np.full(n, np.inf)) for c in columns}
    for g in range(n):
        rg = md.row_group(g)
        for c in columns:
            stats = rg.column(index[c]).statistics
            if stats is not None and stats.has_min_max:
                bounds[c][0][g], bounds[c][1][g] = stats.min, stats.max
    return bounds


def _labels(label: str | Sequence[str] | None) -> list[str] | None:
    if label is None:
        return None
    labels = [label] if isinstance(label, str) else list(label)
    if not labels or not all(isinstance(name, str) and name for name in labels):
        raise ValueError(f"label must be a class name or a list of them, got {label!r}")
    return labels


def plan_query(out: str | Path, *, slide: str | None = None, bbox: BBox | Sequence[float] | None = None,
               label: str | Sequence[str] | None = None, min_score: float | None = None) -> QueryPlan:
    """Which files and row groups a query reads (from the file footers only), and its row filter.

    Parameters
    ----------
    out : run folder (holds ``detections/``).
    slide : slide id, or a unique prefix of one; None: every slide.
    bbox : (x0, y0, x1, y1) level-0 px, right/bottom exclusive; boxes intersecting it match.
    label : class name(s) to keep; each must be a class of the files read.
    min_score : keep detections with ``score >= min_score``.

    Raises
    ------
    ResultsError
        ``out`` or its ``detections/`` folder is missing, or a file is unreadable or of a schema
        version this gpupath does not read (the message says what to do).
    ValueError
        A malformed bbox or score, an unknown or ambiguous slide, an unknown label.
    """
    out = Path(out)
    if bbox is not None and not isinstance(bbox, BBox):
        if len(bbox) != 4:
            raise ValueError(f"bbox needs four numbers x0, y0, x1, y1 (level-0 px), got {bbox!r}")
        bbox = BBox(*bbox)
    if min_score is not None and not (isinstance(min_score, numbers.Real) and math.isfinite(min_score)):
        raise ValueError(f"min_score must be a finite number, got {min_score!r}")
    if min_score is not None:
        # scores are stored as float32: compare in float32, so --min-score 0.7 keeps a stored 0.7
        min_score = float(np.float32(min_score))
    labels = _labels(label)
    plans = []
    for sid, path in _files(out, slide):
        md, version = _read_footer(path)
        keep = np.ones(md.num_row_groups, bool)
        if bbox is not None or min_score is not None:
            b = _group_bounds(md, ["x0_px", "y0_px", "x1_px", "y1_px", "score"])
            if bbox is not None:  # a row group may hold a match only if its extent intersects the region
                keep &= ((b["x1_px"][1] > bbox.x0) & (b["x0_px"][0] < bbox.x1)
                         & (b["y1_px"][1] > bbox.y0) & (b["y0_px"][0] < bbox.y1))
            if min_score is not None:
                keep &= b["score"][1] >= min_score
        groups = tuple(int(g) for g in np.flatnonzero(keep))
        plans.append(FilePlan(path=path, slide_id=sid, schema_version=version,
                              label_names=_file_label_names(path, md), row_groups=groups,
                              n_row_groups=md.num_row_groups,
                              n_rows_read=sum(md.row_group(g).num_rows for g in groups), metadata=md))
    if labels is not None:
        known = list(dict.fromkeys(name for f in plans for name in f.label_names))
        unknown = [name for name in labels if name not in known]
        if unknown:
            what = (f"label {unknown[0]!r} is not a class" if len(unknown) == 1 else
                    f"labels {', '.join(map(repr, unknown))} are not classes")
            raise ValueError(f"{what} of these detections (classes: {', '.join(known) or 'none'})")
    terms = []
    if bbox is not None:
        terms += [pc.field("x1_px") > bbox.x0, pc.field("x0_px") < bbox.x1,
                  pc.field("y1_px") > bbox.y0, pc.field("y0_px") < bbox.y1]
    if labels is not None:
        terms.append(pc.field("label") == labels[0] if len(labels) == 1 else pc.field("label").isin(labels))
    if min_score is not None:
        terms.append(pc.field("score") >= min_score)
    row_filter = None
    for term in terms:
        row_filter = term if row_filter is None else row_filter & term
    return QueryPlan(files=tuple(plans), row_filter=row_filter)


def iter_query(plan: QueryPlan, *, batch_rows: int = _BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The matching rows of a plan as record batches of :data:`RESULT_SCHEMA` (reads only the planned row groups)."""
    names = DETECTIONS_SCHEMA.names
    for f in plan.files:
        if not f.row_groups:
            continue
        with pq.ParquetFile(f.path, metadata=f.metadata) as reader:
            for batch in reader.iter_batches(batch_size=batch_rows, row_groups=list(f.row_groups), columns=names,
                                             use_threads=True):
                if plan.row_filter is not None:
                    batch = batch.filter(plan.row_filter)
                if batch.num_rows:
                    yield pa.RecordBatch.from_arrays(
                        [*batch.columns, pa.repeat(pa.scalar(f.slide_id, pa.string()), batch.num_rows)],
                        schema=RESULT_SCHEMA)


def query(out: str | Path, *, slide: str | None = None, bbox: BBox | Sequence[float] | None = None,
          label: str | Sequence[str] | None = None, min_score: float | None = None) -> pa.Table:
    """Detections of run folder ``out`` matching every filter given, as a table of :data:`RESULT_SCHEMA`.

    Parameters and errors as :func:`plan_query`. An empty result is a 0-row table of the same schema.

    Examples
    --------
    >>> t = query("run1", bbox=(10_000, 20_000, 12_000, 22_000), label="nucleus", min_score=0.5)  # doctest: +SKIP
    """
    plan = plan_query(out, slide=slide, bbox=bbox, label=label, min_score=min_score)
    return pa.Table.from_batches(list(iter_query(plan)), schema=RESULT_SCHEMA)


def label_names(out: str | Path, *, slide: str | None = None) -> list[str]:
    """Class names of the detections in ``out`` (one slide's, or all), from the file metadata."""
    return plan_query(out, slide=slide).label_names
