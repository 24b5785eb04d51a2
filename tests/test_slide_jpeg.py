"""The JPEG tile check in front of cuCIM: valid streams from real scanners and three encoders pass,
damaged ones are refused as libjpeg refuses them, and a corrupt tile mid-slide fails the read (and
the run) with the slide, level and tile named instead of decoding to garbage."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from conftest import data_file
from gpupath.errors import SlideReadError
from gpupath.slide import open_slide
from gpupath.slide._jpeg import jpeg_stream_problem
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

pytest.importorskip("cucim")
JPEG_SLIDES = ["cmu-1-small-region.svs", "small.svs", "OS-2-ndpi.ome.tif"]


def _tiles(path: Path) -> list[bytes]:
    with tifffile.TiffFile(path) as tf:
        out = []
        for page in tf.pages:
            if page.is_tiled and page.compression == 7:
                for offset, count in zip(page.dataoffsets, page.databytecounts):
                    tf.filehandle.seek(offset)
                    out.append(tf.filehandle.read(count))
        return out


def _encoded(rng: np.random.Generator) -> list[bytes]:
    """The same picture through libjpeg-turbo (imagecodecs) and Pillow, with the options that change
    the marker structure: restart intervals, progressive scans, optimised tables, 4:2:0 and greyscale."""
    smooth = np.cumsum(rng.integers(-3, 4, (97, 131, 3)), axis=1)
    rgb = np.clip(smooth + 128, 0, 255).astype(np.uint8)
    out = [imagecodecs.jpeg8_encode(rgb, level=q) for q in (10, 75, 100)]
    out.append(imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb[..., 0]), level=90))
    for options in ({"progressive": True}, {"optimize": True, "subsampling": 2}, {"restart_marker_blocks": 3},
                    {"restart_marker_rows": 1, "quality": 95}):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", **options)
        out.append(buf.getvalue())
    return out


def _libjpeg_refuses(data: bytes) -> bool:
    try:
        imagecodecs.jpeg8_decode(data)
    except Exception:  # noqa: BLE001  any decoder error is a refusal
        return True
    return False


@pytest.mark.parametrize("name", JPEG_SLIDES)
def test_every_tile_of_real_scans_passes(name: str) -> None:
    tiles = _tiles(data_file(name))
    assert tiles
    assert [jpeg_stream_problem(t) for t in tiles] == [None] * len(tiles)


def test_streams_of_three_encoders_pass_and_decode() -> None:
    rng = np.random.default_rng(11)
    for data in _encoded(rng):
        assert jpeg_stream_problem(data) is None
        assert not _libjpeg_refuses(data)
    assert any(b"\xff\xd0" in d for d in _encoded(rng))  # restart markers really were written


def test_every_prefix_of_a_stream_is_refused() -> None:
    """A tile cut anywhere before its end-of-image marker: a truncated write or a short copy."""
    for data in _encoded(np.random.default_rng(12))[:5]:
        cuts = [*range(0, 40), *np.random.default_rng(13).integers(40, len(data) - 1, 50).tolist(), len(data) - 1]
        for cut in cuts:
            assert jpeg_stream_problem(data[:cut]) is not None, cut


@pytest.mark.parametrize("damage", ["bogus-length", "zero-length", "no-soi", "marker-runs-past-end", "no-scan"])
def test_damaged_streams_are_refused_as_libjpeg_refuses_them(damage: str) -> None:
    good = _encoded(np.random.default_rng(14))[1]
    if damage == "bogus-length":          # the shared unreadable.svs's and the convert test's damage
        data = good[:2] + b"\xff\xc4\x00\x01" + good[6:]
    elif damage == "zero-length":
        data = good[:2] + b"\xff\xdb\x00\x00" + good[6:]
    elif damage == "no-soi":
        data = b"\x00\x00" + good[2:]
    elif damage == "marker-runs-past-end":
        data = good[:2] + b"\xff\xe1\xff\xf0" + good[6:]
    else:
        data = b"\xff\xd8\xff\xd9"
    problem = jpeg_stream_problem(data)
    assert problem is not None and "\n" not in problem
    assert _libjpeg_refuses(data), damage  # the same verdict as the decoder that reports errors


def test_the_shared_unreadable_svs_tile_is_refused() -> None:
    (tile,) = _tiles(data_file("unreadable.svs"))
    assert jpeg_stream_problem(tile) is not None


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[int, int]]:
    """A generated slide whose level-0 tile 2 rows down, 3 across, has a bogus DHT length;
    returns the path and that tile's level-0 (x, y)."""
    path = tmp_path_factory.mktemp("jpeg") / "damaged.svs"
    write_synthetic_slide(path, SyntheticSpec(2048, 1536, tile_px=256, seed=9, mpp=0.25), workers=1)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        across = -(-page.imagewidth // page.tilewidth)
        index = 2 * across + 3
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        tile_xy = (3 * page.tilewidth, 2 * page.tilelength)
    with open(path, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\xff\xc4\x00\x01" + b"\x00" * (count - 8))
    return path, tile_xy


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cucim_reads_around_a_corrupt_tile_and_refuses_it(damaged: tuple[Path, tuple[int, int]], device: str) -> None:
    path, (x, y) = damaged
    with open_slide(path, backend="cucim") as slide:
        assert slide.backend == "cucim"
        slide.read_rgb((0, 0), 0, (512, 256), device=device)  # clean tiles read as before
        with pytest.raises(SlideReadError, match=r"corrupt JPEG tile \d+ of level 0 .*bogus marker length 1") as info:
            slide.read_rgb((x + 10, y + 10), 0, (64, 64), device=device)
        assert str(path) in str(info.value) and f"x {x}, y {y}" in str(info.value)
        with pytest.raises(SlideReadError, match="corrupt JPEG tile"):  # the batched reader (cuCIM's threads)
            slide.read_tiles([(0, 0), (x - 100, y - 100)], 0, 256, device=device)
        slide.read_tiles([(0, 0), (256, 0)], 0, 256, device=device)  # and the handle still reads clean tiles
        with pytest.raises(SlideReadError, match="corrupt JPEG tile"):
            slide.read_region((x, y), 0, (16, 16))  # the OpenSlide-compatible API too


def test_run_fails_the_slide_with_one_line_instead_of_garbage(damaged: tuple[Path, tuple[int, int]],
                                                              tmp_path: Path) -> None:
    path, _ = damaged
    proc = subprocess.run([sys.executable, "-m", "gpupath", "run", str(path), "--out", str(tmp_path / "out"),
                           "--device", "cpu", "--engine", "classic", "--no-reports"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(path) in errors[0] and "corrupt JPEG tile" in errors[0], proc.stderr
    (row,) = pq.read_table(tmp_path / "out" / "slides.parquet").to_pylist()
    assert row["status"] == "failed" and row["backend"] in ("", "cucim")
    assert not (tmp_path / "out" / "detections").exists() or not any((tmp_path / "out" / "detections").rglob("*.parquet"))


def test_fractional_downsample_checks_the_tile_cucim_really_decodes(tmp_path: Path) -> None:
    """Level 1 of a 1007 x 1006 slide is 336 x 336 (downsample ~2.997): cuCIM maps level-0 origins
    in float32 and can start one level px left of gpupath's origin, in the tile before a boundary."""
    rng = np.random.default_rng(0)
    path = tmp_path / "frac.tif"
    level1 = np.full((336, 336, 3), 128, np.uint8)
    level1[..., 0] = np.arange(336)[None, :] % 256
    with tifffile.TiffWriter(path) as tw:
        tw.write(rng.integers(0, 255, (1006, 1007, 3), dtype=np.uint8), tile=(16, 16), compression="jpeg",
                 photometric="rgb")
        tw.write(level1, tile=(16, 16), compression="jpeg", photometric="rgb", subfiletype=1)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[1]
        across = -(-page.imagewidth // 16)
        offsets = [int(page.dataoffsets[ty * across + 13]) for ty in range(across)]
    with open(path, "r+b") as fh:
        for offset in offsets:  # every tile of column 13 (level px 208-223) damaged
            fh.seek(offset + 2)
            fh.write(b"\xff\xc4\x00\x01")
    with open_slide(path, backend="cucim") as slide:
        assert slide.backend == "cucim" and slide.level_dimensions[1] == (336, 336)
        x0 = 671  # level 1 px 224 by gpupath's mapping: the first px right of the damaged column
        with pytest.raises(SlideReadError, match="corrupt JPEG tile"):
            slide.read_rgb((x0, 0), 1, (16, 16))
        with pytest.raises(SlideReadError, match="corrupt JPEG tile"):
            slide.read_tiles([(x0, 0), (x0, 96)], 1, 16)


def test_closing_twice_leaves_other_files_alone(damaged: tuple[Path, tuple[int, int]]) -> None:
    path, _ = damaged
    first = open_slide(path, backend="cucim")
    first.close()
    with open_slide(path, backend="cucim") as second:  # may get the descriptor number the first had
        first.close()
        assert second.read_rgb((0, 0), 0, (64, 64)).shape == (64, 64, 3)
