"""Run folders of random detections written as the pipeline writes them, and schema-version rewrites:
shared by the query tests (tests/test_query.py) and the GeoJSON tests (tests/test_geojson.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from gpupath.detect.boxes import Detections, random_detections
from gpupath.results import detections_table, tiles_table, write_slide_parts

LABELS = ["nucleus", "mitosis"]
STRIDE_PX = 448            # level-0 distance between tile origins (512-px tiles, 64-px overlap)


def synthetic_detections(n: int, rng: np.random.Generator, *, side_px: int = 200_000) -> Detections:
    """``n`` random boxes on a ``side_px`` square slide in tiles every STRIDE_PX, labels of LABELS."""
    return random_detections(n, rng, side_px=side_px, n_labels=len(LABELS), stride_px=STRIDE_PX)


def write_slide(out: Path, slide_id: str, det: Detections, **kwargs: int) -> Path:
    """A slide's partitions as the pipeline writes them (detections_table + write_slide_parts)."""
    table = detections_table(det, stride_l0=STRIDE_PX, label_names=LABELS, provenance={"slide_sha256": slide_id})
    z = np.zeros(0, np.int64)
    tiles = tiles_table(x=z, y=z, size_l0_px=512, col=z, row=z, level=0, tissue_fraction=np.zeros(0),
                        n_detections=z, provenance={})
    return write_slide_parts(out, slide_id, table, tiles, **kwargs)["detections"]


def rewrite_version(path: Path, version: str | None, *, drop: tuple[bytes, ...] = ()) -> None:
    """Rewrite a detections file with another schema version in its metadata (None: no version key)."""
    table = pq.read_table(path)
    meta = {k: v for k, v in table.schema.metadata.items() if k not in drop and k != b"gpupath.schema_version"}
    if version is not None:
        meta[b"gpupath.schema_version"] = version.encode()
    pq.write_table(table.replace_schema_metadata(meta), path, row_group_size=16384)
