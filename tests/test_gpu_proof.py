"""The on-device proof scripts, dry-run on the CPU so a GPU session does not spend its minutes on bugs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import DATA_DIR
from helpers_timings import assert_finite_seconds, assert_slide_seconds_match_stages

PROOF = Path(__file__).resolve().parents[1] / "bench" / "gpu_proof"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, PROOF / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_proof_dry_run_writes_figures(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    for steps in ("tests,kernels", "runs,bench"):  # split as the device calls split it
        proc = subprocess.run([sys.executable, str(PROOF / "proof.py"), "--dry-run", "--out", str(out), "--work",
                               str(work), "--data", str(DATA_DIR), "--steps", steps],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    parts = sorted(out.glob("*.json"))  # what the README merges: the results, not the raw files beside them
    assert [p.name.split("dry-run-")[1] for p in parts] == ["runs-bench.json", "tests-kernels.json"]
    assert (out / parts[1].stem / "pytest-gpu.xml").exists() and (out / parts[0].stem / "bench").is_dir()
    merged = _module("proof").merge([*parts, out / parts[1].stem / "bench-kernels.json"], out)  # raw file ignored
    assert merged.name.endswith("-cpu-dry-run.json")
    result = json.loads(merged.read_text())
    assert result["dry_run"] and result["gpu"] is None
    assert result["gpu_tests"]["counts"]["failed"] == 0 and result["gpu_tests"]["counts"]["skipped"] > 10
    paths = {p["path"]: p for p in result["paths"]}
    assert "dask-cuda LocalCUDACluster" in paths and "cuCIM device decode" in paths
    assert not any(p["ran"] for p in paths.values())  # no GPU: no path ran, each says why it was skipped
    assert all("CUDA" in p["skip_reason"] or "GPU" in p["skip_reason"] for p in paths.values())
    assert "other" not in paths  # every gpu test belongs to a named path
    assert {row["kernel"] for row in result["kernels"]["rows"]} >= {"macenko_apply", "tissue_features"}
    synthetic = [r for r in result["runs"] if r["slide"].startswith("synthetic")]
    assert synthetic and synthetic[0]["status"] == "ok"
    assert synthetic[0]["backend"] and synthetic[0]["engine"] == "onnxruntime"
    assert {r["call"] for r in result["runs"]} == {parts[0].stem}
    for run in result["runs"]:
        if run.get("status") != "ok":
            continue
        # the tiles counted are the rows of the tile table the run wrote (its outputs stay in --work)
        (tiles,) = (work / "runs" / f"{Path(run['slide']).stem}-{run['device']}" / "tiles").glob("slide_id=*/*.parquet")
        assert pq.read_table(tiles).num_rows == run["tiles"] > 0, run["slide"]
        # timings: the slide's seconds match its stages and lie inside the command's wall time; the rate is
        # those tiles over those seconds
        assert_slide_seconds_match_stages(run["slide_s"], run["stages"])
        assert run["slide_s"] <= assert_finite_seconds(run["wall_s"], "wall_s")
        assert run["tiles_per_s"] == pytest.approx(run["tiles"] / run["slide_s"], rel=1e-12)
    bench = {r["slide"]: r for r in result["bench"]}
    synth_bench = bench[synthetic[0]["slide"]]
    ours_s = assert_finite_seconds(synth_bench["ours_s"], "ours_s")
    baseline_s = assert_finite_seconds(synth_bench["baseline_s"], "baseline_s")
    assert synth_bench["tiles"] == synthetic[0]["tiles"]  # the bench's grid is the run's
    assert synth_bench["speedup_vs_baseline"] == pytest.approx(baseline_s / ours_s, rel=1e-12)
    assert synth_bench["ours_tiles_per_s"] == pytest.approx(synth_bench["tiles"] / ours_s, rel=1e-12)
    assert synth_bench["baseline_tiles_per_s"] == pytest.approx(synth_bench["tiles"] / baseline_s, rel=1e-12)
    assert synth_bench["matched_of_baseline"] > 0.99
    if (DATA_DIR / "OS-2-ndpi.ome.tif").exists():  # OpenSlide cannot read it: the baseline is not run, and says so
        assert "OpenSlide cannot open it" in bench["OS-2-ndpi.ome.tif"]["not_run"]
    md = merged.with_suffix(".md").read_text()
    assert md.startswith("# On-device proof") and "dask-cuda LocalCUDACluster" in md and "baseline" in md
    assert not list(out.rglob("*.svs")) and not (out / "runs").exists()  # slides and run outputs stay in --work


def test_prepare_packs_loads_under_the_carry_limit(tmp_path: Path) -> None:
    prepare = _module("prepare")
    big = tmp_path / "big.whl"
    big.write_bytes(bytes(range(256)) * 400)          # 102,400 bytes: split into parts
    small = [tmp_path / f"s{i}.whl" for i in range(3)]
    for i, f in enumerate(small):
        f.write_bytes(bytes([i]) * 30_000)
    loads = prepare.pack([big, *small], [], whl=tmp_path / "whl", load_bytes=64_000)
    sizes = [sum((tmp_path / "whl" / f"load-{i}" / n).stat().st_size for n in names)
             for i, names in enumerate(loads, 1)]
    assert max(sizes) <= 64_000
    parts = sorted(n for names in loads for n in names if n.startswith("big.whl.part"))
    joined = b"".join((tmp_path / "whl" / f"load-{i}" / n).read_bytes()
                      for i, names in enumerate(loads, 1) for n in names if n in parts)
    assert parts == ["big.whl.part00", "big.whl.part01"] and joined == big.read_bytes()


def test_prepare_dry_run_names_installed_versions() -> None:
    proc = subprocess.run([sys.executable, str(PROOF / "prepare.py"), "--dry-run"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cucim-cu13==" in proc.stdout and "imagecodecs==" in proc.stdout


def test_gpu_paths_group_tests_by_what_they_prove() -> None:
    paths = _module("proof").gpu_paths([
        {"test": "tests.test_read_tiles::test_device", "status": "passed", "why": ""},
        {"test": "tests.test_slide_jpeg::test_corrupt[cuda]", "status": "skipped", "why": "no GPU"},
        {"test": "tests.kernels.test_tissue_kernels::test_x[cupy]", "status": "failed", "why": ""},
        {"test": "tests.test_batch::test_dask_cuda", "status": "skipped", "why": "dask-cuda not installed"}])
    by = {p["path"]: p for p in paths}
    assert by["cuCIM device decode"] == {"path": "cuCIM device decode", "passed": 1, "failed": 0, "skipped": 1,
                                         "skip_reason": "no GPU", "ran": True}
    assert by["CuPy/Numba kernels (tissue, Macenko, Vahadane, nuclei, boxes)"]["ran"]  # a failure ran too
    assert not by["dask-cuda LocalCUDACluster"]["ran"]
    assert by["dask-cuda LocalCUDACluster"]["skip_reason"] == "dask-cuda not installed"


def test_a_spent_call_budget_runs_nothing_more_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(PROOF / "proof.py"), "--dry-run", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--data", str(DATA_DIR), "--steps", "runs", "--no-real",
                           "--call-budget", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # commands not run count as failures of the call
    (result_json,) = out.glob("*.json")
    result = json.loads(result_json.read_text())
    assert result["synth"]["exit_code"] == 125 and "budget is spent" in result["synth"]["tail"]
    assert [r["slide"] for r in result["runs"]] == ["synthetic-2048x2048.svs"]  # --no-real: no real files
    assert result["runs"][0]["exit_code"] == 125
