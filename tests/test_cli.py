"""The CLI as a user runs it (a subprocess): bad inputs give one line, an exit code, no partial files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from conftest import data_file
from helpers_cli import error_lines, gpupath, leftovers
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide


def blank_slide(path: Path) -> Path:
    """A real tiled JPEG TIFF of empty glass with Aperio metadata (mpp known, no tissue)."""
    glass = np.full((1024, 1024, 3), 241, np.uint8)
    desc = "Aperio Image Library v12.0.15 \r\n1024x1024 [0,0 1024x1024] (256x256) JPEG/RGB Q=90|AppMag = 40|MPP = 0.25"
    tifffile.imwrite(path, glass, tile=(256, 256), compression="jpeg", photometric="rgb", description=desc)
    return path


def truncated_copy(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.svs"
    path.write_bytes(data_file("cmu-1-small-region.svs").read_bytes()[:4000])
    return path


def make_bad(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """(slide path, expected text of its error line)."""
    if kind == "missing":
        return tmp_path / "nowhere.svs", "no such file"
    if kind == "empty":
        (tmp_path / "empty.svs").touch()
        return tmp_path / "empty.svs", "file is empty (0 bytes)"
    if kind == "truncated":
        return truncated_copy(tmp_path), "truncated: TIFF directory at byte"
    if kind == "not-a-slide":
        (tmp_path / "notes.svs").write_text("sample 42: re-scan tomorrow\n")
        return tmp_path / "notes.svs", "not a readable slide"
    if kind == "no-tissue":
        return blank_slide(tmp_path / "glass.svs"), "no tissue found"
    if kind == "corrupt-tiles":
        return data_file("unreadable.svs"), "Bogus marker length"
    raise AssertionError(kind)


BAD = ["missing", "empty", "truncated", "not-a-slide", "no-tissue", "corrupt-tiles"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_exit_code_nothing_partial(kind: str, tmp_path: Path) -> None:
    slide, expected = make_bad(kind, tmp_path)
    out = tmp_path / "out"
    proc = gpupath("run", slide, "--out", out, "--device", "cpu")
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and str(slide) in lines[0] and expected in lines[0], proc.stderr
    rows = pq.read_table(out / "slides.parquet").to_pylist()
    assert rows[0]["status"] == "failed" and expected in rows[0]["error"]
    assert not (out / "detections").exists() and not (out / "tiles").exists()
    assert leftovers(out) == []


def test_batch_goes_on_past_bad_slides(tmp_path: Path) -> None:
    good = tmp_path / "good.svs"
    write_synthetic_slide(good, SyntheticSpec(width_px=2048, height_px=2048, mpp=0.25, seed=5))
    bad = [make_bad(kind, tmp_path)[0] for kind in ("empty", "missing", "not-a-slide")]
    out = tmp_path / "out"
    proc = gpupath("run", bad[0], good, *bad[1:], "--out", out, "--device", "cpu")
    assert proc.returncode == 1
    assert len(error_lines(proc)) == 3
    rows = pq.read_table(out / "slides.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["failed", "ok", "failed", "failed"]
    ok = rows[1]
    assert ok["n_detections"] > 0
    det = pq.read_table(out / "detections" / f"slide_id={ok['slide_id']}" / "part-0.parquet")
    assert det.num_rows == ok["n_detections"]
    assert leftovers(out) == []


def test_mpp_override_for_slide_without_usable_mpp(tmp_path: Path) -> None:
    boxes = data_file("boxes.tiff")  # a test pattern whose TIFF says 72 dpi
    proc = gpupath("run", boxes, "--out", tmp_path / "a", "--device", "cpu")
    assert proc.returncode == 1 and "pass --mpp" in error_lines(proc)[0]
    proc = gpupath("run", boxes, "--out", tmp_path / "b", "--device", "cpu", "--mpp", "0.5")
    assert proc.returncode == 0 and error_lines(proc) == [], proc.stderr
    row = pq.read_table(tmp_path / "b" / "slides.parquet").to_pylist()[0]
    assert row["mpp"] == 0.5 and row["status"] == "ok"  # its saturated colour boxes count as "tissue"


@pytest.mark.parametrize("args, expected", [
    (["--overlap", "200"], "overlap_px must be in [0, tile_px/2)"),
    (["--stain", "reinhard"], "stain must be none, macenko or vahadane"),
    (["--target-mpp", "0.5", "--magnification", "20"], "not both"),
    (["--backend", "bioformats"], "backend must be"),
    (["--target-mpp", "0"], "target_mpp must be a positive number"),
    (["--mpp", "inf"], "mpp must be in [0.01, 20.0]"),
    (["--magnification", "-20"], "--magnification must be a positive number"),
    (["--engine", "openvino"], "engine must be one of auto, tensorrt, torch, onnxruntime, classic"),
    (["--engine", "tensorrt"], "tensorrt engine needs --device cuda"),
    (["--model", "mine.onnx"], "needs its card (--model-card"),
    (["--engine", "classic", "--model-card", "card.yaml"], "--engine classic takes no --model/--model-card"),
    (["--model-card", "nowhere.yaml"], "nowhere.yaml: model card not found"),
    (["--preprocess", "opencv"], "preprocess must be auto, dali or xp"),
])
def test_bad_arguments_exit_2(args: list[str], expected: str, tmp_path: Path) -> None:
    slide = data_file("cmu-1-small-region.svs")
    proc = gpupath("run", slide, "--out", tmp_path / "out", "--device", "cpu", *args)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder")
    proc = gpupath("run", data_file("small.svs"), "--out", tmp_path / "taken", "--device", "cpu")
    assert proc.returncode == 2 and "exists and is not a folder" in proc.stderr
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_cuda_without_gpu_is_refused(tmp_path: Path) -> None:
    from gpupath._xp import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    proc = gpupath("run", data_file("small.svs"), "--out", tmp_path / "o", "--device", "cuda")
    assert proc.returncode == 2 and "CUDA device is missing" in proc.stderr


def test_info_reports_backend_and_fallback(tmp_path: Path) -> None:
    proc = gpupath("info", data_file("test3-DAPI.ndpi"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"backend": "openslide"' in proc.stdout and '"vendor": "hamamatsu"' in proc.stdout
    assert "cuCIM has no NDPI reader" in proc.stderr  # the fallback says why
    proc = gpupath("info", tmp_path / "nope.svs")
    assert proc.returncode == 1 and "no such file" in proc.stderr


def test_info_of_several_slides_and_of_one_whose_tiles_do_not_decode() -> None:
    """Several slides: each shown; one whose first tile does not decode (unreadable.svs: "Bogus marker length")
    is one error line and exit 1 (it said ok, exit 0, before), the others still shown."""
    good, bad = data_file("cmu-1-small-region.svs"), data_file("unreadable.svs")
    proc = gpupath("info", good, bad, data_file("small.svs"))
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert str(bad) in line and "Bogus marker length" in line, line
    assert "cmu-1-small-region.svs" in proc.stdout and "small.svs" in proc.stdout
    proc = gpupath("info", good, data_file("small.svs"), "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    listed = json.loads(proc.stdout)
    assert [Path(d["path"]).name for d in listed] == ["cmu-1-small-region.svs", "small.svs"]


def test_demo_writes_slide_and_outputs(tmp_path: Path) -> None:
    proc = gpupath("demo", "--out", tmp_path / "demo", "--size", "2048", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(tmp_path / "demo" / "run" / "slides.parquet").to_pylist()
    assert rows[0]["status"] == "ok" and rows[0]["n_detections"] > 0
    assert "detections:" in proc.stdout
    # second run reuses the slide
    proc = gpupath("demo", "--out", tmp_path / "demo", "--size", "2048", "--device", "cpu")
    assert proc.returncode == 0 and "reusing demo slide" in proc.stdout


def test_run_on_copy_with_odd_name(tmp_path: Path) -> None:
    odd = tmp_path / "slide with spaces & ünïcode.svs"
    shutil.copy(data_file("cmu-1-small-region.svs"), odd)
    proc = gpupath("run", odd, "--out", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr


def test_engines_on_the_cli_record_what_ran(tmp_path: Path) -> None:
    slide = data_file("cmu-1-small-region.svs")
    proc = gpupath("run", slide, "--out", tmp_path / "auto", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "note: engine auto: nuclei_v2 on onnxruntime (cpu, int8)" in proc.stderr
    import json

    from gpupath.detect.card import shipped_card

    card = shipped_card()
    run = json.loads((tmp_path / "auto" / "run.json").read_text())
    det = run["environment"]["detector"]
    # on the CPU the default runs the card's int8 file, and provenance names that file, not the fp32 one
    assert det["model"] == "nuclei_v2" and det["engine"] == "onnxruntime" and det["precision"] == "int8"
    assert det["model_sha256"] == card.extra["int8_sha256"] != card.extra["sha256"]
    proc = gpupath("run", slide, "--out", tmp_path / "fp32", "--device", "cpu", "--precision", "fp32")
    assert proc.returncode == 0 and "(cpu, fp32)" in proc.stderr, proc.stderr
    det32 = json.loads((tmp_path / "fp32" / "run.json").read_text())["environment"]["detector"]
    assert det32["precision"] == "fp32" and det32["model_sha256"] == card.extra["sha256"]
    meta = pq.read_schema(next((tmp_path / "auto" / "detections").rglob("*.parquet"))).metadata
    assert b"nuclei_v2" in b"".join(meta.values())
    proc = gpupath("run", slide, "--out", tmp_path / "classic", "--device", "cpu", "--engine", "classic")
    assert proc.returncode == 0 and "note:" not in proc.stderr, proc.stderr
    # the learned model refuses tiles far from its 0.5 µm/px before any slide: one error line, exit 2
    proc = gpupath("run", slide, "--out", tmp_path / "fine", "--device", "cpu", "--target-mpp", "1.0")
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "expects 0.5 µm/px input" in proc.stderr
    assert not (tmp_path / "fine").exists()


def test_run_writes_reports_geojson_and_index_unless_told_not_to(tmp_path: Path) -> None:
    slide = data_file("cmu-1-small-region.svs")
    proc = gpupath("run", slide, "--out", tmp_path / "with", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    sid = pq.read_table(tmp_path / "with" / "slides.parquet").column("slide_id")[0].as_py()
    for rel in (f"overlays/{sid}.png", f"summaries/{sid}.json", f"reports/{sid}.html", f"geojson/{sid}.geojson",
                "index.html"):
        assert (tmp_path / "with" / rel).stat().st_size > 0, rel
    proc = gpupath("run", slide, "--out", tmp_path / "without", "--device", "cpu", "--no-reports")
    assert proc.returncode == 0, proc.stderr
    assert not any((tmp_path / "without" / d).exists() for d in ("overlays", "reports", "geojson", "index.html"))
