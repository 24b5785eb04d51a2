"""Tests of gpupath.synthetic: the Aperio-like slide writer and its nuclei ground truth.

Readers are independent references: OpenSlide (C library) and cuCIM's CPU TIFF reader decode the
file; the analytic renderer (``_Scene.render``) gives the pixels before JPEG.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from scipy.spatial import cKDTree

from gpupath.synthetic import (
    SyntheticSpec,
    SyntheticTruth,
    _Scene,
    read_nuclei,
    write_synthetic_slide,
)

openslide = pytest.importorskip("openslide")

SPEC = SyntheticSpec(width_px=3000, height_px=2000, seed=7)  # levels 3000x2000, 750x500, 187x125
# JPEG tolerance, 8-bit levels, decoded pixels vs. the renderer (Q=90, RGB-coded tiles)
JPEG_MEAN_ABS, JPEG_MAX_ABS = 2.0, 40


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticTruth:
    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "synthetic.svs", SPEC)


@pytest.fixture(scope="module")
def level0(slide: SyntheticTruth) -> np.ndarray:
    with openslide.OpenSlide(slide.slide_path) as osr:
        return np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(rgb.astype(float), 1) / 245.0)


def test_openslide_reads_aperio_pyramid(slide: SyntheticTruth) -> None:
    with openslide.OpenSlide(slide.slide_path) as osr:
        props = osr.properties
        assert props["openslide.vendor"] == "aperio"
        assert float(props["openslide.mpp-x"]) == SPEC.mpp
        assert float(props["openslide.mpp-y"]) == SPEC.mpp
        assert props["openslide.objective-power"] == "40"
        assert props["openslide.level[0].tile-width"] == str(SPEC.tile_px)
        assert osr.level_dimensions == ((3000, 2000), (750, 500), (187, 125))
        np.testing.assert_allclose(osr.level_downsamples, [1, 4, 16], rtol=0.01)
        thumb = osr.associated_images["thumbnail"]
        assert thumb.size == (768, 512)


def test_aperio_ifd_layout(slide: SyntheticTruth) -> None:
    with tifffile.TiffFile(slide.slide_path) as tif:
        pages = list(tif.pages)
        assert [p.is_tiled for p in pages] == [True, False, True, True]  # thumbnail second, in strips
        assert [p.compression for p in pages] == [7] * 4 and pages[0].photometric == 2  # JPEG, RGB
        header = "Aperio Image Library v12.0.15 \r\n"
        assert pages[0].description.startswith(f"{header}3000x2000 [0,0 3000x2000] (256x256) JPEG/RGB Q=90|")
        assert pages[1].description.startswith(f"{header}3000x2000 -> 768x512 - |")
        assert pages[2].description.startswith(f"{header}3000x2000 -> 750x500 - |")
        assert "|MPP = 0.25|" in pages[3].description and "|AppMag = 40|" in pages[3].description


def test_cucim_matches_openslide(slide: SyntheticTruth, level0: np.ndarray) -> None:
    cucim = pytest.importorskip("cucim")
    img = cucim.CuImage(str(slide.slide_path))
    res = img.resolutions
    assert res["level_count"] == 3
    assert [tuple(d) for d in res["level_dimensions"]] == [(3000, 2000), (750, 500), (187, 125)]
    assert img.metadata["aperio"]["MPP"] == "0.25"
    np.testing.assert_allclose(img.spacing()[:2], [SPEC.mpp, SPEC.mpp], rtol=1e-6)
    assert "thumbnail" in img.associated_images
    cu0 = np.asarray(img.read_region((0, 0), (3000, 2000), 0))[..., :3].astype(int)
    diff = np.abs(cu0 - level0.astype(int))  # both use libjpeg-turbo: identical in practice
    assert diff.mean() < 2 and diff.max() < 40
    with openslide.OpenSlide(slide.slide_path) as osr:
        os1 = np.asarray(osr.read_region((0, 0), 1, (750, 500)).convert("RGB")).astype(int)
    cu1 = np.asarray(img.read_region((0, 0), (750, 500), 1))[..., :3].astype(int)
    assert np.abs(cu1 - os1).mean() < 2


def test_pixels_match_renderer_within_jpeg_error(level0: np.ndarray) -> None:
    ref = _Scene(SPEC).render(0, 0, 3000, 2000, 1)
    diff = np.abs(level0.astype(int) - ref)
    assert diff.mean() < JPEG_MEAN_ABS and diff.max() < JPEG_MAX_ABS


def test_lower_level_is_the_scene_downsampled(slide: SyntheticTruth, level0: np.ndarray) -> None:
    with openslide.OpenSlide(slide.slide_path) as osr:
        lvl1 = np.asarray(osr.read_region((0, 0), 1, (750, 500)).convert("RGB")).astype(float)
    box = level0.reshape(500, 4, 750, 4, 3).mean(axis=(1, 3))
    diff = np.abs(lvl1 - box)  # nuclei edges differ (OD vs intensity averaging)
    assert diff.mean() < 6 and np.percentile(diff, 99) < 40


def pixel_index_centres(nuc: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Truth centres (pixel c spans [c, c+1)) in the scene's pixel-index frame (pixel c centred at c)."""
    return nuc["x_px"] - 0.5, nuc["y_px"] - 0.5


def test_nuclei_truth_geometry(slide: SyntheticTruth) -> None:
    nuc = read_nuclei(slide)
    (x, y), r = pixel_index_centres(nuc), nuc["radius_px"]
    assert slide.n_nuclei == x.size > 100
    assert ((x >= 0) & (x <= SPEC.width_px - 1) & (y >= 0) & (y <= SPEC.height_px - 1)).all()
    lo, hi = (v / SPEC.mpp for v in SPEC.nucleus_radius_um)
    assert (r >= lo).all() and (r <= hi).all()
    assert np.allclose(nuc["semi_major_px"] * nuc["semi_minor_px"], r**2)
    scene = _Scene(SPEC)
    assert (scene.field_at(x, y) >= scene.thr).all()  # every centre in tissue (weight >= 0.5)
    pairs = cKDTree(np.c_[x, y]).query_pairs(3 * hi, output_type="ndarray")
    a, b = pairs[:, 0], pairs[:, 1]
    dist = np.hypot(x[a] - x[b], y[a] - y[b])
    assert (dist >= 3 * np.maximum(r[a], r[b])).all()


def test_nucleus_density_matches_spec() -> None:
    spec = SyntheticSpec(width_px=6000, height_px=6000, seed=3)
    scene = _Scene(spec)
    nuc = scene.nuclei_in(0, 0, spec.width_px - 1, spec.height_px - 1)
    yy, xx = np.mgrid[0:spec.height_px:8, 0:spec.width_px:8]
    core_mm2 = (scene.field_at(xx, yy) >= scene.thr_nucleus).mean() * 36e6 * (spec.mpp * 1e-3) ** 2
    assert nuc.shape[1] / core_mm2 == pytest.approx(spec.nuclei_per_mm2, rel=0.15)
    tissue = (scene.field_at(xx, yy) >= scene.thr).mean()
    assert tissue == pytest.approx(spec.tissue_fraction, abs=0.05)


def test_nuclei_are_dark_hematoxylin(slide: SyntheticTruth, level0: np.ndarray) -> None:
    nuc = read_nuclei(slide)
    (x, y), r = pixel_index_centres(nuc), nuc["radius_px"]
    far = (x > 3 * r) & (y > 3 * r) & (x < SPEC.width_px - 3 * r) & (y < SPEC.height_px - 3 * r)
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    for k in np.flatnonzero(far)[:: max(1, far.sum() // 12)]:
        col, row = round(x[k]), round(y[k])
        centre = level0[row - 1:row + 2, col - 1:col + 2].reshape(-1, 3).mean(axis=0)
        ring = np.median(level0[np.rint(y[k] + 1.7 * r[k] * np.sin(angles)).astype(int),
                                np.rint(x[k] + 1.7 * r[k] * np.cos(angles)).astype(int)], axis=0)
        assert centre.sum() < ring.sum() - 120  # darker
        assert centre[2] - centre[0] > ring[2] - ring[0] + 20  # bluer (hematoxylin vs eosin)
        conc, *_ = np.linalg.lstsq(stains.T, _od(centre), rcond=None)
        assert 0.7 < conc[0] < 1.8  # hematoxylin OD at the centre, like real H&E


def test_every_nucleus_sits_on_tissue(slide: SyntheticTruth, level0: np.ndarray) -> None:
    nuc = read_nuclei(slide)
    x, y = pixel_index_centres(nuc)
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring_x = np.rint(x[:, None] + 1.5 * nuc["radius_px"][:, None] * np.cos(angles))
    ring_y = np.rint(y[:, None] + 1.5 * nuc["radius_px"][:, None] * np.sin(angles))
    inside = (ring_x >= 0) & (ring_x < SPEC.width_px) & (ring_y >= 0) & (ring_y < SPEC.height_px)
    green = np.where(inside, level0[np.clip(ring_y, 0, SPEC.height_px - 1).astype(int),
                                    np.clip(ring_x, 0, SPEC.width_px - 1).astype(int), 1], np.nan)
    assert (np.nanmedian(green, axis=1) < 215).all()  # eosin absorbs green; glass is ~240


def test_glass_is_near_white(slide: SyntheticTruth, level0: np.ndarray) -> None:
    scene = _Scene(SPEC)
    yy, xx = np.mgrid[0:SPEC.height_px:16, 0:SPEC.width_px:16]
    glass = scene.field_at(xx, yy) < scene.thr - scene.band
    px = level0[yy[glass], xx[glass]]
    assert px.size and (px >= 225).all() and (px <= 247).all()  # JPEG may overshoot I0 = 245
    assert 230 <= px.mean() <= 245 and px.std() > 0.3


def test_deterministic_per_seed(tmp_path: Path) -> None:
    spec = SyntheticSpec(width_px=1500, height_px=1000, seed=11)
    a = write_synthetic_slide(tmp_path / "a.svs", spec)
    b = write_synthetic_slide(tmp_path / "b.svs", spec, workers=1)  # thread count changes nothing
    c = write_synthetic_slide(tmp_path / "c.svs", SyntheticSpec(1500, 1000, seed=12))
    na, nb, nc = read_nuclei(a), read_nuclei(b.slide_path), read_nuclei(c.nuclei_path)
    assert na.keys() == nb.keys() and all(np.array_equal(na[k], nb[k]) for k in na)
    assert na["x_px"].size != nc["x_px"].size or not np.array_equal(na["x_px"], nc["x_px"])
    with tifffile.TiffFile(a.slide_path) as ta, tifffile.TiffFile(b.slide_path) as tb:
        assert np.array_equal(ta.pages[0].asarray(), tb.pages[0].asarray())


def test_nuclei_do_not_depend_on_blocks_computed_first() -> None:
    spec = SyntheticSpec(width_px=5000, height_px=5000, seed=5)
    whole = _Scene(spec).nuclei_in(0, 0, 4999, 4999)
    scene = _Scene(spec)
    parts = [scene.nuclei_in(x0, y0, x0 + 999.999, y0 + 999.999)
             for y0 in range(4000, -1, -1000) for x0 in range(0, 5000, 1000)]
    key = np.lexsort(whole[:2])
    merged = np.concatenate(parts, axis=1)
    assert np.array_equal(merged[:, np.lexsort(merged[:2])], whole[:, key])


def test_atomic_write_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "slide.svs"
    target.write_bytes(b"old")

    def fail_on_level_1(level: int, col0_px: int, row0_px: int) -> None:
        if level == 1 and col0_px == 256:
            raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected failure"):
        write_synthetic_slide(target, SyntheticSpec(1200, 1200), _tile_hook=fail_on_level_1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.svs"]
    assert target.read_bytes() == b"old"


def test_bigtiff_ycbcr_readable(tmp_path: Path) -> None:
    spec = SyntheticSpec(width_px=1100, height_px=700, tile_px=512, jpeg_ycbcr=True, mpp=0.5)
    truth = write_synthetic_slide(tmp_path / "big.svs", spec, bigtiff=True, workers=1)
    with tifffile.TiffFile(truth.slide_path) as tif:
        assert tif.is_bigtiff and tif.pages[0].photometric == 6  # YCbCr
        assert not tif.pages[1].is_tiled  # thumbnail strips
    with openslide.OpenSlide(truth.slide_path) as osr:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert osr.properties["openslide.objective-power"] == "20"
        assert osr.level_dimensions == ((1100, 700), (275, 175))
        got = np.asarray(osr.read_region((0, 0), 0, (1100, 700)).convert("RGB")).astype(int)
    diff = np.abs(got - _Scene(spec).render(0, 0, 1100, 700, 1))
    assert diff.mean() < 3 and np.percentile(diff, 99.9) < 40  # 4:2:0 chroma: looser
    cucim = pytest.importorskip("cucim")
    img = cucim.CuImage(str(truth.slide_path))
    cu = np.asarray(img.read_region((0, 0), (1100, 700), 0))[..., :3].astype(int)
    assert np.abs(cu - got).mean() < 2


def test_no_nuclei_gives_empty_table(tmp_path: Path) -> None:
    truth = write_synthetic_slide(tmp_path / "e.svs", SyntheticSpec(600, 400, nuclei_per_mm2=0))
    nuc = read_nuclei(truth)
    assert truth.n_nuclei == 0 and nuc["x_px"].shape == (0,) and nuc["radius_px"].dtype == np.float64
    schema_meta = pq.read_schema(truth.nuclei_path).metadata
    assert json.loads(schema_meta[b"gpupath.spec"])["width_px"] == 600


@pytest.mark.parametrize(("field", "value"), [
    ("width_px", 0), ("height_px", -5), ("width_px", 12.5), ("mpp", 0.0), ("tile_px", 100),
    ("seed", -1), ("nucleus_radius_um", (5.0, 3.0)), ("nuclei_per_mm2", -1.0),
    ("tissue_fraction", 1.5), ("jpeg_quality", 0), ("jpeg_ycbcr", "yes"),
])
def test_bad_spec_raises(field: str, value: object) -> None:
    kwargs = {"width_px": 100, "height_px": 100, field: value}
    with pytest.raises(ValueError, match=re.escape(f"SyntheticSpec.{field}={value!r}")):
        SyntheticSpec(**kwargs)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda out: write_synthetic_slide(out, SyntheticSpec(500, 500, nuclei_per_mm2=1e5)), ValueError,
                 r"nuclei_per_mm2=100000.0: at most about", id="too-dense"),
    pytest.param(lambda out: write_synthetic_slide(out, SyntheticSpec(500, 500), workers=0), ValueError,
                 r"workers=0", id="no-workers"),
    pytest.param(lambda out: write_synthetic_slide(out, {"width_px": 500}), TypeError,
                 r"expected a SyntheticSpec", id="dict-not-spec"),
    pytest.param(lambda out: read_nuclei(out.with_name("missing.svs")), FileNotFoundError,
                 r"nuclei.parquet", id="no-truth-file"),
])
def test_bad_write_arguments_raise(tmp_path: Path, call: Callable[[Path], object], error: type[Exception],
                                   match: str) -> None:
    with pytest.raises(error, match=match):
        call(tmp_path / "x.svs")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


_RSS_SCRIPT = """
import resource, sys
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
write_synthetic_slide(sys.argv[1], SyntheticSpec(width_px=16384, height_px=16384), workers=2)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.slow
def test_memory_is_bounded_for_a_large_slide(tmp_path: Path) -> None:
    # a full 16k x 16k RGB level would be 768 MiB; streaming needs a few tiles
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "large.svs")],
                         capture_output=True, text=True, check=True, timeout=300)
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 300
