"""Hostile and damaged inputs (issue 18): no hang, no traceback, one line naming the file, the batch goes on.

Each test builds its damaged file from a real scan in ../shared/data, runs the CLI as a user would (a
subprocess, with a timeout so a hang fails the test), and checks the exit code, the one ``error:``
line and that nothing half-written is left.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import data_file
from helpers_cli import error_lines, gpupath, leftovers, without_privileges

HANG_S = 60  # a command that has not answered by then hangs


def _first_ifd(data: bytes) -> tuple[str, int, int, int]:
    """(byte order, offset of IFD 0, entry count, offset of its next-IFD field) of a classic TIFF."""
    order = "<" if data[:2] == b"II" else ">"
    assert struct.unpack(order + "H", data[2:4])[0] == 42, "a classic (not Big) TIFF"
    ifd0 = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[ifd0:ifd0 + 2])[0]
    return order, ifd0, count, ifd0 + 2 + 12 * count


def looped_copy(tmp_path: Path) -> Path:
    """The real CMU-1 crop with its first directory's next-IFD offset pointing at itself."""
    data = bytearray(data_file("cmu-1-small-region.svs").read_bytes())
    order, ifd0, _, next_at = _first_ifd(data)
    data[next_at:next_at + 4] = struct.pack(order + "I", ifd0)
    path = tmp_path / "looped.svs"
    path.write_bytes(bytes(data))
    return path


def test_ifd_loop_is_refused_by_ingest_run_and_info_without_hanging(tmp_path: Path) -> None:
    looped = looped_copy(tmp_path)
    store = tmp_path / "store"
    proc = gpupath("ingest", looped, "--store", store, timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert str(looped) in line and "loops back" in line, proc.stderr
    # the store's lock was released: the next ingest into it works
    assert gpupath("ingest", data_file("small.svs"), "--store", store, timeout=HANG_S).returncode == 0
    out = tmp_path / "out"
    proc = gpupath("run", looped, data_file("cmu-1-small-region.svs"), "--out", out, "--device", "cpu",
                   "--no-reports", timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert str(looped) in line and "loops back" in line
    rows = {Path(r["path"]).name: r for r in pq.read_table(out / "slides.parquet").to_pylist()}
    assert rows["looped.svs"]["status"] == "failed" and rows["cmu-1-small-region.svs"]["status"] == "ok"
    proc = gpupath("info", looped, timeout=HANG_S)
    assert proc.returncode == 1 and len(error_lines(proc)) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("cut", ["90-percent", "next-ifd-past-end"])
def test_truncated_slide_fails_run_as_ingest_refuses_it(tmp_path: Path, cut: str) -> None:
    whole = data_file("cmu-1-small-region.svs").read_bytes()
    if cut == "90-percent":
        data = whole[:int(len(whole) * 0.9)]
    else:
        data = bytearray(whole)
        order, _, _, next_at = _first_ifd(data)
        data[next_at:next_at + 4] = struct.pack(order + "I", len(whole) + 4096)
    path = tmp_path / f"{cut}.svs"
    path.write_bytes(bytes(data))
    ingest = gpupath("ingest", path, "--store", tmp_path / "store", timeout=HANG_S)
    assert ingest.returncode == 1 and "truncated" in error_lines(ingest)[0]
    out = tmp_path / "out"
    proc = gpupath("run", path, "--out", out, "--device", "cpu", "--no-reports", timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert str(path) in line and "truncated" in line, proc.stderr
    assert not (out / "detections").exists() and leftovers(out) == []


def test_symlink_loop_and_unreadable_file_fail_alone(tmp_path: Path) -> None:
    """A symlink loop and a file the user may not read: one error line each, the good slide runs, exit 1."""
    loop_a, loop_b = tmp_path / "loop-a.svs", tmp_path / "loop-b.svs"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    locked = tmp_path / "locked.svs"
    shutil.copy(data_file("small.svs"), locked)
    locked.chmod(0)
    good = tmp_path / "good.svs"
    shutil.copy(data_file("cmu-1-small-region.svs"), good)
    out = tmp_path / "out"
    prefix = without_privileges()
    if prefix is None:
        pytest.skip("running as root without setpriv: no file is unreadable to this process")
    proc = gpupath("run", loop_a, locked, good, "--out", out, "--device", "cpu", "--no-reports", "--workers", "0",
                   timeout=HANG_S, prefix=prefix)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Usage:" not in proc.stderr, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 2, proc.stderr
    assert any(str(loop_a) in ln and "symlink loop" in ln for ln in lines), lines
    assert any(str(locked) in ln and "permission denied" in ln.lower() for ln in lines), lines
    rows = {Path(r["path"]).name: r["status"] for r in pq.read_table(out / "slides.parquet").to_pylist()}
    assert rows == {"loop-a.svs": "failed", "locked.svs": "failed", "good.svs": "ok"}


def test_unreadable_source_is_one_ingest_failure(tmp_path: Path) -> None:
    """ingest and info: a file the user may not read is one error line (exit 1), not a usage error; the
    other source is stored."""
    prefix = without_privileges()
    if prefix is None:
        pytest.skip("running as root without setpriv: no file is unreadable to this process")
    locked = tmp_path / "locked.svs"
    shutil.copy(data_file("small.svs"), locked)
    locked.chmod(0)
    proc = gpupath("ingest", locked, data_file("cmu-1-small-region.svs"), "--store", tmp_path / "store",
                   timeout=HANG_S, prefix=prefix)
    assert proc.returncode == 1 and "Usage:" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc)
    assert str(locked) in line and "permission denied" in line.lower(), line
    assert "1 stored" in proc.stdout, proc.stdout
    proc = gpupath("info", locked, timeout=HANG_S, prefix=prefix)
    assert proc.returncode == 1 and len(error_lines(proc)) == 1 and "permission denied" in proc.stderr.lower()


def test_a_newline_in_a_file_name_prints_on_one_line(tmp_path: Path) -> None:
    """A name with a newline must not forge a second output line: every name is printed escaped."""
    name = "a\nerror: fake.svs: injected line.svs"
    evil = tmp_path / name
    shutil.copy(data_file("cmu-1-small-region.svs"), evil)
    proc = gpupath("run", evil, "--out", tmp_path / "out", "--device", "cpu", "--no-reports", timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr
    assert not any(line.startswith("error: fake.svs") for line in proc.stderr.splitlines()), proc.stderr
    assert error_lines(proc) == [] and "injected line.svs" in proc.stdout + proc.stderr
    assert "a\\nerror: fake.svs" in proc.stdout + proc.stderr  # shown, escaped onto its line


def _patched_tag(tmp_path: Path, tag: int, value: int, name: str) -> Path:
    """The CMU-1 crop with one SHORT/LONG tag of IFD 0 set to ``value``."""
    data = bytearray(data_file("cmu-1-small-region.svs").read_bytes())
    order, ifd0, count, _ = _first_ifd(data)
    for i in range(count):
        at = ifd0 + 2 + 12 * i
        code, kind = struct.unpack(order + "HH", data[at:at + 4])
        if code == tag:
            value_bytes = struct.pack(order + "HH", value, 0) if kind == 3 else struct.pack(order + "I", value)
            data[at + 8:at + 12] = value_bytes
            break
    else:
        raise AssertionError(f"tag {tag} not in IFD 0")
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("command", ["info", "run", "ingest"])
def test_zero_width_image_is_one_line(tmp_path: Path, command: str) -> None:
    path = _patched_tag(tmp_path, 256, 0, "zero-width.svs")  # ImageWidth 0
    extra = {"run": ["--out", tmp_path / "out", "--device", "cpu"], "ingest": ["--store", tmp_path / "store"],
             "info": []}[command]
    proc = gpupath(command, path, *extra, timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert str(path) in line and "width" in line.lower() and "division" not in line, line
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", ["zero-size-page", "no-directory"])
def test_empty_bigtiff_is_one_line(tmp_path: Path, kind: str) -> None:
    """An empty BigTIFF: one 0 x 0 page (as tifffile writes an empty array; it was a ZeroDivisionError
    traceback in info) or a header pointing at no directory."""
    import tifffile

    path = tmp_path / "empty-big.tif"
    if kind == "zero-size-page":
        with pytest.warns(UserWarning):  # tifffile says the array is empty, and writes it
            tifffile.imwrite(path, np.zeros((0, 0, 3), np.uint8), bigtiff=True)
    else:
        path.write_bytes(b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", 0))  # BigTIFF header, no directory
    for command, extra in (("info", []), ("run", ["--out", tmp_path / "out", "--device", "cpu"])):
        proc = gpupath(command, path, *extra, timeout=HANG_S)
        assert proc.returncode == 1 and len(error_lines(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "division" not in proc.stderr


def test_implausible_mpp_in_the_file_is_refused(tmp_path: Path) -> None:
    src = data_file("cmu-1-small-region.svs").read_bytes()
    path = tmp_path / "tiny-mpp.svs"
    path.write_bytes(src.replace(b"MPP = 0.4990", b"MPP = 1e-9  "))
    assert b"MPP = 1e-9" in path.read_bytes()
    proc = gpupath("run", path, "--out", tmp_path / "out", "--device", "cpu", timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert "µm/px" in line and "too big" not in line and "--mpp" in line, line


@pytest.mark.parametrize("args, expected", [(["--mpp", "1e-12"], "mpp must be in"),
                                            (["--tile", "100000"], "tile_px must be")])
def test_implausible_arguments_are_bad_arguments(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = gpupath("run", data_file("cmu-1-small-region.svs"), "--out", tmp_path / "out", "--device", "cpu", *args,
                   timeout=HANG_S)
    assert proc.returncode == 2 and expected in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr


@pytest.fixture()
def two_stored(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    proc = gpupath("ingest", data_file("cmu-1-small-region.svs"), data_file("OS-2-ndpi.ome.tif"), "--store", store,
                   timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr
    return store


def test_run_store_refuses_a_slide_changed_since_ingest(two_stored: Path, tmp_path: Path) -> None:
    (stored,) = (two_stored / "slides").glob("*/cmu-1-small-region.svs")
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit pattern inside the pixel data: decodes without complaint
    stored.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = gpupath("run", "--store", two_stored, "--out", out, "--device", "cpu", "--no-reports", timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert str(stored) in line and "changed since ingest" in line, line
    rows = {Path(r["path"]).name: r["status"] for r in pq.read_table(out / "slides.parquet").to_pylist()}
    assert rows == {"cmu-1-small-region.svs": "failed", "OS-2-ndpi.ome.tif": "ok"}


@pytest.mark.parametrize("rewritten", ["/etc/passwd", "../../outside.svs", "slides/../../outside.svs"])
def test_run_store_does_not_read_a_manifest_row_outside_the_store(two_stored: Path, tmp_path: Path,
                                                                 rewritten: str) -> None:
    import pyarrow as pa

    manifest = two_stored / "manifest.parquet"
    table = pq.read_table(manifest)
    paths = table.column("stored_path").to_pylist()
    i = next(k for k, p in enumerate(paths) if p.endswith("cmu-1-small-region.svs"))
    paths[i] = rewritten
    table = table.set_column(table.schema.get_field_index("stored_path"), table.schema.field("stored_path"),
                             pa.array(paths, table.schema.field("stored_path").type))
    pq.write_table(table, manifest)
    (tmp_path / "outside.svs").write_bytes(data_file("small.svs").read_bytes())
    out = tmp_path / "out"
    proc = gpupath("run", "--store", two_stored, "--out", out, "--device", "cpu", "--no-reports", timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc)
    assert "points outside the store" in line and repr(rewritten) in line, line
    rows = [Path(r["path"]).name for r in pq.read_table(out / "slides.parquet").to_pylist()]
    assert rows == ["OS-2-ndpi.ome.tif"]  # the rewritten row was not read at all


@pytest.mark.parametrize("size", ["16k", "64k"], ids=["record-too", "partitions-only"])
def test_a_full_disk_is_one_line_and_nothing_half_written(tmp_path: Path, size: str) -> None:
    """A run into a tiny real filesystem (tmpfs): the slide's partitions (and, smaller still, the run record)
    do not fit. Each failure is one line naming the file and saying the disk is full; no traceback; no
    temporary file left; whatever was written reads whole."""
    import subprocess

    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        out = folder / "out"
        proc = gpupath("run", data_file("cmu-1-small-region.svs"), "--out", out, "--device", "cpu", "--no-reports",
                       timeout=HANG_S)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
        lines = error_lines(proc)
        assert lines and all(str(out) in ln and "the disk is full" in ln for ln in lines), lines
        assert leftovers(out) == []
        if (out / "slides.parquet").exists():
            assert pq.read_table(out / "slides.parquet").num_rows in (0, 1)
        assert not list((out / "detections").rglob("*.parquet")) if (out / "detections").exists() else True
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_identical_bytes_under_two_names_are_said_so(tmp_path: Path) -> None:
    """Two names, one file's bytes, in a fresh folder: processed once; the second is not "resumed from an
    earlier run" without a word but says whose outputs it shares."""
    first, second = tmp_path / "first.svs", tmp_path / "second.svs"
    shutil.copy(data_file("cmu-1-small-region.svs"), first)
    shutil.copy(first, second)
    out = tmp_path / "out"
    proc = gpupath("run", first, second, "--out", out, "--device", "cpu", "--no-reports", "--workers", "0",
                   timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert any(str(second) in ln and f"same bytes as {first}" in ln for ln in warnings), proc.stderr
    rows = {Path(r["path"]).name: r for r in pq.read_table(out / "slides.parquet").to_pylist()}
    assert rows["first.svs"]["slide_id"] == rows["second.svs"]["slide_id"]
    assert rows["second.svs"]["n_detections"] == rows["first.svs"]["n_detections"] > 0


def test_fifo_device_and_broken_link_are_named_not_empty_or_skipped(tmp_path: Path) -> None:
    """A FIFO and /dev/zero were "file is empty (0 bytes)"; a broken link in a folder was skipped without a
    word. Each is now one error line saying what it is; the good slide of the folder runs."""
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(data_file("cmu-1-small-region.svs"), folder / "good.svs")
    os.mkfifo(folder / "pipe.svs")
    (folder / "gone.svs").symlink_to(tmp_path / "deleted.svs")
    out = tmp_path / "out"
    proc = gpupath("run", folder, "/dev/zero", "--out", out, "--device", "cpu", "--no-reports", "--workers", "0",
                   timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 3, proc.stderr
    assert any("pipe.svs" in ln and "a FIFO, not a slide file" in ln for ln in lines), lines
    assert any("/dev/zero" in ln and "a device, not a slide file" in ln for ln in lines), lines
    assert any("gone.svs" in ln and "broken symbolic link" in ln for ln in lines), lines
    rows = {Path(r["path"]).name: r["status"] for r in pq.read_table(out / "slides.parquet").to_pylist()}
    assert rows["good.svs"] == "ok"
