"""Region / label / score queries over a run's detections: same rows as a full scan, few row groups read,
old and foreign schema versions read or refused, and the `gpupath query` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from gpupath.cli import app
from helpers_query import LABELS, rewrite_version, synthetic_detections, write_slide
from gpupath.detect.boxes import Detections
from gpupath.errors import ResultsError
from gpupath.query import RESULT_SCHEMA, BBox, parse_bbox, plan_query, query
from gpupath.results import (
    SCHEMA_VERSION,
    detections_table,
    write_slide_parts,
)

def load_all(out: Path) -> dict[str, np.ndarray]:
    """Every row of every partition (pyarrow.parquet.read_table, no index): slide (as int), box, score, label."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("slide", "x0_px", "y0_px", "x1_px", "y1_px", "score", "label")}
    for part in sorted((out / "detections").glob("slide_id=*/part-0.parquet")):
        t = pq.read_table(part).unify_dictionaries()
        names = np.asarray(t.column("label").chunk(0).dictionary.to_pylist() if t.num_rows else [], dtype=object)
        cols["slide"].append(np.full(t.num_rows, int(part.parent.name.removeprefix("slide_id="), 16), np.float64))
        for k in ("x0_px", "y0_px", "x1_px", "y1_px", "score"):
            cols[k].append(t.column(k).to_numpy().astype(np.float64))
        codes = np.concatenate([c.indices.to_numpy() for c in t.column("label").chunks]) if t.num_rows else []
        cols["label"].append(names[codes] if len(names) else np.zeros(0, object))
    return {k: np.concatenate(v) for k, v in cols.items()}


def full_scan(out: Path | dict[str, np.ndarray], bbox: BBox | None = None, label: str | None = None,
              min_score: float | None = None, slide: str | None = None) -> np.ndarray:
    """The reference: all rows filtered in NumPy (float64). Returns sorted (slide, x0, y0, x1, y1, score) rows."""
    c = load_all(out) if isinstance(out, Path) else out
    keep = np.ones(len(c["slide"]), bool)
    if bbox is not None:   # half-open boxes intersecting the half-open region
        keep &= (c["x1_px"] > bbox.x0) & (c["x0_px"] < bbox.x1) & (c["y1_px"] > bbox.y0) & (c["y0_px"] < bbox.y1)
    if label is not None:
        keep &= c["label"] == label
    if min_score is not None:
        keep &= c["score"] >= min_score
    if slide is not None:
        keep &= c["slide"] == int(slide, 16)
    return _sorted(np.c_[tuple(c[k][keep] for k in ("slide", "x0_px", "y0_px", "x1_px", "y1_px", "score"))])


def as_rows(table: pa.Table) -> np.ndarray:
    sid = np.array([int(s, 16) for s in table.column("slide_id").to_pylist()], np.float64)
    cols = [table.column(k).to_numpy().astype(np.float64) for k in ("x0_px", "y0_px", "x1_px", "y1_px", "score")]
    return _sorted(np.c_[sid, *cols] if len(sid) else np.zeros((0, 6)))


def _sorted(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def pyarrow_pruned_groups(path: Path, bbox: BBox) -> set[int]:
    """Row groups pyarrow's own statistics pruning keeps for the region (an independent reference)."""
    dataset = ds.dataset(path, format="parquet")
    expr = ((pc.field("x1_px") > bbox.x0) & (pc.field("x0_px") < bbox.x1)
            & (pc.field("y1_px") > bbox.y0) & (pc.field("y0_px") < bbox.y1))
    return {rg.row_groups[0].id for f in dataset.get_fragments(expr) for rg in f.split_by_row_group(expr)}


# ---- 10 million detections --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two slides of 5 million detections each, on 200k x 200k px."""
    out = tmp_path_factory.mktemp("big") / "run"
    for k, sid in enumerate(("aaaa0000", "bbbb1111")):
        write_slide(out, sid, synthetic_detections(5_000_000, np.random.default_rng(k)))
    return out


@pytest.mark.slow
def test_region_query_over_10m_detections_matches_full_scan_and_reads_few_row_groups(big_run: Path) -> None:
    rng = np.random.default_rng(7)
    every = load_all(big_run)   # read once, without the index
    assert len(every["slide"]) == 10_000_000
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, 198_000, 2))
        region = BBox(x0, y0, x0 + 2000, y0 + 2000)
        plan = plan_query(big_run, bbox=region)
        got = as_rows(query(big_run, bbox=region))
        want = full_scan(every, region)
        assert len(want) > 500
        np.testing.assert_array_equal(got, want)
        assert plan.row_groups_total == 2 * -(-5_000_000 // 16384)
        assert plan.row_groups_read / plan.row_groups_total < 0.05, (plan.row_groups_read, plan.row_groups_total)
        assert plan.rows_read < 0.02 * len(every["slide"])
        for f in plan.files:   # what we read is exactly what pyarrow's statistics pruning keeps
            assert set(f.row_groups) == pyarrow_pruned_groups(f.path, region)


@pytest.mark.slow
def test_filters_combined_over_10m_detections_match_full_scan(big_run: Path) -> None:
    region = BBox(120_000, 30_000, 125_000, 33_000)
    got = query(big_run, slide="bbbb", bbox=region, label="mitosis", min_score=0.75)
    assert set(got.column("slide_id").to_pylist()) == {"bbbb1111"}
    np.testing.assert_array_equal(as_rows(got), full_scan(big_run, region, "mitosis", 0.75, slide="bbbb1111"))
    assert len(got) > 100


# ---- small runs ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two slides of 60k detections on 20k x 20k px, in row groups of 1024 rows."""
    out = tmp_path_factory.mktemp("small") / "run"
    for k, sid in enumerate(("0123abcd", "0129ef00")):
        write_slide(out, sid, synthetic_detections(60_000, np.random.default_rng(10 + k), side_px=20_000),
                    row_group_rows=1024)
    return out


def test_query_without_filters_returns_every_row(small_run: Path) -> None:
    table = query(small_run)
    assert table.schema.equals(RESULT_SCHEMA)
    assert table.num_rows == 120_000
    assert table.column("slide_id").unique().to_pylist() == ["0123abcd", "0129ef00"]
    keys = table.filter(pc.field("slide_id") == "0123abcd").column("tile_key").to_numpy()
    assert np.all(np.diff(keys.astype(np.int64)) >= 0)   # file order: spatial


@pytest.mark.parametrize("region", [BBox(0, 0, 300, 300), BBox(5_000.5, 7_000, 9_000, 7_500.25),
                                    BBox(19_900, 0, 20_000, 20_000)])
@pytest.mark.parametrize("label, min_score", [(None, None), ("nucleus", None), (None, 0.9), ("mitosis", 0.3)])
def test_small_queries_match_full_scan(small_run: Path, region: BBox, label: str | None, min_score: float | None) -> None:
    got = query(small_run, bbox=region, label=label, min_score=min_score)
    np.testing.assert_array_equal(as_rows(got), full_scan(small_run, region, label, min_score))
    plan = plan_query(small_run, bbox=region)
    for f in plan.files:
        assert set(f.row_groups) == pyarrow_pruned_groups(f.path, region)


def test_region_edges_are_half_open(tmp_path: Path) -> None:
    f32, i16, i64 = np.float32, np.int16, np.int64
    x0 = np.array([90, 100, 200, 150, 150], f32)   # ends at 100 (out), starts at 100 (in), starts at 200 (out)
    y0 = np.array([150, 150, 150, 90, 200], f32)   # ends at y 100 (out), starts at y 200 (out)
    det = Detections(x0, y0, x0 + 10, y0 + 10, np.full(5, 0.5, f32), np.zeros(5, i16), np.zeros(5, i64), np.zeros(5, i64))
    write_slide(tmp_path, "abc", det)
    got = query(tmp_path, bbox=np.array([100, 100, 200, 200]))   # NumPy numbers are fine
    assert got.column("x0_px").to_pylist() == [100.0]


def test_empty_result_has_the_schema(small_run: Path) -> None:
    table = query(small_run, bbox=BBox(50_000, 50_000, 60_000, 60_000))
    assert table.num_rows == 0 and table.schema.equals(RESULT_SCHEMA)
    plan = plan_query(small_run, bbox=BBox(50_000, 50_000, 60_000, 60_000))
    assert plan.row_groups_read == 0 and plan.row_groups_total > 100


def test_slide_by_unique_prefix(small_run: Path) -> None:
    assert query(small_run, slide="0129").column("slide_id").unique().to_pylist() == ["0129ef00"]
    with pytest.raises(ValueError, match=r"no slide 'ffff' in .*detections \(slides: 0123abcd, 0129ef00\)"):
        query(small_run, slide="ffff")
    with pytest.raises(ValueError, match="'012' is a prefix of 2 slides .*give more of the id"):
        query(small_run, slide="012")


def test_slide_by_the_file_name_or_path_the_run_recorded(small_run: Path) -> None:
    table = small_run / "slides.parquet"  # the module's run folder: removed again below
    try:
        pq.write_table(pa.table({"path": ["/scans/a.svs", "/scans/b.svs", "/other/b.svs"],
                                 "slide_id": ["0123abcd", "0129ef00", "0129ef00"]}), table)
        assert query(small_run, slide="a.svs").column("slide_id").unique().to_pylist() == ["0123abcd"]
        assert query(small_run, slide="/scans/b.svs").column("slide_id").unique().to_pylist() == ["0129ef00"]
        assert query(small_run, slide="b.svs").column("slide_id").unique().to_pylist() == ["0129ef00"]  # one id
        pq.write_table(pa.table({"path": ["/x/c.svs", "/y/c.svs"], "slide_id": ["0123abcd", "0129ef00"]}), table)
        with pytest.raises(ValueError, match=r"'c.svs' names 2 slides .*give the slide id"):
            query(small_run, slide="c.svs")
    finally:
        table.unlink(missing_ok=True)


def test_unknown_label_names_the_classes(small_run: Path) -> None:
    with pytest.raises(ValueError, match=r"label 'tumour' is not a class of these detections \(classes: nucleus, mitosis\)"):
        query(small_run, label="tumour")
    assert query(small_run, label=["nucleus", "mitosis"]).num_rows == 120_000


@pytest.mark.parametrize("text, why", [("1,2,3", "expected X0,Y0,X1,Y1"), ("a,b,c,d", "expected X0,Y0,X1,Y1"),
                                       ("10,0,5,5", "needs x1 > x0"), ("0,0,nan,5", "four finite numbers")])
def test_bad_bbox_text(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_bbox(text)


def test_bad_score_and_bbox_arguments(small_run: Path) -> None:
    with pytest.raises(ValueError, match="min_score must be a finite number"):
        query(small_run, min_score=float("nan"))
    with pytest.raises(ValueError, match="bbox needs four numbers"):
        query(small_run, bbox=(1, 2, 3))


def test_missing_run_folder_and_detections(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="no such run folder"):
        query(tmp_path / "nope")
    with pytest.raises(ResultsError, match=r"no detections/ folder"):
        query(tmp_path)


def test_temporary_files_are_not_read(small_run: Path) -> None:
    part = small_run / "detections" / "slide_id=0123abcd"
    (part / ".part-0.parquet.tmp-123456").write_bytes(b"half a file")
    try:
        assert query(small_run, slide="0123").num_rows == 60_000
    finally:
        (part / ".part-0.parquet.tmp-123456").unlink()


# ---- schema versions ---------------------------------------------------------------------------------

@pytest.fixture
def one_slide(tmp_path: Path) -> Path:
    write_slide(tmp_path, "abcd", synthetic_detections(2000, np.random.default_rng(3), side_px=5000))
    return tmp_path


def test_current_version_is_written_and_read(one_slide: Path) -> None:
    path = one_slide / "detections" / "slide_id=abcd" / "part-0.parquet"
    meta = pq.read_metadata(path).metadata
    assert meta[b"gpupath.schema_version"] == SCHEMA_VERSION.encode() == b"1.1"
    assert json.loads(meta[b"gpupath.label_names"]) == LABELS
    plan = plan_query(one_slide)
    assert [f.schema_version for f in plan.files] == ["1.1"]


def test_schema_1_0_is_read_with_labels_from_the_data(one_slide: Path) -> None:
    path = one_slide / "detections" / "slide_id=abcd" / "part-0.parquet"
    before = query(one_slide)
    rewrite_version(path, "1", drop=(b"gpupath.label_names",))   # as gpupath wrote it before 1.1
    plan = plan_query(one_slide, label="mitosis")
    assert plan.files[0].schema_version == "1" and plan.label_names == LABELS
    assert query(one_slide).equals(before)
    assert query(one_slide, label="mitosis").num_rows == sum(v == "mitosis" for v in before.column("label").to_pylist())


@pytest.mark.parametrize("version, message", [
    ("0.9", r"schema version 0\.9, this gpupath \(.*\) reads 1\.x; "
            r"re-run the slide with this gpupath \(gpupath run --redo\)"),
    ("2.0", r"schema version 2\.0 is newer than this gpupath \(.*\) reads \(1\.x\); upgrade gpupath"),
    ("v1", r"malformed schema version 'v1'; this gpupath reads 1\.x"),
    (None, r"no gpupath\.schema_version in its Parquet metadata: not a gpupath output file"),
])
def test_other_schema_versions_are_refused_naming_the_file(one_slide: Path, version: str | None, message: str) -> None:
    path = one_slide / "detections" / "slide_id=abcd" / "part-0.parquet"
    rewrite_version(path, version)
    with pytest.raises(ResultsError, match=f"^{path}: {message}"):
        query(one_slide)


def test_file_without_a_required_column_is_refused(one_slide: Path) -> None:
    path = one_slide / "detections" / "slide_id=abcd" / "part-0.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["score"]).replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(ResultsError, match=r"schema version 1\.1 detections without column\(s\) score"):
        query(one_slide)


def test_not_a_parquet_file_is_refused(one_slide: Path) -> None:
    path = one_slide / "detections" / "slide_id=abcd" / "part-0.parquet"
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(ResultsError, match=r"part-0\.parquet: not a readable Parquet file"):
        query(one_slide)


# ---- the command -------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_table_and_counts(small_run: Path) -> None:
    res = runner.invoke(app, ["query", str(small_run), "--bbox", "0,0,2000,2000", "--label", "nucleus", "--limit", "3"])
    assert res.exit_code == 0, res.output
    n = query(small_run, bbox=(0, 0, 2000, 2000), label="nucleus").num_rows
    assert f"{n} detections; searched 2 slide(s), read " in res.stdout
    assert "first 3" in res.stdout and res.stdout.count("nucleus") >= 3


def test_cli_csv_to_stdout(small_run: Path) -> None:
    res = runner.invoke(app, ["query", str(small_run), "--bbox", "1000,1000,3000,2000", "--min-score", "0.5",
                              "--format", "csv"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].split(",")[:6] == ['"x0_px"', '"y0_px"', '"x1_px"', '"y1_px"', '"score"', '"label"']
    assert len(lines) - 1 == query(small_run, bbox=(1000, 1000, 3000, 2000), min_score=0.5).num_rows
    assert "row groups" in res.stderr


def test_cli_parquet_and_geojson_files(small_run: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["query", str(small_run), "--slide", "0123", "--bbox", "0,0,5000,5000",
                              "--format", "parquet", "-o", str(tmp_path / "q.parquet")])
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "q.parquet").equals(query(small_run, slide="0123", bbox=(0, 0, 5000, 5000)))
    res = runner.invoke(app, ["query", str(small_run), "--slide", "0123", "--bbox", "0,0,5000,5000",
                              "--format", "geojson", "-o", str(tmp_path / "q.geojson")])
    assert res.exit_code == 0, res.output
    features = json.loads((tmp_path / "q.geojson").read_text())["features"]
    assert len(features) == pq.read_metadata(tmp_path / "q.parquet").num_rows > 0
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("args, message", [
    (["--bbox", "1,2,3"], "error: bbox '1,2,3': expected X0,Y0,X1,Y1"),
    (["--label", "tumour"], "error: label 'tumour' is not a class of these detections"),
    (["--slide", "ffff"], "error: no slide 'ffff'"),
    (["--format", "xlsx"], "error: --format must be table, csv, parquet, geojson"),
    (["--format", "geojson"], "error: --format geojson writes one slide's detections"),
    (["--format", "parquet"], "error: --format parquet needs --output FILE"),
])
def test_cli_bad_arguments_exit_2_with_one_line(small_run: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, ["query", str(small_run), *args])
    assert res.exit_code == 2
    assert res.stderr.startswith(message) and res.stderr.count("\n") == 1, res.stderr


def test_cli_a_limit_beyond_int64_shows_every_row(one_slide: Path) -> None:
    """Issue 18 item 9: --limit 99999999999999999999 was an OverflowError traceback."""
    res = runner.invoke(app, ["query", str(one_slide), "--limit", "99999999999999999999"])
    assert res.exit_code == 0, res.output
    assert "2000 detections" in res.stdout


@pytest.mark.parametrize("where, message", [
    pytest.param("folder", "is a folder; give a file name", id="output-is-a-folder"),
    pytest.param("missing/dir/x.csv", "does not exist", id="output-folder-missing"),
])
def test_cli_bad_output_is_refused_creating_nothing(one_slide: Path, tmp_path: Path, where: str, message: str) -> None:
    """Issue 18 item 9: -o a folder was IsADirectoryError; -o /missing/dir/x.csv created the folders."""
    (tmp_path / "folder").mkdir()
    target = tmp_path / where
    res = runner.invoke(app, ["query", str(one_slide), "--format", "csv", "-o", str(target)])
    assert res.exit_code == 2 and res.stderr.startswith(f"error: --output {target}: ") and message in res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "missing").exists()


def test_cli_a_damaged_data_page_is_one_line(tmp_path: Path) -> None:
    """Issue 18 item 9: a data page damaged after the footer was written ended in an OSError traceback."""
    write_slide(tmp_path, "abcd", synthetic_detections(20_000, np.random.default_rng(3), side_px=5000))
    part = tmp_path / "detections" / "slide_id=abcd" / "part-0.parquet"
    raw = bytearray(part.read_bytes())
    first_page = int(pq.read_metadata(part).row_group(0).column(0).data_page_offset)
    raw[first_page:first_page + 64] = b"\xff" * 64  # the first page's header: footer intact, page unreadable
    part.write_bytes(bytes(raw))
    res = runner.invoke(app, ["query", str(tmp_path), "--format", "csv", "-o", str(tmp_path / "q.csv")])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert not (tmp_path / "q.csv").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli_missing_run_and_old_schema(one_slide: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["query", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such run folder" in res.stderr
    rewrite_version(one_slide / "detections" / "slide_id=abcd" / "part-0.parquet", "0")
    res = runner.invoke(app, ["query", str(one_slide)])
    assert res.exit_code == 2 and "schema version 0, this gpupath" in res.stderr


def test_min_score_compares_in_the_stored_float32(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpupath.detect.boxes import Detections
    from gpupath.query import query

    det = Detections(*(np.array(v, np.float32) for v in ([0, 10], [0, 10], [5, 15], [5, 15], [0.7, 0.69])),
                     np.zeros(2, np.int16), np.zeros(2, np.int64), np.zeros(2, np.int64))
    table = detections_table(det, stride_l0=256.0, label_names=["nucleus"], provenance={})
    empty_tiles = pa.table({"x_px": pa.array([], pa.int64())})
    write_slide_parts(tmp_path, "a" * 64, table, empty_tiles)
    got = query(tmp_path, min_score=0.7)  # the stored float32(0.7) is 0.69999999 in float64
    assert got.num_rows == 1 and pq.read_table(tmp_path / "detections").num_rows == 2
