"""`gpupath bench` end to end on a small generated slide, its matcher on known answers, and the scaling
script on tiny slides. Speed is never asserted: only structure, agreement, and timings that are finite
and consistent with each other and with the tiles processed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers_timings import (
    CPU_EPS_S,
    EPS_S,
    LOOP_STAGES,
    PROCESS_CPU_SLACK_S,
    SLACK_S,
    assert_finite_seconds,
    assert_slide_seconds_match_stages,
)

from gpupath.bench import STAGES, match_detections, results_stem
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "small.svs"
    write_synthetic_slide(path, SyntheticSpec(width_px=2048, height_px=2048, mpp=0.5, seed=7))
    return path


def _boxes(cx: np.ndarray, cy: np.ndarray, r: np.ndarray) -> dict[str, np.ndarray]:
    return {"x0_px": cx - r, "y0_px": cy - r, "x1_px": cx + r, "y1_px": cy + r}


def test_match_detections_known_answer() -> None:
    cx, cy, r = np.array([10.0, 50, 90, 130]), np.array([10.0, 10, 10, 10]), np.array([3.0, 3, 3, 3])
    ours = _boxes(cx, cy, r)
    # baseline: first shifted 1.5 px (matched), second 2.5 px (not), third radius 0.5 px larger, fourth missing
    base = _boxes(np.array([11.5, 52.5, 90]), np.array([10.0, 10, 10]), np.array([3.0, 3, 3.5]))
    got = match_detections(ours, base, tol_px=2.0)
    assert (got["ours"], got["baseline"], got["matched"]) == (4, 3, 2)
    assert got["count_diff_pct"] == pytest.approx(100 / 3)
    assert got["box_diff_max_px"] == pytest.approx(1.5)
    assert got["matched_of_ours"] == pytest.approx(0.5)
    empty = match_detections(_boxes(np.zeros(0), np.zeros(0), np.zeros(0)), base)
    assert empty["matched"] == 0 and empty["box_diff_max_px"] == 0.0


def test_match_is_one_to_one_closest_first() -> None:
    ours = _boxes(np.array([0.0, 1.0]), np.zeros(2), np.ones(2))
    base = _boxes(np.array([0.9]), np.zeros(1), np.ones(1))
    got = match_detections(ours, base, tol_px=2.0)
    assert got["matched"] == 1 and got["box_diff_max_px"] == pytest.approx(0.1)


def test_gpupath_bench_cli_end_to_end(small_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, "-m", "gpupath", "bench", str(small_slide), "--device", "cpu",
                           "--out", str(out), "--results-dir", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "speed-up" in proc.stdout and "agreement:" in proc.stdout
    assert "TIAToolbox: not run (" in proc.stdout
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().startswith("# gpupath bench: small.svs")
    assert (tmp_path / "results" / f"{results_stem(result)}.json").is_file()
    assert (tmp_path / "results" / f"{results_stem(result)}.md").is_file()

    m = result["machine"]
    assert m["cpu"] and m["cores"] >= 1 and "gpu" in m and m["date_utc"]
    assert m["versions"]["gpupath"] and m["versions"]["onnxruntime"] and m["versions"]["torchstain"]
    rows = {r["stage"]: r for r in result["rows"]}
    assert set(rows) == {*STAGES, "end_to_end"}
    n_tiles = result["n_tiles"]
    # the tiles both sides processed: the grid's tiles, the very ones ours wrote (agreement["same_tiles"])
    assert n_tiles > 0 and result["ours"]["n_tiles"] == result["baseline"]["n_tiles"] == n_tiles
    for side in ("ours", "baseline"):
        stages = result[side]["stages"]
        assert set(stages) == set(STAGES)
        for stage, v in stages.items():
            assert_finite_seconds(v, f"{side} {stage}")
        end_s = assert_finite_seconds(result[side]["end_to_end_s"], f"{side} end_to_end_s")
        # stage seconds against the side's end-to-end seconds: the baseline times its stages one after the
        # other on one thread; ours runs read, normalise's apply and detect on CPU workers side by side (summed
        # over them) inside its tile loop, whose wall time is one serial stage (see helpers_timings)
        cpu_stages = result[side]["cpu_stages"]
        assert set(cpu_stages) == set(STAGES)
        if side == "baseline":
            assert sum(stages.values()) <= end_s + EPS_S and end_s <= sum(stages.values()) + SLACK_S, (stages, end_s)
            for stage, cpu in cpu_stages.items():  # its ONNX Runtime threads count in the process's CPU seconds;
                # other threads' CPU time is accounted in scheduler steps, so short stages get a few ms of slack
                assert 0 <= assert_finite_seconds(cpu) <= stages[stage] * m["cores"] + PROCESS_CPU_SLACK_S, (stage, cpu)
        else:
            tm, loop = result[side]["raw_timings"], result[side]["tile_loop"]
            serial = stages["setup"] + sum(v for k, v in tm.items() if k not in LOOP_STAGES and not k.endswith("_cpu"))
            assert serial <= end_s + EPS_S and end_s <= serial + SLACK_S, (tm, end_s)
            assert loop["workers"] >= 1 and loop["wall_s"] == tm["tiles"] and loop["cpu_s"] == tm["tiles_cpu"]
            for k in LOOP_STAGES:  # one worker's thread: its CPU seconds never exceed its wall seconds
                assert tm[f"{k}_cpu"] <= tm[k] + CPU_EPS_S and tm[k] <= loop["workers"] * tm["tiles"] + EPS_S, k
            assert cpu_stages["read"] == tm["read_cpu"] and cpu_stages["detect"] == tm["detect_cpu"] + tm["dedup_cpu"]
        assert assert_finite_seconds(result[side]["end_to_end_cpu_s"]) <= end_s * m["cores"] + PROCESS_CPU_SLACK_S
        assert math.isfinite(result[side]["peak_rss_mib"]) and result[side]["peak_rss_mib"] > 0
    mp = n_tiles * result["job"]["grid"]["tile_px"] ** 2 / 1e6
    for stage, row in rows.items():
        o = result["ours"]["end_to_end_s" if stage == "end_to_end" else "stages"]
        b = result["baseline"]["end_to_end_s" if stage == "end_to_end" else "stages"]
        o, b = (o, b) if stage == "end_to_end" else (o[stage], b[stage])
        assert (row["ours_s"], row["baseline_s"]) == (o, b), row
        # the ratios and rates are of these seconds and of the tiles processed, not of other figures
        assert row["speedup"] == pytest.approx(b / o, rel=1e-12), row
        assert row["ours_tiles_per_s"] == pytest.approx(n_tiles / o, rel=1e-12), row
        assert row["baseline_tiles_per_s"] == pytest.approx(n_tiles / b, rel=1e-12), row
        assert row["ours_mp_per_s"] == pytest.approx(mp / o, rel=1e-12), row
        assert row["baseline_mp_per_s"] == pytest.approx(mp / b, rel=1e-12), row
    assert result["ours"]["engine"] == "onnxruntime"
    # the bound: the loop stage with the most CPU seconds, and its share of them
    bound, cpu = result["bound"], {k: result["ours"]["raw_timings"][f"{k}_cpu"] for k in LOOP_STAGES}
    assert bound["stage"] == max(cpu, key=cpu.get) and bound["share"] == pytest.approx(max(cpu.values()) / sum(cpu.values()))
    # the engine alone on the run's own tiles: tiles per wall second of what it timed
    eng = result["ours"]["engine_alone"]
    assert eng["tiles"] == min(128, n_tiles) and eng["tiles_timed"] >= eng["tiles"]
    assert eng["tiles_per_s"] == pytest.approx(eng["tiles_timed"] / eng["wall_s"], rel=1e-12)
    # decode: the 2048-px slide's file tiles under the grid (all fit in the cache's 16 MiB floor), each decoded
    # once by ours and once by raw libjpeg-turbo
    dec = result["ours"]["decode"]
    assert dec["ours"]["file_tiles"] == dec["raw"]["file_tiles"] >= 1, dec
    assert dec["ratio"] == pytest.approx(dec["ours"]["mp_per_s_per_core"] / dec["raw"]["mp_per_s_per_core"])
    assert "decode: ours (cucim" in proc.stdout and "bound by" in proc.stdout.lower()
    rss = result["peak_rss_mib"]
    assert (rss["ours"], rss["baseline"]) == (result["ours"]["peak_rss_mib"], result["baseline"]["peak_rss_mib"])
    assert rss["ratio"] == pytest.approx(rss["ours"] / rss["baseline"], rel=1e-12)

    agree = result["agreement"]
    assert agree["same_tiles"]
    assert agree["baseline"] > 100  # the slide has nuclei; both sides find them
    assert agree["count_diff_pct"] <= 1.0, agree
    assert agree["matched_of_baseline"] >= 0.99 and agree["matched_of_ours"] >= 0.99, agree
    assert agree["box_diff_max_px"] <= 2.0, agree


def test_bench_scaling_script_tiny(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scaling.py"), "--work", str(tmp_path / "w"),
                           "--sizes", "1024", "2048", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [r["size_px"] for r in result["rows"]] == [1024, 2048]
    small, large = result["rows"]
    assert 0 < small["tissue_mm2"] < large["tissue_mm2"] and small["n_tiles"] < large["n_tiles"]
    for r in result["rows"]:
        # the tiles processed: the rows of the tile table the run wrote
        (tiles,) = (tmp_path / "w" / f"run-{r['size_px']}" / "tiles").glob("slide_id=*/part-0.parquet")
        assert pq.read_table(tiles).num_rows == r["n_tiles"], r
        # the slide's seconds match its stages, and lie inside the wall time of the child that ran it
        assert_slide_seconds_match_stages(r["slide_s"], r["timings"])
        assert r["slide_s"] <= assert_finite_seconds(r["wall_s"], "wall_s")
        assert math.isfinite(r["peak_rss_mib"]) and r["peak_rss_mib"] > 0
    fit = result["fit"]
    # two sizes: the least-squares line goes through both points (R² 1)
    for r in result["rows"]:
        assert fit["intercept_s"] + fit["s_per_mm2"] * r["tissue_mm2"] == pytest.approx(r["wall_s"], rel=1e-6, abs=1e-6)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-9)
    assert fit["rss_max_over_min"] == pytest.approx(max(small["peak_rss_mib"], large["peak_rss_mib"])
                                                    / min(small["peak_rss_mib"], large["peak_rss_mib"]), rel=1e-12)
    assert "| slide px |" in out.with_suffix(".md").read_text()


def test_gpupath_bench_missing_slide_fails_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.svs"
    proc = subprocess.run([sys.executable, "-m", "gpupath", "bench", str(missing)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "nope.svs" in proc.stderr
