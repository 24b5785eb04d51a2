"""gpupath.convert: slide -> pyramidal BigTIFF OME-TIFF, checked with three independent readers.

Tolerances (JPEG q90, YCbCr 4:2:0, measured on this data): level-0 mean absolute difference vs
the source 2.9 grey levels / p99 23 on CMU-1 (a Q=30 JPEG source, so chroma edges suffer), 0.75 / 10
on the NDPI, 1.1 / 8 on the generated slide. The tests allow mean <= 3.5 and p99 <= 30. Deflate is
lossless and checked exactly, pyramid included.

Device (``device="cuda"``, GPU tests): the reduced levels are built with the same integer 2 x 2
mean on the GPU (checked bit for bit against NumPy, and through a Deflate conversion), and JPEG
tiles are encoded by nvImageCodec; device JPEG output vs the CPU JPEG output: mean |diff| <= 2,
p99 <= 16 grey levels, every level.
"""

from __future__ import annotations

import errno
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpupath._xp import gpu_available, to_host
from gpupath.convert import (ConvertParams, halve, stain_normaliser, tiles_of_row, convert_slide,
                             pyramid_dimensions)
from gpupath.errors import ConfigError, GpupathError, MetadataError, SlideReadError
from gpupath.slide import open_slide
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide
from conftest import data_file

openslide = pytest.importorskip("openslide")

JPEG_MEAN_TOL, JPEG_P99_TOL = 3.5, 30.0
DEVICE_MEAN_TOL, DEVICE_P99_TOL = 2.0, 16.0   # device JPEG vs CPU JPEG of the same slide


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "gen.svs"
    write_synthetic_slide(path, SyntheticSpec(4096, 3000, seed=3, mpp=0.25), workers=2)
    return path


def _source(name: str, generated: Path) -> Path:
    return generated if name == "generated" else data_file(name)


def _ref_halve(a: np.ndarray) -> np.ndarray:
    """Independent 2 x 2 rounded mean with edge replication (float arithmetic)."""
    h, w = a.shape[:2]
    a = np.pad(a.astype(np.float64), ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return np.floor(s / 4 + 0.5).astype(np.uint8)


def _levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def _only_output(folder: Path, name: str) -> None:
    """The folder holds ``name`` and nothing else (no temporary files)."""
    assert sorted(p.name for p in folder.iterdir()) == [name]


def _assert_empty(folder: Path) -> None:
    assert not folder.exists() or list(folder.iterdir()) == [], sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(("name", "tile_px"), [("cmu-1-small-region.svs", 256), ("test3-DAPI.ndpi", 512),
                                               ("generated", 256)])
def test_convert_opens_in_three_readers(name: str, tile_px: int, generated: Path, tmp_path: Path) -> None:
    src = _source(name, generated)
    out = tmp_path / "o" / "slide.ome.tif"
    result = convert_slide(src, out, ConvertParams(tile_px=tile_px))
    _only_output(out.parent, out.name)
    with open_slide(src) as s:
        w, h = s.dimensions
        mpp, vendor = s.require_mpp(), s.vendor
        source = s.read_rgb((0, 0), 0, (w, h))
        description = s.properties.get("tiff.ImageDescription", "")
        power = s.properties.get("openslide.objective-power")
    n_levels = max(1, math.ceil(math.log2(max(w, h) / tile_px)) + 1)
    dims = [(-(-w // 2**i), -(-h // 2**i)) for i in range(n_levels)]  # ceil halving
    assert list(result.level_dimensions) == dims == pyramid_dimensions(w, h, tile_px)
    assert result.mpp == pytest.approx(mpp)

    with tifffile.TiffFile(out) as tif:  # OME pyramid in SubIFDs
        assert tif.is_ome and tif.is_bigtiff and len(tif.series) == 1
        assert [lv.shape for lv in tif.series[0].levels] == [(dh, dw, 3) for dw, dh in dims]
        assert tif.pages.first.tilewidth == tile_px
        xml = tif.ome_metadata
    px = re.search(r'PhysicalSizeX="([^"]+)"', xml)
    assert px is not None and float(px.group(1)) == pytest.approx(mpp)
    assert 'PhysicalSizeXUnit="µm"' in xml
    assert f'<M K="openslide.vendor">{vendor}</M>' in xml  # the source's metadata is kept
    if description:
        assert description.splitlines()[0].replace("&", "&amp;") in xml
    with open_slide(out) as converted:  # the objective power comes back through our OME reader
        assert converted.properties.get("openslide.objective-power") == (f"{float(power):g}" if power else None)

    osr = openslide.OpenSlide(out)  # OpenSlide walks the main IFD chain
    assert osr.level_dimensions == tuple(dims)
    assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
    osr.close()

    cucim = pytest.importorskip("cucim")
    img = cucim.CuImage(str(out))
    assert tuple(map(tuple, img.resolutions["level_dimensions"])) == tuple(dims)
    assert img.spacing()[0] == pytest.approx(mpp, rel=1e-6)
    with open_slide(out, backend="cucim") as c:
        assert c.level_dimensions == tuple(dims) and c.mpp == pytest.approx(mpp, rel=1e-6)

    levels = _levels(out)
    diff = np.abs(levels[0].astype(np.int16) - source)
    assert diff.mean() <= JPEG_MEAN_TOL and np.percentile(diff, 99) <= JPEG_P99_TOL, (diff.mean(),
                                                                                  np.percentile(diff, 99))
    if n_levels > 1:  # level 1 is the 2 x 2 mean of level 0
        ref1 = _ref_halve(source)
        assert np.abs(levels[1].astype(np.int16) - ref1).mean() <= JPEG_MEAN_TOL


def test_deflate_is_lossless_with_odd_sizes(tmp_path: Path) -> None:
    src = tmp_path / "odd.svs"
    write_synthetic_slide(src, SyntheticSpec(1001, 777, tile_px=128, seed=5), workers=2)
    out = tmp_path / "odd.ome.tif"
    result = convert_slide(src, out, ConvertParams(tile_px=128, compression="deflate"))
    assert result.level_dimensions == ((1001, 777), (501, 389), (251, 195), (126, 98))
    with open_slide(src) as s:
        expected = s.read_rgb((0, 0), 0, s.dimensions)
    for level in _levels(out):
        np.testing.assert_array_equal(level, expected)
        expected = _ref_halve(expected)


def test_missing_mpp_needs_override(tmp_path: Path) -> None:
    src = tmp_path / "plain.tif"
    rgb = np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)
    tifffile.imwrite(src, rgb, tile=(128, 128), photometric="rgb", metadata=None)
    out = tmp_path / "o" / "plain.ome.tif"
    with pytest.raises(MetadataError, match="pass --mpp"):
        convert_slide(src, out)
    _assert_empty(out.parent)
    convert_slide(src, out, ConvertParams(tile_px=128, compression="deflate", mpp=0.5))
    with tifffile.TiffFile(out) as tif:
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), rgb)


def test_macenko_normalises_every_strip_with_one_fit(tmp_path: Path) -> None:
    src = data_file("cmu-1-small-region.svs")
    out = tmp_path / "norm.ome.tif"
    result = convert_slide(src, out, ConvertParams(stain="macenko", compression="deflate", device="cpu"))
    assert result.stain == "macenko" and result.warnings == ()
    with open_slide(src) as s:
        normalise, why = stain_normaliser(s, s.require_mpp(), "macenko")
        assert normalise is not None, why
        source = s.read_rgb((0, 0), 0, s.dimensions)
    written = _levels(out)[0]
    np.testing.assert_array_equal(written, normalise(source))
    assert np.abs(written.astype(np.int16) - source).mean() > 1.0  # the fit really changed colours


def test_unreadable_slide_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o" / "bad.ome.tif"
    with pytest.raises(SlideReadError, match="Bogus marker length") as info:
        convert_slide(data_file("unreadable.svs"), out)
    assert "\n" not in str(info.value)
    _assert_empty(out.parent)


@pytest.mark.parametrize("backend", ["openslide", "tifffile", "cucim"])
def test_corrupt_tile_mid_slide_leaves_nothing(backend: str, generated: Path, tmp_path: Path) -> None:
    # cuCIM itself prints "Bogus marker length" and returns pixels; gpupath's tile check refuses it first
    bad = tmp_path / "bad.svs"
    bad.write_bytes(generated.read_bytes())
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages.first
        index = len(page.dataoffsets) // 2 + 3
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(bad, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\xff\xc4\x00\x01" + b"\x00" * (count - 8))
    out = tmp_path / "o" / "bad.ome.tif"
    with pytest.raises(SlideReadError, match=r"rows 1536-1792.*(Bogus|bogus) marker length"):
        convert_slide(bad, out, ConvertParams(backend=backend))  # type: ignore[arg-type]
    _assert_empty(out.parent)


def test_write_error_mid_file_leaves_nothing(generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = tifffile.FileHandle.write
    calls = {"n": 0}

    def failing_write(self: tifffile.FileHandle, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(tifffile.FileHandle, "write", failing_write)
    out = tmp_path / "o" / "full.ome.tif"
    with pytest.raises(GpupathError, match="No space left on device.*disk full"):
        convert_slide(generated, out)
    assert calls["n"] > 40
    _assert_empty(out.parent)


def test_real_small_filesystem_leaves_nothing(generated: Path, tmp_path: Path) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        with pytest.raises(GpupathError, match="disk full"):
            convert_slide(generated, folder / "full.ome.tif")
        _assert_empty(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize(("kwargs", "pattern"), [({"tile_px": 100}, "tile_px"), ({"compression": "lzw"}, "compression"),
                                                 ({"quality": 0}, "quality"), ({"stain": "reinhard"}, "stain"),
                                                 ({"mpp": -1.0}, "mpp"), ({"device": "gpu"}, "device")])
def test_bad_params(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        ConvertParams(**kwargs)


def test_cli_convert(generated: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gpupath.cli import app

    out = tmp_path / "cli.ome.tif"
    res = CliRunner().invoke(app, ["convert", str(generated), str(out), "--tile", "512", "--quality", "80"])
    assert res.exit_code == 0, res.output
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.tilewidth == 512 and len(tif.series[0].levels) == 4
    bad = CliRunner().invoke(app, ["convert", str(data_file("unreadable.svs")), str(tmp_path / "u.ome.tif")])
    assert bad.exit_code == 1 and "Bogus marker length" in bad.output
    assert not (tmp_path / "u.ome.tif").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_over_a_folder_goes_on_after_a_failure(workers: int, generated: Path, tmp_path: Path) -> None:
    from gpupath.convert import convert_slides

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.svs").write_bytes(generated.read_bytes())
    (folder / "b.svs").write_bytes(data_file("unreadable.svs").read_bytes())
    out = tmp_path / "out"
    outcomes = convert_slides([folder], out, ConvertParams(tile_px=512), workers=workers)
    assert [o.source.name for o in outcomes] == ["a.svs", "b.svs"]
    assert outcomes[0].result is not None and outcomes[0].out == out / "a.ome.tif"
    assert outcomes[1].result is None and "Bogus marker length" in outcomes[1].error
    _only_output(out, "a.ome.tif")
    with tifffile.TiffFile(out / "a.ome.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) == 4


def test_batch_keeps_what_it_converted_before_and_redoes_what_changed(generated: Path, tmp_path: Path) -> None:
    from gpupath.convert import convert_key, convert_slides, converted_before
    from gpupath.ingest import sha256_file

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.svs", "b.svs"):
        (folder / name).write_bytes(generated.read_bytes())
    out = tmp_path / "out"
    params = ConvertParams(tile_px=512, compression="deflate", device="cpu")
    first = convert_slides([folder], out, params, workers=0)
    assert [o.resumed for o in first] == [False, False] and all(o.result for o in first)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = convert_slides([folder], out, params, workers=0)  # an overnight batch run a second time
    assert [o.resumed for o in again] == [True, True]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
    assert again[0].result.level_dimensions == first[0].result.level_dimensions
    assert again[0].result.mpp == pytest.approx(first[0].result.mpp)

    key = convert_key(sha256_file(folder / "a.svs"), params)
    assert converted_before(out / "a.ome.tif", key) is not None
    assert converted_before(out / "a.ome.tif", convert_key("0" * 64, params)) is None  # other source bytes
    other = ConvertParams(tile_px=512, compression="deflate", quality=3, device="cpu")
    assert [o.resumed for o in convert_slides([folder / "a.svs"], out, other, workers=0)] == [False]

    (out / "b.ome.tif").write_bytes((out / "b.ome.tif").read_bytes()[:4096])  # damaged by hand: converted again
    forced = convert_slides([folder], out, other, workers=0, resume=False)
    assert [o.resumed for o in forced] == [False, False]
    with tifffile.TiffFile(out / "b.ome.tif") as tif:
        assert len(tif.series[0].levels) == 4


def test_cli_batch(generated: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gpupath.cli import app

    res = CliRunner().invoke(app, ["convert", str(generated), str(data_file("small.svs")), "--out-dir",
                                   str(tmp_path / "o"), "--workers", "0", "--compression", "deflate"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["gen.ome.tif", "small.ome.tif"]
    again = CliRunner().invoke(app, ["convert", str(generated), str(data_file("small.svs")), "--out-dir",
                                     str(tmp_path / "o"), "--workers", "0", "--compression", "deflate"])
    assert again.exit_code == 0 and again.output.count("kept ") == 2 and "--redo converts again" in again.output
    assert "0 written, 2 kept, 0 failed" in again.output
    redo = CliRunner().invoke(app, ["convert", str(generated), "--out-dir", str(tmp_path / "o"), "--workers", "0",
                                    "--compression", "deflate", "--redo"])
    assert redo.exit_code == 0 and "wrote " in redo.output and "kept " not in redo.output
    bad = CliRunner().invoke(app, ["convert", str(generated)])
    assert bad.exit_code == 2 and "expected SRC OUT.ome.tif" in bad.output


def test_jpeg2000_reads_back_in_tifffile(tmp_path: Path) -> None:
    # TIFF compression 34712 (JPEG 2000): tifffile and cuCIM-free readers; OpenSlide's generic TIFF refuses it.
    src = tmp_path / "j.svs"
    write_synthetic_slide(src, SyntheticSpec(600, 500, tile_px=128, seed=2), workers=2)
    out = tmp_path / "j.ome.tif"
    convert_slide(src, out, ConvertParams(tile_px=128, compression="jpeg2000", quality=90))
    with open_slide(src) as s:
        source = s.read_rgb((0, 0), 0, s.dimensions)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.compression == 34712
        levels = [lv.asarray() for lv in tif.series[0].levels]
    assert [lv.shape[:2] for lv in levels] == [(500, 600), (250, 300), (125, 150), (63, 75)]
    assert np.abs(levels[0].astype(np.int16) - source).mean() <= JPEG_MEAN_TOL


# ---------------------------------------------------------------------------------------- device path
@pytest.mark.parametrize(("h", "w"), [(2, 1), (2, 2), (4, 5), (6, 3), (256, 1001), (130, 64)])
def test_halve_matches_reference(xp, h: int, w: int) -> None:
    rgb = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), np.uint8)
    rgb[0, 0] = (255, 0, 1)  # extremes: no overflow of the uint16 sum, rounding half up
    got = halve(xp.asarray(rgb))
    assert type(got) is type(xp.asarray(rgb)) and got.dtype == xp.uint8  # stays on the input's device
    np.testing.assert_array_equal(to_host(got), _ref_halve(rgb))


def test_halve_on_a_strided_view(xp) -> None:
    rgb = np.random.default_rng(7).integers(0, 256, (8, 22, 3), np.uint8)
    view = xp.asarray(rgb)[:, 1::2]  # non-contiguous columns
    np.testing.assert_array_equal(to_host(halve(view)), _ref_halve(rgb[:, 1::2]))


def test_tiles_of_row_pads_on_the_rows_device(xp) -> None:
    rows = np.random.default_rng(1).integers(0, 256, (40, 150, 3), np.uint8)
    tiles = tiles_of_row(xp.asarray(rows), 64)
    assert len(tiles) == 3 and all(t.shape == (64, 64, 3) and t.flags.c_contiguous for t in tiles)
    whole = np.concatenate([to_host(t) for t in tiles], axis=1)
    np.testing.assert_array_equal(whole, np.pad(rows, ((0, 24), (0, 42), (0, 0)), mode="edge"))


@pytest.mark.skipif(gpu_available(), reason="checks the no-GPU behaviour")
def test_cuda_without_gpu_is_a_config_error(generated: Path, tmp_path: Path) -> None:
    out = tmp_path / "o" / "g.ome.tif"
    with pytest.raises(ConfigError, match="device cuda asked for, but CuPy finds no usable CUDA GPU") as info:
        convert_slide(generated, out, ConvertParams(device="cuda"))
    assert "\n" not in str(info.value)
    _assert_empty(out.parent)


@pytest.mark.skipif(gpu_available(), reason="checks the no-GPU behaviour")
def test_auto_without_gpu_converts_on_the_cpu_without_a_warning(tmp_path: Path) -> None:
    # no GPU on the machine: the CPU is what auto means there, so no slide carries a fallback warning
    src = tmp_path / "s.svs"
    write_synthetic_slide(src, SyntheticSpec(300, 200, tile_px=128, seed=4), workers=1)
    result = convert_slide(src, tmp_path / "s.ome.tif", ConvertParams(tile_px=128, compression="deflate"))
    assert result.device == "cpu"
    assert result.warnings == ()
    assert convert_slide(src, tmp_path / "c.ome.tif", ConvertParams(tile_px=128, compression="deflate",
                                                                    device="cpu")).warnings == ()


def test_cli_device_option(generated: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gpupath.cli import app

    res = CliRunner().invoke(app, ["convert", str(generated), str(tmp_path / "c.ome.tif"), "--tile", "512",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(app, ["convert", str(generated), str(tmp_path / "x.ome.tif"), "--device", "tpu"])
    assert bad.exit_code != 0 and "device must be auto, cpu or cuda" in bad.output


@pytest.mark.gpu
def test_device_jpeg_opens_in_three_readers_and_matches_cpu(generated: Path, tmp_path: Path) -> None:
    pytest.importorskip("nvidia.nvimgcodec")
    cpu = convert_slide(generated, tmp_path / "cpu.ome.tif", ConvertParams(device="cpu"))
    gpu = convert_slide(generated, tmp_path / "gpu.ome.tif", ConvertParams(device="cuda"))
    assert gpu.device == "cuda" and gpu.warnings == () and gpu.level_dimensions == cpu.level_dimensions
    dims = gpu.level_dimensions
    with tifffile.TiffFile(gpu.path) as tif:
        page = tif.pages.first
        assert tif.is_ome and page.compression == 7 and page.photometric == 6  # JPEG, YCbCr
        assert tuple(page.tags["YCbCrSubSampling"].value) == (2, 2)
    osr = openslide.OpenSlide(gpu.path)
    assert osr.level_dimensions == tuple(dims)
    region = np.asarray(osr.read_region((0, 0), 0, dims[0]).convert("RGB"))
    osr.close()
    cucim = pytest.importorskip("cucim")
    img = cucim.CuImage(str(gpu.path))
    assert tuple(map(tuple, img.resolutions["level_dimensions"])) == tuple(dims)
    for got, ref in zip(_levels(gpu.path), _levels(cpu.path)):
        diff = np.abs(got.astype(np.int16) - ref)
        assert diff.mean() <= DEVICE_MEAN_TOL and np.percentile(diff, 99) <= DEVICE_P99_TOL, (
            got.shape, diff.mean(), np.percentile(diff, 99))
    diff = np.abs(region.astype(np.int16) - _levels(cpu.path)[0])  # OpenSlide decodes the device tiles too
    assert diff.mean() <= DEVICE_MEAN_TOL and np.percentile(diff, 99) <= DEVICE_P99_TOL
    with open_slide(gpu.path, backend="cucim") as c:
        got = c.read_rgb((0, 0), 0, dims[0])
    assert np.abs(got.astype(np.int16) - _levels(cpu.path)[0]).mean() <= DEVICE_MEAN_TOL


@pytest.mark.gpu
def test_device_pyramid_is_bit_identical_through_deflate(tmp_path: Path) -> None:
    src = tmp_path / "odd.svs"
    write_synthetic_slide(src, SyntheticSpec(1001, 777, tile_px=128, seed=5), workers=2)
    outs = [convert_slide(src, tmp_path / f"{d}.ome.tif", ConvertParams(tile_px=128, compression="deflate", device=d))
            for d in ("cpu", "cuda")]
    assert [o.device for o in outs] == ["cpu", "cuda"]
    for a, b in zip(_levels(outs[0].path), _levels(outs[1].path)):
        np.testing.assert_array_equal(a, b)


def test_plain_jfif_tiles_read_back_under_the_files_jpeg_tags(generated: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The device encoder (nvJPEG) emits stand-alone baseline JFIF streams, YCbCr 4:2:0, with no
    # colour-space arguments; this stands in for it on the CPU (libjpeg-turbo's defaults are the same
    # stream kind) and checks tifffile, OpenSlide and cuCIM decode such tiles under the tags tifffile
    # writes (Photometric YCbCr, YCbCrSubSampling 2 2).
    import imagecodecs

    import gpupath.convert._core as conv

    encoded = []

    def jfif(tile: np.ndarray) -> bytes:
        encoded.append(tile.shape)
        return imagecodecs.jpeg_encode(tile, level=90)

    monkeypatch.setattr(conv, "encoder", lambda params: jfif)
    out = tmp_path / "jfif.ome.tif"
    convert_slide(generated, out, ConvertParams(device="cpu"))
    assert encoded  # the stand-in really wrote the tiles (patched where convert_slide looks it up)
    with open_slide(generated) as s:
        source = s.read_rgb((0, 0), 0, s.dimensions)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.photometric == 6 and tif.pages.first.compression == 7
    osr = openslide.OpenSlide(out)
    region = np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))
    osr.close()
    for got in (_levels(out)[0], region):
        diff = np.abs(got.astype(np.int16) - source)
        assert diff.mean() <= JPEG_MEAN_TOL and np.percentile(diff, 99) <= JPEG_P99_TOL, (diff.mean(),)


def test_the_source_is_never_overwritten(generated: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "self.ome.tif"
    convert_slide(generated, src, ConvertParams(tile_px=512, compression="deflate", device="cpu"))
    before = src.read_bytes()
    with pytest.raises(ConfigError, match="is the source slide itself"):
        convert_slide(src, src, ConvertParams(tile_px=512, device="cpu"))
    link = tmp_path / "link.ome.tif"
    shutil.copy(src, tmp_path / "copy.ome.tif")
    link.symlink_to(src)
    with pytest.raises(ConfigError, match="is the source slide itself"):
        convert_slide(src, link, ConvertParams(tile_px=512, device="cpu"))
    assert src.read_bytes() == before
