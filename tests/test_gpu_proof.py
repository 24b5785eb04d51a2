"""The on-device proof scripts, dry-run on the CPU so a GPU session does not spend its minutes on bugs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from conftest import DATA_DIR

PROOF = Path(__file__).resolve().parents[1] / "bench" / "gpu_proof"


def _module(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, PROOF / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_proof_dry_run_writes_figures(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(PROOF / "proof.py"), "--dry-run", "--out", str(tmp_path),
                           "--data", str(DATA_DIR)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (result_json,) = tmp_path.glob("*-cpu-dry-run.json")
    result = json.loads(result_json.read_text())
    assert result["dry_run"] and result["gpu"] is None
    assert result["gpu_tests"]["counts"]["failed"] == 0 and result["gpu_tests"]["counts"]["skipped"] > 10
    assert {row["kernel"] for row in result["kernels"]["rows"]} >= {"macenko_apply", "tissue_features"}
    synthetic = [r for r in result["runs"] if r["slide"].startswith("synthetic")]
    assert synthetic and synthetic[0]["status"] == "ok" and synthetic[0]["tiles_per_s"] > 0
    assert (tmp_path / result_json.name.replace(".json", ".md")).read_text().startswith("# On-device proof")
    assert not list(tmp_path.glob("synthetic-*.svs"))  # the generated slide is removed after the run


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
