"""Parquet outputs: schema, provenance metadata, spatial sort, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from gpupath.detect.boxes import Detections
from gpupath.results import (
    DETECTIONS_SCHEMA,
    SCHEMA_VERSION,
    atomic_path,
    detections_table,
    morton_code,
    write_json_atomic,
    write_slides_table,
)


def _detections(n: int, rng: np.random.Generator) -> Detections:
    cx, cy = rng.uniform(0, 4000, n).astype(np.float32), rng.uniform(0, 4000, n).astype(np.float32)
    tx, ty = (cx // 448 * 448).astype(np.int64), (cy // 448 * 448).astype(np.int64)
    return Detections(cx - 4, cy - 4, cx + 4, cy + 4, rng.uniform(0, 1, n).astype(np.float32),
                      np.zeros(n, np.int16), tx, ty)


def test_morton_code_interleaves_bits() -> None:
    assert morton_code(np.array([0, 1, 0, 1, 2, 3]), np.array([0, 0, 1, 1, 0, 3])).tolist() == [0, 1, 2, 3, 4, 15]


def test_detections_table_sorted_by_tile_key_with_provenance(tmp_path: Path) -> None:
    det = _detections(1000, np.random.default_rng(0))
    table = detections_table(det, stride_l0=448.0, label_names=["nucleus"],
                             provenance={"slide_sha256": "ab" * 32, "params": {"tile_px": 256}})
    assert table.schema.equals(DETECTIONS_SCHEMA, check_metadata=False)
    keys = table.column("tile_key").to_numpy()
    assert np.all(np.diff(keys.astype(np.int64)) >= 0)
    pq.write_table(table, tmp_path / "d.parquet")
    back = pq.read_table(tmp_path / "d.parquet")
    meta = back.schema.metadata
    assert meta[b"gpupath.schema_version"] == SCHEMA_VERSION.encode()
    assert meta[b"gpupath.slide_sha256"] == b"ab" * 32
    assert json.loads(meta[b"gpupath.params"]) == {"tile_px": 256}
    assert back.column("label").to_pylist()[:3] == ["nucleus"] * 3


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "x.parquet"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("disk on fire")
    assert not final.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_path_replaces_old_file_whole(tmp_path: Path) -> None:
    final = tmp_path / "run.json"
    write_json_atomic({"a": 1}, final)
    write_json_atomic({"a": 2}, final)
    assert json.loads(final.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_slides_table_keeps_failed_rows(tmp_path: Path) -> None:
    rows = [{"slide_id": "x", "path": "a.svs", "status": "ok", "n_detections": 5, "mpp": 0.5},
            {"slide_id": "", "path": "b.svs", "status": "failed", "error": "b.svs: file is empty (0 bytes)"}]
    write_slides_table(rows, tmp_path / "slides.parquet", provenance={})
    t = pq.read_table(tmp_path / "slides.parquet").to_pylist()
    assert [r["status"] for r in t] == ["ok", "failed"]
    assert t[1]["error"].startswith("b.svs") and t[1]["n_detections"] is None


def test_removing_a_slide_removes_its_marker_partitions_and_derived_files(tmp_path: Path) -> None:
    from gpupath.results import marker_path, remove_slide_parts, slide_part_paths

    sid = "b" * 64
    files = [marker_path(tmp_path, sid), *slide_part_paths(tmp_path, sid).values(),
             tmp_path / "reports" / f"{sid}.html", tmp_path / "overlays" / f"{sid}.png",
             tmp_path / "summaries" / f"{sid}.json", tmp_path / "geojson" / f"{sid}.geojson"]
    other = tmp_path / "reports" / f"{'c' * 64}.html"
    for f in [*files, other]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    remove_slide_parts(tmp_path, sid)
    assert not any(f.exists() for f in files) and other.exists()
