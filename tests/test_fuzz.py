"""Fuzz: random cuts and byte flips of the real scans in ../shared/data (seeded, bounded), run and ingested
as a lab would (one command over all of them). Every damaged file either runs (exit 0 for it) or fails
alone with one ``error:`` line naming it; no traceback, no hang (timeout), no partial output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import data_file
from helpers_cli import error_lines, gpupath, leftovers

SOURCES = ["cmu-1-small-region.svs", "small.svs", "OS-2-ndpi.ome.tif", "test3-DAPI.ndpi", "boxes.tiff", "boxes_0.dcm"]
CASES = 48
SEED = 20261207
HANG_S = 240  # the whole batch; each file is small


def _damage(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One random damage: a cut, byte flips (near the header, where the structure is, or anywhere), or a
    zeroed block; and a short description."""
    n = len(data)
    kind = rng.choice(["cut", "flip-head", "flip-any", "zero-block"])
    buf = bytearray(data)
    if kind == "cut":
        keep = int(rng.uniform(0.02, 0.995) * n)
        return bytes(buf[:keep]), f"cut at {keep} of {n} bytes"
    if kind == "zero-block":
        at, size = int(rng.integers(0, n)), int(rng.integers(16, 8192))
        buf[at:at + size] = bytes(min(size, n - at))
        return bytes(buf), f"{size} bytes zeroed at {at}"
    span = min(n, 65536) if kind == "flip-head" else n
    where = rng.integers(0, span, int(rng.integers(1, 9)))
    for at in where.tolist():
        buf[at] ^= int(rng.integers(1, 256))
    return bytes(buf), f"{len(where)} bytes flipped in the first {span}"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    rng = np.random.default_rng(SEED)
    folder = tmp_path_factory.mktemp("fuzz")
    what: dict[str, str] = {}
    for i in range(CASES):
        source = SOURCES[i % len(SOURCES)]
        damaged, how = _damage(data_file(source).read_bytes(), rng)
        path = folder / f"f{i:02d}-{source}"
        path.write_bytes(damaged)
        what[path.name] = f"{source}: {how}"
    return folder, what


def _check_one_line_each(proc: object, failed: set[str], what: dict[str, str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc)
    named = {name for name in what if any(name in line for line in lines)}
    assert named == failed and len(lines) == len(failed), (sorted(named ^ failed), lines)


def test_run_over_damaged_scans(fuzzed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    folder, what = fuzzed
    out = tmp_path / "out"
    proc = gpupath("run", *sorted(folder.iterdir()), "--out", out, "--device", "cpu", "--no-reports", "--workers", "0",
                   timeout=HANG_S)
    rows = {Path(r["path"]).name: r for r in pq.read_table(out / "slides.parquet").to_pylist()}
    assert set(rows) == set(what)
    failed = {name for name, r in rows.items() if r["status"] != "ok"}
    assert proc.returncode == (1 if failed else 0), proc.stderr[-2000:]
    _check_one_line_each(proc, failed, what)
    for name, r in rows.items():  # a failed slide wrote nothing; a finished one wrote both partitions
        parts = [out / kind / f"slide_id={r['slide_id']}" / "part-0.parquet" for kind in ("detections", "tiles")]
        assert all(p.is_file() for p in parts) == (r["status"] == "ok") or not r["slide_id"], (name, what[name])
    assert leftovers(out) == []


def test_ingest_of_damaged_scans(fuzzed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    folder, what = fuzzed
    store = tmp_path / "store"
    singles = [p for p in sorted(folder.iterdir()) if p.suffix != ".dcm"]  # a lone .dcm is stored with a warning
    proc = gpupath("ingest", *singles, "--store", store, timeout=HANG_S)
    rejected = {line.split(": ", 2)[1].rsplit("/", 1)[-1] for line in error_lines(proc)}
    assert proc.returncode == (1 if rejected else 0), proc.stderr[-2000:]
    _check_one_line_each(proc, rejected, {p.name: what[p.name] for p in singles})
    assert not (store / ".incoming").exists() or not any((store / ".incoming").iterdir())
    shutil.rmtree(store)
