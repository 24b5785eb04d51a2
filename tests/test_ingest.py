"""Ingest: verified copies of real slides into a content-addressed store, and what is refused.

Hashes are checked against hashlib over the whole file (an independent reference), files against
their sources byte for byte, and the tree around the store is listed before and after, so nothing
written outside it goes unnoticed.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from conftest import data_file
from gpupath.errors import ConfigError
from gpupath.ingest import MANIFEST_SCHEMA, IngestResult, ingest, read_checksums, read_manifest, sha256_file
from gpupath.slide import open_slide
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide


def hexdigest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path, *, skip: Path | None = None) -> list[str]:
    """Every path under ``root`` (relative), except under ``skip``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if skip is None or not p.is_relative_to(skip))


def stored_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "slides").rglob("*") if p.is_file()) if (store / "slides").exists() else []


def incoming(store: Path) -> list[Path]:
    return list((store / ".incoming").iterdir()) if (store / ".incoming").exists() else []


def copy_in(src: Path, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / (name or src.name)
    dst.write_bytes(src.read_bytes())
    return dst


def one(results: list[IngestResult]) -> IngestResult:
    assert len(results) == 1
    return results[0]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


# ------------------------------------------------------------------------------------------ good copies
def test_good_copy_verified_by_checksums_file(tmp_path: Path, store: Path) -> None:
    src = copy_in(data_file("cmu-1-small-region.svs"), tmp_path / "in")
    want = hexdigest(src)
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{hexdigest(data_file('small.svs'))}  small.svs\n{want}  {src.name}\n")
    start = dt.datetime.now(dt.UTC)

    res = one(ingest([src], store, checksums=sums))

    assert (res.status, res.sha256, res.reason) == ("stored", want, None)
    stored = Path(res.stored_path)
    assert stored == (store / "slides" / want / src.name).absolute()
    assert stored.read_bytes() == src.read_bytes()
    assert sha256_file(stored) == want  # the store id is the slide_id a run over the stored copy gets
    assert not stored.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert stored_files(store) == [stored] and incoming(store) == []
    rows = read_manifest(store).to_pylist()
    assert len(rows) == 1
    row = rows[0]
    assert row["sha256"] == want and row["original_path"] == str(src.absolute())
    assert row["stored_path"] == f"slides/{want}/{src.name}"
    assert (row["size_bytes"], row["n_files"]) == (src.stat().st_size, 1)
    assert (row["vendor"], row["width_px"], row["height_px"], row["level_count"]) == ("aperio", 2220, 2967, 1)
    assert row["mpp"] == pytest.approx(0.499)
    assert row["verified_by"] == str(sums)
    assert start <= row["ingested_at"] <= dt.datetime.now(dt.UTC)
    assert row["files"] == [{"path": src.name, "sha256": want, "size_bytes": src.stat().st_size}]


def test_facts_of_a_multi_level_ndpi(store: Path) -> None:
    src = data_file("test3-DAPI.ndpi")
    res = one(ingest([src], store))
    assert res.status == "stored" and res.warning is None
    row = read_manifest(store).to_pylist()[0]
    with open_slide(src) as slide:
        assert (row["width_px"], row["height_px"]) == slide.dimensions == (3968, 4864)
        assert row["level_count"] == slide.level_count == 7
        assert row["mpp"] == pytest.approx(slide.mpp) and row["mpp"] == pytest.approx(0.228, abs=1e-3)
    assert row["vendor"] == "hamamatsu" and row["verified_by"] is None


def test_sidecar_verifies(tmp_path: Path, store: Path) -> None:
    src = copy_in(data_file("small.svs"), tmp_path / "in")
    sidecar = Path(f"{src}.sha256")
    sidecar.write_text(f"{hexdigest(src).upper()}  small.svs\n")
    res = one(ingest([src], store))
    assert res.status == "stored", res.reason
    assert read_manifest(store)["verified_by"].to_pylist() == [str(sidecar)]


def test_slide_without_mpp_is_stored_with_a_warning(tmp_path: Path, store: Path) -> None:
    src = tmp_path / "plain.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(src, rng.integers(0, 255, (512, 512, 3), np.uint8), tile=(256, 256), photometric="rgb")
    res = one(ingest([src], store))
    assert res.status == "stored", res.reason
    assert "no mpp" in res.warning
    row = read_manifest(store).to_pylist()[0]
    assert row["mpp"] is None and (row["width_px"], row["height_px"]) == (512, 512)


def test_a_folder_of_other_files_is_not_one_dicom_series(tmp_path: Path, store: Path) -> None:
    # a scanner folder with one .dcm among slides and notes: not to be stored as one "series"
    mixed = tmp_path / "mixed"
    for name in ("boxes_0.dcm", "small.svs", "README.md"):
        copy_in(data_file(name), mixed)
    res = one(ingest([mixed], store))
    assert res.status == "rejected"
    assert res.reason.startswith("not one DICOM series: it also holds mixed/README.md, mixed/small.svs")
    assert stored_files(store) == [] and incoming(store) == []
    series = tmp_path / "export"  # a DICOM export: .dcm files, a DICOMDIR and files without a suffix
    copy_in(data_file("boxes_0.dcm"), series)
    copy_in(data_file("boxes_1.dcm"), series, "DICOMDIR")
    assert one(ingest([series], store)).status == "stored"


def test_dicom_series_folder_is_kept_whole(tmp_path: Path, store: Path) -> None:
    series = tmp_path / "series"
    parts = [copy_in(data_file(name), series) for name in ("boxes_0.dcm", "boxes_1.dcm")]
    res = one(ingest([series], store))
    assert res.status == "stored", res.reason
    assert res.sha256 == hexdigest(parts[0])  # the first .dcm: the file a run opens
    folder = store / "slides" / res.sha256 / "series"
    assert sorted(p.name for p in folder.iterdir()) == ["boxes_0.dcm", "boxes_1.dcm"]
    for part in parts:
        assert (folder / part.name).read_bytes() == part.read_bytes()
    row = read_manifest(store).to_pylist()[0]
    assert row["stored_path"] == f"slides/{res.sha256}/series/boxes_0.dcm" and row["n_files"] == 2
    assert row["size_bytes"] == sum(p.stat().st_size for p in parts) and row["vendor"] == "dicom"
    assert [f["sha256"] for f in row["files"]] == [hexdigest(p) for p in parts]
    with open_slide(res.stored_path) as slide:
        assert slide.dimensions == (16, 16)


def test_companion_file_of_a_series_is_verified_too(tmp_path: Path, store: Path) -> None:
    series = tmp_path / "series"
    parts = [copy_in(data_file(name), series) for name in ("boxes_0.dcm", "boxes_1.dcm")]
    sums = tmp_path / "SUMS"
    sums.write_text(f"{hexdigest(parts[0])}  series/boxes_0.dcm\n{hexdigest(parts[0])}  series/boxes_1.dcm\n")
    res = one(ingest([series], store, checksums=sums))
    assert res.status == "rejected"
    assert res.reason.startswith(f"sha256 mismatch for series/boxes_1.dcm: expected {hexdigest(parts[0])}, "
                                 f"got {hexdigest(parts[1])}")
    assert stored_files(store) == [] and incoming(store) == []


def test_single_dcm_of_a_series_warns(tmp_path: Path, store: Path) -> None:
    series = tmp_path / "series"
    first, _ = (copy_in(data_file(name), series) for name in ("boxes_0.dcm", "boxes_1.dcm"))
    res = one(ingest([first], store))
    assert res.status == "stored"
    assert "1 other .dcm file(s) beside it were not copied" in res.warning and str(series) in res.warning


# ------------------------------------------------------------------------------------------ refusals
def test_mismatch_against_checksums_file(tmp_path: Path, store: Path) -> None:
    src = copy_in(data_file("small.svs"), tmp_path / "in")
    wrong = hexdigest(data_file("cmu-1-small-region.svs"))
    sums = tmp_path / "SUMS"
    sums.write_text(f"{wrong} *small.svs\n")  # binary-mode line
    res = one(ingest([src], store, checksums=sums))
    assert res.status == "rejected" and res.stored_path is None
    assert res.reason.startswith(f"sha256 mismatch: expected {wrong}, got {hexdigest(src)}")
    assert stored_files(store) == [] and incoming(store) == [] and read_manifest(store).num_rows == 0


def test_mismatch_against_sidecar(tmp_path: Path, store: Path) -> None:
    src = copy_in(data_file("small.svs"), tmp_path / "in")
    wrong = "0" * 64
    Path(f"{src}.sha256").write_text(wrong + "\n")
    res = one(ingest([src], store))
    assert res.status == "rejected"
    assert f"sha256 mismatch: expected {wrong}, got {hexdigest(src)}" in res.reason
    assert stored_files(store) == [] and incoming(store) == []


def test_not_listed_in_checksums_is_refused(tmp_path: Path, store: Path) -> None:
    src = copy_in(data_file("small.svs"), tmp_path / "in")
    sums = tmp_path / "SUMS"
    sums.write_text(f"{hexdigest(src)}  other.svs\n")
    res = one(ingest([src], store, checksums=sums))
    assert res.status == "rejected" and res.reason.startswith(f"not listed in {sums}")
    assert stored_files(store) == []


@pytest.mark.parametrize("keep", ["head", "pyramid", "most"])
def test_truncated_source_is_refused(tmp_path: Path, store: Path, keep: str) -> None:
    if keep in ("head", "pyramid"):  # the first few KB of a real scanner file: directories cut off; or the
        whole = data_file("cmu-1-small-region.svs").read_bytes()  # level intact, thumbnail/label/macro cut off:
        cut, expect = whole[:4096 if keep == "head" else 1_500_000], "truncated: TIFF directory"  # readers open it
    else:  # all directories present, the last tile's bytes missing
        write_synthetic_slide(tmp_path / "whole.svs", SyntheticSpec(width_px=1024, height_px=1024))
        whole = (tmp_path / "whole.svs").read_bytes()
        cut, expect = whole[:-1000], "truncated: pixel data runs to byte"
    src = tmp_path / "in" / "cut.svs"
    src.parent.mkdir()
    src.write_bytes(cut)
    res = one(ingest([src], store))
    assert res.status == "rejected" and expect in res.reason, res.reason
    assert stored_files(store) == [] and incoming(store) == []


def test_truncated_source_with_checksum_is_a_mismatch(tmp_path: Path, store: Path) -> None:
    whole = data_file("cmu-1-small-region.svs")
    src = tmp_path / whole.name
    src.write_bytes(whole.read_bytes()[:4096])
    Path(f"{src}.sha256").write_text(f"{hexdigest(whole)}  {whole.name}\n")
    res = one(ingest([src], store))
    assert res.reason.startswith(f"sha256 mismatch: expected {hexdigest(whole)}, got {hexdigest(src)}")


def test_unreadable_and_unopenable_slides_are_refused(tmp_path: Path, store: Path) -> None:
    sources = [data_file("unreadable.svs"), data_file("broken.svs"), data_file("small.svs")]
    results = ingest(sources, store)
    assert [r.status for r in results] == ["rejected", "rejected", "stored"]  # the batch goes on
    assert "Bogus marker length" in results[0].reason and "not a readable slide" in results[1].reason
    assert str(store) not in results[0].reason  # reasons name the source, not the staging copy
    assert len(stored_files(store)) == 1 and read_manifest(store).num_rows == 1


def test_missing_empty_and_folders_are_refused_one_line_each(tmp_path: Path, store: Path) -> None:
    (tmp_path / "empty.svs").touch()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    (tmp_path / "scan.mrxs").write_text("[GENERAL]\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other.mrxs").write_text("[GENERAL]\n")
    sources = [tmp_path / "nowhere.svs", tmp_path / "empty.svs", tmp_path / "notes", tmp_path / "scan.mrxs",
               tmp_path / "other"]
    results = ingest(sources, store)
    reasons = [r.reason for r in results]
    assert [r.status for r in results] == ["rejected"] * 5
    assert reasons[0] == "no such file or folder"
    assert reasons[1] == "file is empty (0 bytes)"
    assert reasons[2].startswith("folder without .dcm files")
    assert reasons[3] == "MIRAX companion folder scan/ missing beside it"
    assert reasons[4].startswith("companion folder of other.mrxs")
    assert all("\n" not in r for r in reasons)
    assert stored_files(store) == [] and incoming(store) == []


def test_duplicates_in_one_batch_and_across_calls(tmp_path: Path, store: Path) -> None:
    first = copy_in(data_file("small.svs"), tmp_path / "a")
    renamed = copy_in(data_file("small.svs"), tmp_path / "b", "renamed.svs")
    results = ingest([first, first, renamed], store)
    assert [r.status for r in results] == ["stored", "already", "already"]  # nothing wrong, nothing copied
    for r in results[1:]:
        assert r.reason.startswith(f"already in the store: same bytes as {first.absolute()}")
        assert r.sha256 == hexdigest(first) and r.stored_path == results[0].stored_path
    again = one(ingest([renamed], store))  # a later call into the same store: a nightly re-ingest
    assert again.status == "already" and again.reason.startswith(f"already in the store: same bytes as {first.absolute()}")
    assert read_manifest(store).num_rows == 1 and len(stored_files(store)) == 1 and incoming(store) == []


# ------------------------------------------------------------------------------------------ escapes
def test_checksums_names_that_escape_are_never_used(tmp_path: Path, store: Path) -> None:
    src = copy_in(data_file("small.svs"), tmp_path / "in", "evil.svs")
    sums = tmp_path / "in" / "SUMS"
    sums.write_text(f"{hexdigest(src)}  ../../evil.svs\n{hexdigest(src)}  /etc/evil.svs\n"
                    f"{hexdigest(src)}  ..\\evil.svs\n")
    entries, problems = read_checksums(sums)
    assert entries == {} and len(problems) == 3 and all("escapes" in p for p in problems)
    before = tree(tmp_path, skip=store)
    res = one(ingest([src], store, checksums=sums))
    assert res.status == "rejected" and res.reason.startswith(f"not listed in {sums}") and "escapes" in res.reason
    assert tree(tmp_path, skip=store) == before
    assert stored_files(store) == []


def test_crafted_source_paths_stay_inside_the_store(tmp_path: Path, store: Path) -> None:
    inner = tmp_path / "in" / "deep"
    copy_in(data_file("small.svs"), inner)
    before = tree(tmp_path, skip=store)
    crafted = [f"{inner}/..", "..", f"{inner}/../deep/../../in/deep/small.svs"]
    results = ingest(crafted, store)
    assert [r.status for r in results] == ["rejected", "rejected", "stored"]
    assert "not a plain file name" in results[0].reason and "not a plain file name" in results[1].reason
    assert Path(results[2].stored_path) == (store / "slides" / results[2].sha256 / "small.svs").absolute()
    assert tree(tmp_path, skip=store) == before
    assert all(p.resolve().is_relative_to(store.resolve()) for p in store.rglob("*"))


# ------------------------------------------------------------------------------------------ the store
def test_manifest_keeps_rows_across_calls(tmp_path: Path, store: Path) -> None:
    a = one(ingest([data_file("small.svs")], store))
    b = one(ingest([data_file("cmu-1-small-region.svs")], store))
    table = pq.read_table(store / "manifest.parquet")
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    assert table.schema.metadata[b"gpupath.manifest_version"] == b"1"
    assert table["sha256"].to_pylist() == [a.sha256, b.sha256]
    assert [p.name for p in store.iterdir() if ".tmp-" in p.name] == []


def test_read_manifest_of_a_new_store_is_empty_with_the_schema(tmp_path: Path) -> None:
    table = read_manifest(tmp_path / "none-yet")
    assert table.num_rows == 0 and table.schema == MANIFEST_SCHEMA


def test_leftovers_of_a_killed_ingest_are_cleared(tmp_path: Path, store: Path) -> None:
    first = one(ingest([data_file("small.svs")], store))
    (store / ".incoming" / "a1b2").mkdir(parents=True)
    (store / ".incoming" / "a1b2" / "half.svs").write_bytes(b"II*\x00")
    (store / ".manifest.parquet.tmp-123456").write_bytes(b"PAR1")
    # renamed into slides/ just before a kill, no manifest row yet: replaced by a verified copy
    src = data_file("cmu-1-small-region.svs")
    orphan = store / "slides" / hexdigest(src)
    orphan.mkdir()
    (orphan / "junk").write_bytes(b"partial")
    res = one(ingest([src], store))
    assert res.status == "stored"
    assert sorted(p.name for p in orphan.iterdir()) == [src.name]
    assert incoming(store) == [] and not list(store.glob(".manifest.parquet.tmp-*"))
    assert read_manifest(store)["sha256"].to_pylist() == [first.sha256, res.sha256]


def test_store_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "store.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"store\.txt: exists and is not a folder"):
        ingest([data_file("small.svs")], a_file)
    with pytest.raises(ConfigError, match=r"SUMS: checksum file not found"):
        ingest([data_file("small.svs")], tmp_path / "store", checksums=tmp_path / "SUMS")


def test_one_writer_per_store(tmp_path: Path, store: Path) -> None:
    store.mkdir()
    fd = os.open(store / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another gpupath ingest is writing to it"):
            ingest([data_file("small.svs")], store)
    finally:
        os.close(fd)
    assert one(ingest([data_file("small.svs")], store)).status == "stored"


def test_read_checksums_formats(tmp_path: Path) -> None:
    h = [hashlib.sha256(bytes([i])).hexdigest() for i in range(6)]
    path = tmp_path / "SUMS"
    path.write_text("\n".join([
        "# made by sha256sum", "",
        f"{h[0]}  a.svs", f"{h[1].upper()} *b.svs", f"{h[2]}  ./sub/c d.svs", f"SHA256 (e.svs) = {h[3]}",
        f"\\{h[4]}  new\\nline.svs", f"{h[5]}  dup.svs", f"{h[0]}  dup.svs", "not a checksum line",
    ]) + "\n")
    entries, problems = read_checksums(path)
    assert entries == {"a.svs": h[0], "b.svs": h[1], "sub/c d.svs": h[2], "e.svs": h[3], "new\nline.svs": h[4]}
    assert len(problems) == 2
    assert "'dup.svs' listed again with another sha256" in problems[0] and problems[1].startswith("line 10:")


# ------------------------------------------------------------------------------------------ CLI
def gpupath(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpupath", "ingest", *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False)


def test_cli_exit_codes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    good = copy_in(data_file("small.svs"), tmp_path / "in")
    ok = gpupath(good, "--store", store)
    assert ok.returncode == 0, ok.stderr
    assert f"stored {hexdigest(good)[:12]} small.svs" in ok.stdout
    assert "1 stored, 0 already in the store, 0 rejected" in ok.stdout
    assert "note: 1 slide(s) stored without a checksum to verify against" in ok.stderr  # no sums, no sidecar
    rerun = gpupath(good, "--store", store)  # the same folder again tomorrow night
    assert rerun.returncode == 0, rerun.stderr
    assert f"kept {hexdigest(good)[:12]} small.svs: already in the store" in rerun.stdout
    assert "0 stored, 1 already in the store, 0 rejected" in rerun.stdout and "note:" not in rerun.stderr

    bad = copy_in(data_file("unreadable.svs"), tmp_path / "in")
    mixed = gpupath(bad, data_file("boxes.tiff"), "--store", store)
    assert mixed.returncode == 1
    errors = [line for line in mixed.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: OpenSlide cannot decode level 0 at (0, 0): Bogus marker length"]
    assert f"warning: {data_file('boxes.tiff')}: metadata says 352.8 µm/px" in mixed.stderr
    assert "1 stored, 0 already in the store, 1 rejected" in mixed.stdout

    no_sums = gpupath(good, "--store", store, "--checksums", tmp_path / "nope")
    assert no_sums.returncode == 2 and f"error: {tmp_path / 'nope'}: checksum file not found" in no_sums.stderr
    shutil.rmtree(store)
    store.write_text("not a folder")
    assert gpupath(good, "--store", store).returncode == 2
    assert gpupath("--store", tmp_path / "s2").returncode == 2  # no source given
