"""GeoJSON export: the structure QuPath reads as detections, exact round trip of the Parquet rows,
streaming of a large slide, and a real pipeline run's output."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers_query import LABELS, rewrite_version, synthetic_detections, write_slide

from gpupath.detect.boxes import Detections
from gpupath.errors import ResultsError
from gpupath.pipeline import RunParams, process_slide
from gpupath.query import query
from gpupath.report.geojson import (
    detections_to_geojson,
    feature_ids,
    geojson_path,
    write_geojson,
)
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_qupath_geojson(doc: Any) -> list[str]:
    """Problems of a document against the GeoJSON (RFC 7946) subset QuPath imports as detections; [] when valid.

    FeatureCollection of Features; each: an ``id`` that is a UUID (QuPath >= 0.4 keeps it as the
    object's id), a Polygon geometry of closed linear rings (>= 4 positions of 2 finite numbers,
    first == last, exterior counterclockwise by the right-hand rule), ``properties.objectType ==
    "detection"``, ``properties.classification.name`` a string and ``.color`` three 0-255 ints,
    ``properties.measurements`` an object of finite numbers.
    """
    problems: list[str] = []
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        return ["top level is not a FeatureCollection object"]
    if not isinstance(doc.get("features"), list):
        return ["features is not an array"]
    for i, f in enumerate(doc["features"]):
        def bad(msg: str, i: int = i) -> None:
            problems.append(f"feature {i}: {msg}")

        if not isinstance(f, dict) or f.get("type") != "Feature":
            bad("not a Feature object")
            continue
        try:
            uuid.UUID(f["id"])
        except (KeyError, TypeError, ValueError):
            bad(f"id {f.get('id')!r} is not a UUID")
        geom = f.get("geometry")
        if not isinstance(geom, dict) or geom.get("type") != "Polygon" or not isinstance(geom.get("coordinates"), list):
            bad("geometry is not a Polygon with coordinates")
        elif not geom["coordinates"]:
            bad("polygon without rings")
        else:
            for r, ring in enumerate(geom["coordinates"]):
                if not (isinstance(ring, list) and len(ring) >= 4
                        and all(isinstance(p, list) and len(p) == 2 and all(map(_number, p)) for p in ring)):
                    bad(f"ring {r} is not >= 4 positions of 2 finite numbers")
                    continue
                if ring[0] != ring[-1]:
                    bad(f"ring {r} is not closed")
                area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
                if r == 0 and area2 < 0:
                    bad("exterior ring is clockwise")
        props = f.get("properties")
        if not isinstance(props, dict):
            bad("no properties object")
            continue
        if props.get("objectType") != "detection":
            bad(f"objectType {props.get('objectType')!r} is not 'detection'")
        cls = props.get("classification")
        if not (isinstance(cls, dict) and isinstance(cls.get("name"), str) and cls["name"]):
            bad("classification.name is not a non-empty string")
        elif not (isinstance(cls.get("color"), list) and len(cls["color"]) == 3
                  and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in cls["color"])):
            bad("classification.color is not [r, g, b] in 0..255")
        meas = props.get("measurements")
        if not (isinstance(meas, dict) and all(isinstance(k, str) and _number(v) for k, v in meas.items())):
            bad("measurements is not an object of finite numbers")
    return problems


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN/Infinity (not JSON, though Python writes and reads them by default)."""
    def refuse(token: str) -> None:
        raise ValueError(f"non-JSON number {token}")
    return json.loads(text, parse_constant=refuse)


def test_validator_catches_what_qupath_would_not_read() -> None:
    good = {"type": "Feature", "id": str(uuid.uuid4()),
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]]},
            "properties": {"objectType": "detection", "classification": {"name": "nucleus", "color": [1, 2, 3]},
                           "measurements": {"score": 0.5}}}
    assert validate_qupath_geojson({"type": "FeatureCollection", "features": [good]}) == []
    cases = {
        "not closed": ("geometry", {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 2], [0, 1]]]}),
        "clockwise": ("geometry", {"type": "Polygon", "coordinates": [[[0, 0], [0, 2], [2, 2], [2, 0], [0, 0]]]}),
        "positions": ("geometry", {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [0, 0]]]}),
        "not a Polygon": ("geometry", {"type": "Point", "coordinates": [0, 0]}),
        "UUID": ("id", "PathDetectionObject"),
    }
    for why, (key, value) in cases.items():
        problems = validate_qupath_geojson({"type": "FeatureCollection", "features": [{**good, key: value}]})
        assert problems and why in problems[0], (why, problems)
    for props, why in ((dict(good["properties"], objectType="annotation"), "objectType"),
                       (dict(good["properties"], classification={"color": [1, 2, 3]}), "classification.name"),
                       (dict(good["properties"], measurements={"score": "high"}), "measurements")):
        problems = validate_qupath_geojson({"type": "FeatureCollection", "features": [{**good, "properties": props}]})
        assert problems and why in problems[0], (why, problems)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """One slide of 150k detections (several record batches) on 30k x 30k px."""
    write_slide(tmp_path, "5eed" * 16, synthetic_detections(150_000, np.random.default_rng(5), side_px=30_000))
    return tmp_path


def test_slide_geojson_is_valid_and_round_trips_the_parquet_exactly(run: Path) -> None:
    sid = "5eed" * 16
    path = write_geojson(run, sid[:8])   # a unique prefix names the slide; the file takes the full id
    assert path == geojson_path(run, sid) == run / "geojson" / f"{sid}.geojson"
    doc = strict_json(path.read_text())
    assert validate_qupath_geojson(doc) == []
    table = pq.read_table(run / "detections" / f"slide_id={sid}" / "part-0.parquet")
    features = doc["features"]
    assert len(features) == table.num_rows == 150_000
    ring = np.array([f["geometry"]["coordinates"][0] for f in features])          # (N, 5, 2) float64 from text
    for col, corner, axis in (("x0_px", 0, 0), ("y0_px", 0, 1), ("x1_px", 2, 0), ("y1_px", 2, 1)):
        np.testing.assert_array_equal(ring[:, corner, axis].astype(np.float32), table.column(col).to_numpy(), err_msg=col)
    score = np.array([f["properties"]["measurements"]["score"] for f in features])
    np.testing.assert_array_equal(score.astype(np.float32), table.column("score").to_numpy())
    assert [f["properties"]["classification"]["name"] for f in features] == table.column("label").to_pylist()
    colours = {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
               for f in features}
    assert set(colours) == set(LABELS) and len(set(colours.values())) == 2
    ids = [f["id"] for f in features]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 8 for i in ids[:100])
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temporary file left


def test_same_detections_get_the_same_ids_in_every_export(run: Path) -> None:
    sid = "5eed" * 16
    whole = strict_json(write_geojson(run, sid).read_text())["features"]
    region = query(run, bbox=(1000, 1000, 4000, 4000))
    part = detections_to_geojson(region)["features"]
    assert validate_qupath_geojson({"type": "FeatureCollection", "features": part}) == []
    by_id = {f["id"]: f for f in whole}
    assert len(part) == region.num_rows > 100
    assert all(by_id[f["id"]] == f for f in part)
    other = detections_to_geojson(region.drop_columns(["slide_id"]), slide_id="another slide")["features"]
    assert not {f["id"] for f in other} & set(by_id)   # ids are salted by the slide


def test_feature_ids_are_uuids_that_depend_on_every_field() -> None:
    args = [np.array([v], np.float32) for v in (1, 2, 3, 4, 0.5)]
    base = feature_ids("s", *args, ["nucleus"])
    assert base == feature_ids("s", *args, ["nucleus"])
    for k in range(5):
        changed = [a.copy() for a in args]
        changed[k] += 0.25
        assert feature_ids("s", *changed, ["nucleus"]) != base
    assert feature_ids("s", *args, ["mitosis"]) != base
    assert feature_ids("t", *args, ["nucleus"]) != base


def test_small_table_to_geojson_dict() -> None:
    det = Detections(np.array([10, 20], np.float32), np.array([5, 6], np.float32), np.array([18.5, 30], np.float32),
                     np.array([13, 16], np.float32), np.array([0.25, 1.0], np.float32), np.array([1, 0], np.int16),
                     np.zeros(2, np.int64), np.zeros(2, np.int64))
    from gpupath.results import detections_table

    table = detections_table(det, stride_l0=448.0, label_names=LABELS, provenance={})
    doc = detections_to_geojson(table, slide_id="abc")
    assert validate_qupath_geojson(doc) == []
    rings = sorted(f["geometry"]["coordinates"][0] for f in doc["features"])
    assert rings == [[[10.0, 5.0], [18.5, 5.0], [18.5, 13.0], [10.0, 13.0], [10.0, 5.0]],
                     [[20.0, 6.0], [30.0, 6.0], [30.0, 16.0], [20.0, 16.0], [20.0, 6.0]]]
    assert {f["properties"]["classification"]["name"]: f["properties"]["measurements"]["score"]
            for f in doc["features"]} == {"mitosis": 0.25, "nucleus": 1.0}
    empty = detections_to_geojson(table.slice(0, 0))
    assert empty == {"type": "FeatureCollection", "features": []}


def test_non_finite_coordinates_are_refused() -> None:
    table = pa.table({"x0_px": pa.array([np.nan], pa.float32()), "y0_px": pa.array([0], pa.float32()),
                      "x1_px": pa.array([1], pa.float32()), "y1_px": pa.array([1], pa.float32()),
                      "score": pa.array([0.5], pa.float32()), "label": pa.array(["nucleus"])})
    with pytest.raises(ValueError, match="x0_px: non-finite value nan"):
        detections_to_geojson(table)


def test_old_schema_is_refused_and_nothing_written(run: Path) -> None:
    sid = "5eed" * 16
    part = run / "detections" / f"slide_id={sid}" / "part-0.parquet"
    rewrite_version(part, "0")
    with pytest.raises(ResultsError, match=r"schema version 0, this gpupath .* reads 1\.x; re-run the slide"):
        write_geojson(run, sid)
    assert not (run / "geojson").exists() or list((run / "geojson").iterdir()) == []


def test_schema_1_0_slide_converts(run: Path) -> None:
    sid = "5eed" * 16
    part = run / "detections" / f"slide_id={sid}" / "part-0.parquet"
    rewrite_version(part, "1", drop=(b"gpupath.label_names",))
    doc = strict_json(write_geojson(run, sid).read_text())
    assert validate_qupath_geojson(doc) == [] and len(doc["features"]) == 150_000


def test_real_pipeline_output_converts(tmp_path: Path) -> None:
    slide = tmp_path / "syn.svs"
    write_synthetic_slide(slide, SyntheticSpec(width_px=2048, height_px=2048, mpp=0.25, seed=11))
    res = process_slide(slide, tmp_path / "out", RunParams(engine="classic"))
    assert res.status == "ok", res.error
    doc = strict_json(write_geojson(tmp_path / "out", res.slide_id).read_text())
    assert validate_qupath_geojson(doc) == []
    assert len(doc["features"]) == res.n_detections > 20
    for f in doc["features"]:   # level-0 px inside the slide
        (x0, y0), _, (x1, y1) = f["geometry"]["coordinates"][0][:3]
        assert 0 <= x0 < x1 <= 2048 and 0 <= y0 < y1 <= 2048
