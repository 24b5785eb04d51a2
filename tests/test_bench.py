"""The kernel bench runs end to end (tiny input) and reports every kernel module's cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py"


def test_bench_kernels_runs_and_covers_every_module(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--mpx", "0.02", "--repeat", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    names = {row["kernel"].split("_")[0].split(".")[0] for row in rows}
    assert {"macenko", "vahadane", "tissue", "nuclei", "boxes"} <= names
    assert all(row["twin_s"] > 0 for row in rows)
    assert "# skip" not in proc.stderr


def test_bench_detect_runs_every_cpu_engine(tmp_path: Path) -> None:
    out = tmp_path / "detect.json"
    bench = BENCH.with_name("bench_detect.py")
    proc = subprocess.run([sys.executable, str(bench), "--tiles", "4", "--batch", "2", "--repeat", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    for cpu_row in ("classic cpu", "onnxruntime cpu", "onnxruntime cpu + DALI cpu", "torch cpu"):
        assert rows[cpu_row]["tiles_per_s"] > 0 and rows[cpu_row]["detections"] > 0, rows[cpu_row]
    # the same model on two engines finds the same number of nuclei
    assert rows["onnxruntime cpu"]["detections"] == rows["torch cpu"]["detections"]
    assert all("seconds" in r or r["skipped"] for r in rows.values())
