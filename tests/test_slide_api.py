"""Tests of gpupath.slide: `Slide` answers OpenSlide's questions as OpenSlide does, on every backend.

The reference is ``openslide.OpenSlide`` on the same real file (shared test data, see
conftest.py). Files OpenSlide refuses are checked against their own metadata and against
tifffile's decoding. Coordinates are level-0 (x, y) px; sizes are (width, height) px of the
level read, as in OpenSlide.

Pixel tolerance is 0 (max abs difference per channel) everywhere, for read_region, read_rgb and
get_thumbnail: OpenSlide, cuCIM and tifffile (imagecodecs) all decode JPEG with libjpeg-turbo and
Deflate with zlib, so a tile gives the same bytes, and 0 is what was measured on every file.
The one exception is a colour-space error, not decoder noise: cuCIM does not convert the JFIF
(YCbCr) JPEG tiles of OS-2-ndpi.ome.tif (Photometric=RGB) to RGB (max diff 143); the OME tests
below fail on it until gpupath stops handing such files to cuCIM.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile
from conftest import READABLE, UNOPENABLE, data_file

from gpupath.errors import MetadataError, SlideReadError
from gpupath.slide import Slide, open_slide

PIXEL_TOL = 0  # max abs diff per channel, uint8 (see module docstring)
BACKENDS = ["auto", "openslide", "cucim", "tifffile"]
CMU = "cmu-1-small-region.svs"
OME = "OS-2-ndpi.ome.tif"
# every file of the shared data folder that openslide.OpenSlide opens (unreadable.svs opens; its
# tiles do not decode). Hard-coded so collection reads no file; test_openslide_list_is_current
# keeps it true.
OPENSLIDE_OPENS = ["cmu-1-small-region.svs", "test3-DAPI.ndpi", "small.svs", "boxes.tiff",
                   "boxes_0.dcm", "boxes_1.dcm", "unreadable.svs"]
DOWNSAMPLES = [0.5, 1, 1.5, 2, 3, 3.99, 4, 4.02, 4.1, 7.9, 8, 8.1, 16, 31.9, 32, 64, 100, 1e6]
# the OME-XML <Pixels> element of OS-2-ndpi.ome.tif, µm/px
OME_MPP_X, OME_MPP_Y = 0.2270972430394695, 0.22710240047237298


# ---------------------------------------------------------------------------------- helpers
def _open_or_skip(name: str, backend: str) -> Slide:
    """gpupath's Slide for a shared file, or skip naming the backend, the file and its reason."""
    try:
        return open_slide(data_file(name), backend=backend)
    except SlideReadError as exc:
        pytest.skip(f"backend={backend} refuses {name}: {exc}")


def _mpp(props: object, axis: str) -> float | None:
    value = props.get(f"openslide.mpp-{axis}")  # type: ignore[attr-defined]
    return float(value) if value not in (None, "") else None


def _whole_px_origin(ds: float, n_lvl: int) -> int:
    """A level-0 coordinate k * ds that is a whole number (k in the middle of the level), else 0.

    OpenSlide interpolates a level read whose origin falls between level pixels (cairo sub-pixel
    translate), gpupath floors; the OpenSlide API is compared where the two agree by definition.
    """
    for k in range(n_lvl // 4, n_lvl):
        if abs(k * ds - round(k * ds)) < 1e-9 * ds:
            return round(k * ds)
    return 0


def _regions(osr: openslide.OpenSlide) -> list[tuple[str, tuple[int, int], int, tuple[int, int]]]:
    """(label, location level-0 px, level, size px of the level) of the reads to compare."""
    w, h = osr.dimensions
    regions = [
        ("inside", (w // 4, h // 4), 0, (max(1, min(200, w // 2)), max(1, min(150, h // 2)))),
        ("negative origin", (-7, -5), 0, (40, 30)),
        ("beyond right", (w + 3, h // 2), 0, (20, 10)),
        ("beyond bottom-right", (w + 10, h + 10), 0, (20, 20)),
        ("straddles bottom-right", (w - 15, h - 10), 0, (40, 30)),
    ]
    for level in range(1, osr.level_count):
        ds, (lw, lh) = osr.level_downsamples[level], osr.level_dimensions[level]
        loc = (_whole_px_origin(ds, lw), _whole_px_origin(ds, lh))
        regions.append((f"level {level}", loc, level, (min(64, lw), min(48, lh))))
    return regions


def _answer(read: Callable[..., Any], *args: Any) -> np.ndarray | Exception:
    """What ``read(*args)`` returns: its pixels as an array, or the decode error it raised."""
    try:
        return np.asarray(read(*args))
    except (openslide.OpenSlideError, SlideReadError) as exc:
        return exc


def _assert_same_read(expected: np.ndarray | Exception, got: np.ndarray | Exception, what: str) -> None:
    """``got`` (gpupath) is ``expected`` (the reference) within PIXEL_TOL, or both raised."""
    if isinstance(expected, Exception):  # the reference cannot decode it: gpupath must raise too
        assert isinstance(got, SlideReadError), f"{what}: reference raised {expected!r}, gpupath gave {got!r}"
        return
    assert not isinstance(got, Exception), f"{what}: reference read it, gpupath raised {got!r}"
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != reference's {expected.shape}"
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= PIXEL_TOL, (
        f"{what}: max abs diff {diff.max()} > {PIXEL_TOL} on {np.count_nonzero(diff.max(-1))} of "
        f"{diff.shape[0] * diff.shape[1]} px")


# ------------------------------------------------------------------- 1. same answers as OpenSlide
def test_openslide_list_is_current() -> None:
    opens = []
    for name in READABLE + UNOPENABLE:
        try:
            openslide.OpenSlide(str(data_file(name))).close()
            opens.append(name)
        except openslide.OpenSlideError:
            pass  # refused: belongs to the tests of files OpenSlide refuses
    assert sorted(opens) == sorted(OPENSLIDE_OPENS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPENSLIDE_OPENS)
def test_same_answers_as_openslide(name: str, backend: str) -> None:
    slide = _open_or_skip(name, backend)
    osr = openslide.OpenSlide(str(data_file(name)))
    with slide:
        # metadata first: an OpenSlide handle that failed a decode (unreadable.svs) refuses every
        # later question, and a Slide on the OpenSlide backend shares that handle
        assert slide.level_count == osr.level_count
        assert slide.dimensions == osr.dimensions
        assert slide.level_dimensions == osr.level_dimensions
        assert slide.level_downsamples == pytest.approx(osr.level_downsamples, rel=1e-9)
        near_levels = [ds * f for ds in osr.level_downsamples for f in (1 - 1e-9, 1, 1 + 1e-9)]
        for ds in DOWNSAMPLES + near_levels:
            assert slide.get_best_level_for_downsample(ds) == osr.get_best_level_for_downsample(ds), ds
        assert slide.properties["openslide.vendor"] == osr.properties["openslide.vendor"]
        for axis in ("x", "y"):
            expected_mpp, got_mpp = _mpp(osr.properties, axis), _mpp(slide.properties, axis)
            if expected_mpp is None:
                assert got_mpp is None, f"mpp-{axis}: OpenSlide has none, gpupath says {got_mpp}"
            else:
                assert got_mpp == pytest.approx(expected_mpp, rel=1e-6), f"mpp-{axis}"
        assert set(slide.associated_images) == set(osr.associated_images)

        for label, loc, level, size in _regions(osr):
            what = f"{name} backend={slide.backend} read_region({loc}, {level}, {size}) [{label}]"
            _assert_same_read(_answer(osr.read_region, loc, level, size),
                              _answer(slide.read_region, loc, level, size), what)
        for thumb_px in [(64, 64), (300, 200)]:  # size, and pixels too (measured identical)
            _assert_same_read(_answer(osr.get_thumbnail, thumb_px), _answer(slide.get_thumbnail, thumb_px),
                              f"{name} backend={slide.backend} get_thumbnail({thumb_px})")
    osr.close()


def test_unreadable_svs_raises_on_read_in_both() -> None:
    # auto picks OpenSlide here: cuCIM returns garbage for corrupt JPEG, and the tifffile probe fails
    path = data_file("unreadable.svs")
    with pytest.raises(openslide.OpenSlideError, match="Bogus marker length"):
        openslide.OpenSlide(str(path)).read_region((0, 0), 0, (16, 16))
    with open_slide(path) as slide, pytest.raises(SlideReadError, match=re.escape(str(path))):
        slide.read_region((0, 0), 0, (16, 16))


# ------------------------------------------------------------------ 2. files OpenSlide refuses
@pytest.mark.parametrize("backend", ["auto", "tifffile"])
def test_ome_tiff_opens_without_openslide(backend: str) -> None:
    path = data_file(OME)
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(path))
    with open_slide(path, backend=backend) as slide:
        assert slide.backend == "tifffile"
        assert slide.level_count == 1
        assert slide.dimensions == (2202, 2202)
        assert slide.mpp == pytest.approx(OME_MPP_X, rel=1e-6)
        assert _mpp(slide.properties, "x") == pytest.approx(OME_MPP_X, rel=1e-6)
        region = np.asarray(slide.read_region((2180, -4), 0, (40, 30)))
        assert region.shape == (30, 40, 4)
        assert (region[:4] == 0).all() and (region[:, 22:] == 0).all()  # outside: transparent
        assert (region[4:, :22, 3] == 255).all()
        assert slide.get_thumbnail((64, 64)).size == (64, 64)
        assert slide.get_thumbnail((300, 200)).size == (200, 200)


def test_ome_tiff_mpp_y_from_physical_size_y() -> None:
    with open_slide(data_file(OME)) as slide:
        assert _mpp(slide.properties, "y") == pytest.approx(OME_MPP_Y, rel=1e-6)


# (location level-0 px, size px): inside the 2202 x 2202 px level (the last one ends on its corner)
OME_INSIDE = [((0, 0), (300, 300)), ((1000, 1200), (257, 131)), ((1900, 1890), (302, 312))]


def test_ome_tiff_refused_by_cucim_for_false_colours() -> None:
    # its JPEG tiles carry a JFIF (YCbCr) marker in a TIFF that says RGB: cuCIM skips the colour
    # conversion (max diff ~140 per channel), so the probe comparison must keep cuCIM away
    path = data_file(OME)
    with pytest.raises(SlideReadError, match=r"cuCIM: decodes colours unlike libjpeg \(max diff \d+"):
        open_slide(path, backend="cucim")


@pytest.mark.parametrize("backend", ["auto", "tifffile"])
def test_ome_tiff_pixels_match_tifffile_imread(backend: str) -> None:
    # reference: tifffile's own whole-page decode, which honours the tiles' JFIF (YCbCr) marker
    path = data_file(OME)
    page = tifffile.imread(path)
    with open_slide(path, backend=backend) as slide:
        for (x, y), (w, h) in OME_INSIDE:
            _assert_same_read(page[y : y + h, x : x + w], _answer(slide.read_rgb, (x, y), 0, (w, h)),
                              f"{OME} backend={slide.backend} read_rgb(({x}, {y}), 0, ({w}, {h}))")


# ---------------------------------------------------------------- 3. backends agree on pixels
def test_backends_agree_on_cmu_pixels() -> None:
    path = data_file(CMU)
    slides = {b: open_slide(path, backend=b) for b in ("cucim", "openslide", "tifffile")}
    rng = np.random.default_rng(0)
    w0, h0 = slides["openslide"].dimensions
    for _ in range(20):  # origins up to 100 px before the slide, so some reads cross an edge
        x, y = (int(v) for v in rng.integers((-100, -100), (w0, h0)))
        w, h = (int(v) for v in rng.integers(1, 400, size=2))
        expected = slides["openslide"].read_rgb((x, y), 0, (w, h))
        assert expected.shape == (h, w, 3) and expected.dtype == np.uint8
        for backend in ("cucim", "tifffile"):
            _assert_same_read(expected, slides[backend].read_rgb((x, y), 0, (w, h)),
                              f"{CMU} {backend} vs openslide read_rgb(({x}, {y}), 0, ({w}, {h}))")
    for slide in slides.values():
        slide.close()


# -------------------------------------------------------------------------------- 4. errors
def test_missing_file(tmp_path) -> None:
    path = tmp_path / "nope.svs"
    with pytest.raises(SlideReadError, match=rf"{re.escape(str(path))}: no such file"):
        open_slide(path)


def test_zero_byte_file(tmp_path) -> None:
    path = tmp_path / "empty.svs"
    path.touch()
    with pytest.raises(SlideReadError, match=rf"{re.escape(str(path))}: file is empty \(0 bytes\)"):
        open_slide(path)


def test_truncated_file(tmp_path) -> None:
    # the TIFF header is intact, but the first IFD lies past the 4000 bytes kept: refused before any reader
    # is tried (a reader that opened it anyway would read garbage or stop mid-slide)
    path = tmp_path / "truncated.svs"
    path.write_bytes(data_file(CMU).read_bytes()[:4000])
    with pytest.raises(SlideReadError, match=rf"^{re.escape(str(path))}: truncated: TIFF directory at byte "
                                             r"1275950 runs past the end of the file \(4000 bytes\)$"):
        open_slide(path)


def test_not_a_slide(tmp_path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("not a slide, just text\n")
    with pytest.raises(SlideReadError, match=rf"{re.escape(str(path))}: not a readable slide"):
        open_slide(path)


@pytest.mark.parametrize(("name", "why"), [
    ("unopenable.tiff", r"cuCIM: .*52479.*; OpenSlide: .*52479.*; tifffile: .*52479"),
    ("broken.svs", r"cuCIM: not a TIFF.*; OpenSlide: .*Unsupported or missing image file.*; tifffile: not a TIFF"),
])
def test_unopenable_says_why_each_backend_refused(tmp_path, name: str, why: str) -> None:
    path = tmp_path / name  # a copy, so the message is checked to name the file it was given
    shutil.copyfile(data_file(name), path)
    with pytest.raises(SlideReadError, match=rf"{re.escape(str(path))}: not a readable slide \({why}"):
        open_slide(path)


def test_bad_backend() -> None:
    with pytest.raises(ValueError, match=r"backend must be auto, cucim, openslide or tifffile, got 'gpu'"):
        open_slide(data_file(CMU), backend="gpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("mpp", [-1, 0, float("inf"), float("nan"), 25])
def test_bad_mpp_override(mpp: float) -> None:
    with pytest.raises(ValueError, match=r"mpp must be in \[0.01, 20.0\] µm/px, got"):
        open_slide(data_file(CMU), mpp=mpp)


@pytest.mark.parametrize("level", [-1, 1])
def test_level_out_of_range(level: int) -> None:
    with open_slide(data_file(CMU)) as slide, \
            pytest.raises(ValueError, match=rf"level {level} out of range \[0, 1\)"):
        slide.read_region((0, 0), level, (10, 10))


# ------------------------------------------------------------------------------------- 5. mpp
@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile"])
def test_implausible_mpp_needs_override(backend: str) -> None:
    path = data_file("boxes.tiff")  # 72 dpi in its TIFF tags = 352.8 µm/px
    with open_slide(path, backend=backend) as slide, pytest.raises(MetadataError, match=r"352\.8 µm/px.*--mpp"):
        slide.require_mpp()
    with open_slide(path, backend=backend, mpp=0.5) as slide:
        assert slide.mpp == 0.5
        assert slide.require_mpp() == 0.5
        assert float(slide.properties["openslide.mpp-x"]) == 0.5
        assert float(slide.properties["openslide.mpp-y"]) == 0.5


@pytest.mark.skipif(any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0")),
                    reason="an NVIDIA device node is present: cuCIM imports CuPy as usual there")
def test_host_only_machine_reads_with_cucim_without_loading_cupy() -> None:
    """cuCIM imports CuPy (and cuSOLVER) at import, ~240 MiB resident that its CPU reader never uses; where no
    NVIDIA device exists gpupath imports cuCIM as on a CPU-only install, and CuPy stays importable."""
    def peak_mib(first: str) -> tuple[str, int]:
        code = (f"import sys\n{first}\n"
                "from gpupath.slide import open_slide\n"
                f"s = open_slide({str(data_file('cmu-1-small-region.svs'))!r})\n"
                "assert s.backend == 'cucim', s.backend\n"
                "s.read_tiles([(0, 0), (300, 300)], 0, 256)\n"
                "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
                "print('cupy' in sys.modules, int(hwm) // 1024)\n"
                "import cupy\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr  # and CuPy imports afterwards
        loaded, rss = proc.stdout.split()
        return loaded, int(rss)

    (loaded, ours), (_, with_cupy) = peak_mib(""), peak_mib("import cupy")
    assert loaded == "False" and ours < with_cupy - 100, (ours, with_cupy)  # peak RSS; measured 44 vs 259 MiB
