"""The kernel bench runs end to end (tiny input) and reports every kernel module's cases."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_timings import assert_finite_seconds

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py"


def test_bench_kernels_runs_and_covers_every_module(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--mpx", "0.02", "--repeat", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    names = {row["kernel"].split("_")[0].split(".")[0] for row in rows}
    assert {"macenko", "vahadane", "tissue", "nuclei", "boxes"} <= names
    assert "# skip" not in proc.stderr
    # one row per bench case of every kernel module, each on the input its case makes for 0.02 Mpx
    want = {}
    for module in ("macenko", "vahadane", "tissue", "nuclei", "boxes"):
        for case in importlib.import_module(f"gpupath_kernels.{module}").bench_cases():
            first = np.asarray(case.make_input(np.random.default_rng(0), 20_000)[0])
            want[case.name] = "x".join(map(str, first.shape)) + f" {first.dtype}"
    assert [row["kernel"] for row in rows] == list(want)
    assert all(row["input"] == want[row["kernel"]] and row["pixels"] == 20_000 for row in rows), rows
    # timings present and finite, and the printed rate is the row's pixels over its twin seconds
    printed = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split() and line.split()[0] in want}
    for row in rows:
        twin_s = assert_finite_seconds(row["twin_s"], f"{row['kernel']} twin_s")
        mpx_s = float(printed[row["kernel"]].split(row["input"], 1)[1].split()[0])  # "twin Mpx/s", after the input
        assert mpx_s == pytest.approx(row["pixels"] / twin_s / 1e6, abs=0.05 + 1e-9), printed[row["kernel"]]
        if result["gpu"] is None:
            assert "gpu_s" not in row and "bandwidth_fraction" not in row
        else:
            assert_finite_seconds(row["gpu_s"], f"{row['kernel']} gpu_s")
            assert math.isfinite(row["bandwidth_fraction"])


def test_bench_detect_runs_every_cpu_engine(tmp_path: Path) -> None:
    out = tmp_path / "detect.json"
    bench = BENCH.with_name("bench_detect.py")
    proc = subprocess.run([sys.executable, str(bench), "--tiles", "4", "--batch", "2", "--repeat", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert (result["tiles"], result["batch"]) == (4, 2)
    rows = {r["row"]: r for r in result["rows"]}
    classic_s = assert_finite_seconds(rows["classic cpu"]["seconds"], "classic cpu seconds")
    for cpu_row in ("classic cpu", "onnxruntime cpu", "onnxruntime cpu + DALI cpu", "torch cpu"):
        r = rows[cpu_row]
        assert "skipped" not in r and r["detections"] > 0, r  # the tiles hold nuclei; every CPU engine runs
        seconds = assert_finite_seconds(r["seconds"], f"{cpu_row} seconds")
        # the rate counts the 4 tiles detected in the timed pass, and the ratio is to the classic row's time
        assert r["tiles_per_s"] == pytest.approx(4 / seconds, rel=1e-12), r
        assert r["x_classic_cpu"] == pytest.approx(classic_s / seconds, rel=1e-12), r
    # the same model on two engines finds the same number of nuclei
    assert rows["onnxruntime cpu"]["detections"] == rows["torch cpu"]["detections"]
    assert all("seconds" in r or r["skipped"] for r in rows.values())
