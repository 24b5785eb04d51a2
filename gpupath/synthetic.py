"""Synthetic Aperio-like whole-slide images with nuclei at known positions.

:func:`write_synthetic_slide` writes a real pyramidal, tiled, JPEG-compressed TIFF laid out like an
Aperio SVS (level 0; a stripped thumbnail as the second IFD; levels downsampled by 4, 16, ... until
one tile holds the level), so OpenSlide reports ``openslide.vendor == "aperio"`` and cuCIM opens it.
Beside it goes ``<slide>.nuclei.parquet``, one row per nucleus drawn at level 0 (:func:`read_nuclei`).

Scene
    Rendered tile by tile at each level's downsample, never from a full level-0 array. Tissue: a
    few smooth irregular blobs, a field on a coarse grid (~200 nodes along the long side),
    bilinearly interpolated and cut at the quantile giving ``tissue_fraction`` of the area. Eosin
    with a periodic noise texture and faint hematoxylin fill the tissue; nuclei are dark
    hematoxylin ellipses with soft edges. Colour is Beer-Lambert,
    ``rgb = I0 * exp(-(c_h * H + c_e * E + od_glass))``, Ruifrok-Johnston vectors, ``I0 = 245``.
Nuclei
    A jittered grid (one candidate per cell, jittered over the middle half of the cell) thinned to
    tissue and by a Matérn II hard core: a candidate is dropped when one closer than 3 radii of the
    larger has a higher random priority. Blocks of ~1024 px are drawn from generators seeded by
    ``(seed, block_x, block_y)``, so a block's nuclei depend on its 3 x 3 neighbours only. The cell
    size is calibrated so that the density after thinning is ``nuclei_per_mm2``.
Coordinates
    Truth: level-0 px, x right, y down, pixel (col, row) spans [col, col+1) x [row, row+1). The scene
    uses pixel-index coordinates (pixel centred at (col, row); level ``d`` samples ``col*d + (d-1)/2``).
Device and memory
    Host only (NumPy, SciPy, libjpeg-turbo via imagecodecs); tiles are rendered and encoded on a
    thread pool. Memory: a few tiles in flight plus rows of nucleus blocks, whatever the slide size.

References
----------
A. C. Ruifrok, D. A. Johnston, "Quantification of histochemical staining by color
deconvolution", Anal. Quant. Cytol. Histol. 23(4), 2001.
B. Matérn, "Spatial variation", Lecture Notes in Statistics 36, 1986 (hard-core process II).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.ndimage
import tifffile

from gpupath._version import __version__

__all__ = ["SyntheticSpec", "SyntheticTruth", "write_synthetic_slide", "read_nuclei"]

_APERIO_HEADER = "Aperio Image Library v12.0.15 \r\n"
_I0 = 245.0  # incident light, 8-bit intensity
_H_OD = (0.65, 0.70, 0.29)  # hematoxylin OD vector (R, G, B), Ruifrok & Johnston
_E_OD = (0.07, 0.99, 0.11)  # eosin OD vector
_BLOCK_PX = 1024.0  # target edge of a nucleus block, level-0 px
_TEXTURE_PX = 1024  # period of the noise textures, level px (rounded up to whole tiles)
_THUMB_PX = 768  # longest side of the thumbnail page, px
_GRID_NODES = 192  # tissue-field grid steps along the slide's long side
_MAX_ASPECT = 1.3  # largest semi-major / semi-minor axis ratio of a nucleus
_EDGE_UM = 0.5  # width of the soft nucleus edge, µm
_TISSUE_EDGE_UM = 20.0  # typical width of the soft tissue edge, µm
_NUCLEUS_OD = (0.9, 1.4)  # hematoxylin concentration (OD) at a nucleus centre, uniform
_SEP_RADII = 3.0  # smallest centre distance, in radii of the larger nucleus
_TISSUE_STREAM, _TEXTURE_STREAM, _NUCLEI_STREAM = 1, 2, 3  # seed-sequence stream tags
_CALIBRATION_SEED = 20_240_601
_NUCLEI_COLUMNS = ("x_px", "y_px", "radius_px", "semi_major_px", "semi_minor_px", "angle_rad", "hematoxylin_od")


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """What to draw: size, resolution, tiling, seed and nucleus statistics.

    Parameters
    ----------
    width_px, height_px : int
        Level-0 size, px (1 to 1,000,000).
    mpp : float
        Microns per level-0 pixel (0.25 is 40x); written as Aperio ``MPP`` and ``AppMag = 10/mpp``.
    tile_px : int
        TIFF tile edge, px; a multiple of 16 from 16 to 4096.
    seed : int
        Non-negative seed; the same spec always gives the same pixels and nuclei.
    nucleus_radius_um : (float, float)
        Range (low, high) of radii, µm, uniform, at most 128 px; semi-axes have it as geometric mean.
    nuclei_per_mm2 : float
        Nuclei per mm² of tissue (0 for none); at most what fits with centres 3 radii apart.
    tissue_fraction : float
        Fraction of the slide area covered by tissue, in [0, 1].
    jpeg_quality : int
        JPEG quality, 1 to 100.
    jpeg_ycbcr : bool
        False: RGB-coded JPEG tiles, photometric RGB, as Aperio scanners write them. True: YCbCr
        4:2:0 tiles, photometric YCbCr; about half the bytes, chroma blurred over 2 x 2 px.
    """

    width_px: int
    height_px: int
    mpp: float = 0.25
    tile_px: int = 256
    seed: int = 0
    nucleus_radius_um: tuple[float, float] = (3.0, 4.5)
    nuclei_per_mm2: float = 3000.0
    tissue_fraction: float = 0.4
    jpeg_quality: int = 90
    jpeg_ycbcr: bool = False

    def __post_init__(self) -> None:
        radii, mpp_ok = self.nucleus_radius_um, _is_real(self.mpp) and 0.01 <= self.mpp <= 100
        pair = isinstance(radii, tuple | list) and len(radii) == 2 and all(map(_is_real, radii))
        checks = (
            ("width_px", _is_int(self.width_px) and 1 <= self.width_px <= 10**6, "an int in [1, 1e6]"),
            ("height_px", _is_int(self.height_px) and 1 <= self.height_px <= 10**6, "an int in [1, 1e6]"),
            ("mpp", mpp_ok, "µm/px in [0.01, 100]"),
            ("tile_px", _is_int(self.tile_px) and self.tile_px in range(16, 4097, 16),
             "a multiple of 16 in [16, 4096]"),
            ("seed", _is_int(self.seed) and self.seed >= 0, "an int >= 0"),
            ("nucleus_radius_um", pair and mpp_ok and 0 < radii[0] <= radii[1] <= 128 * self.mpp,
             "(low, high) µm with 0 < low <= high <= 128 px * mpp"),
            ("nuclei_per_mm2", _is_real(self.nuclei_per_mm2) and self.nuclei_per_mm2 >= 0, "a finite float >= 0"),
            ("tissue_fraction", _is_real(self.tissue_fraction) and 0 <= self.tissue_fraction <= 1,
             "a float in [0, 1]"),
            ("jpeg_quality", _is_int(self.jpeg_quality) and 1 <= self.jpeg_quality <= 100, "an int in [1, 100]"),
            ("jpeg_ycbcr", isinstance(self.jpeg_ycbcr, bool), "a bool"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"SyntheticSpec.{name}={getattr(self, name)!r}: expected {expected}")
        object.__setattr__(self, "nucleus_radius_um", (float(radii[0]), float(radii[1])))


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, slots=True)
class SyntheticTruth:
    """Where a synthetic slide and its ground truth were written."""

    slide_path: Path  # the SVS-like TIFF
    nuclei_path: Path  # Parquet beside it: <slide>.nuclei.parquet
    n_nuclei: int  # rows in the Parquet = nuclei drawn at level 0
    spec: SyntheticSpec


def _halo_cells(cell_px: float, hi_px: float) -> int:
    """Cells (each way) within which two jittered nuclei can be closer than 3 radii."""
    return max(0, math.ceil(_SEP_RADII * hi_px / cell_px + 0.5) - 1)


def _hardcore_kill(cand: np.ndarray, halo: int) -> np.ndarray:
    """(R - 2 halo, C - 2 halo) bool, Matérn II drops among the centre of (9, R, C) candidates (see
    :meth:`_Scene._candidates`): a valid one closer than 3 radii of the larger has a higher priority."""
    _, n_rows, n_cols = cand.shape
    core = cand[:, halo:n_rows - halo, halo:n_cols - halo]
    x, y, r, prio = core[[0, 1, 2, 7]]
    kill = np.zeros(x.shape, bool)
    for dy, dx in itertools.product(range(-halo, halo + 1), repeat=2):
        nb = cand[:, halo + dy:n_rows - halo + dy, halo + dx:n_cols - halo + dx]
        d_min = _SEP_RADII * np.maximum(r, nb[2])
        close = (nb[0] - x) ** 2 + (nb[1] - y) ** 2 < d_min**2
        kill |= (nb[8] > 0) & (nb[7] > prio) & close  # never itself: prio > prio is False
    return kill


@functools.lru_cache(maxsize=64)
def _calibrate_cell_px(lo_px: float, hi_px: float, per_px2: float) -> tuple[float, float]:
    """``(cell_px, best_per_px2)``: cell edge (level-0 px) keeping ``per_px2`` nuclei/px² after thinning
    (NaN if none does) and the densest seen. Simulates a 64 x 64-cell patch, same random numbers for
    each cell size from ``1 / sqrt(per_px2)`` down to 1.2 high radii; interpolates at the target."""
    n, pad = 64, _halo_cells(1.2 * hi_px, hi_px)
    rng = np.random.default_rng(_CALIBRATION_SEED)
    shape = (n + 2 * pad, n + 2 * pad)
    cand, jitter = np.ones((9, *shape)), 0.25 + 0.5 * rng.random((2, *shape))
    cand[2], cand[7] = rng.uniform(lo_px, hi_px, shape), rng.random(shape)
    rows, cols = np.indices(shape)
    prev_cell, prev_kept, best = math.nan, 0.0, 0.0
    for cell in np.geomspace(1.0 / math.sqrt(per_px2), 1.2 * hi_px, 64):
        halo = _halo_cells(cell, hi_px)
        cand[0], cand[1] = (cols + jitter[0]) * cell, (rows + jitter[1]) * cell
        sub = cand[:, pad - halo:pad + n + halo, pad - halo:pad + n + halo]
        kept = int((~_hardcore_kill(sub, halo)).sum()) / (n * cell) ** 2
        best = max(best, kept)
        if kept >= per_px2 * (1 - 1e-9):
            if math.isnan(prev_cell):
                return float(cell), best
            t = (per_px2 - prev_kept) / (kept - prev_kept)
            return float(prev_cell + t * (cell - prev_cell)), best
        prev_cell, prev_kept = float(cell), kept
    return math.nan, best


def _periodic_noise(rng: np.random.Generator, period_px: int, sigma_px: tuple) -> np.ndarray:
    """(period, period) float32 Gaussian-filtered noise that tiles seamlessly, unit std."""
    noise = scipy.ndimage.gaussian_filter(rng.standard_normal((period_px,) * 2), sigma_px, mode="wrap")
    return ((noise - noise.mean()) / max(float(noise.std()), 1e-12)).astype(np.float32)


def _wrap_window(tex: np.ndarray, row0: int, col0: int, h: int, w: int) -> np.ndarray:
    """(h, w) window of a periodic texture at (row0, col0), wrapping around its edges."""
    period, r, c = tex.shape[0], row0 % tex.shape[0], col0 % tex.shape[0]
    if r + h <= period and c + w <= period:
        return tex[r:r + h, c:c + w]
    return tex[np.ix_((r + np.arange(h)) % period, (c + np.arange(w)) % period)]


class _Scene:
    """Analytic scene of a spec: tissue field, textures, nucleus blocks (cached, locked), renderer."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        w, h, long_px = spec.width_px, spec.height_px, max(spec.width_px, spec.height_px)
        self.lo_px, self.hi_px = (r / spec.mpp for r in spec.nucleus_radius_um)
        self.per_px2 = spec.nuclei_per_mm2 * (spec.mpp * 1e-3) ** 2
        self.stains = (np.array([_H_OD, _E_OD]) / np.linalg.norm([_H_OD, _E_OD], axis=1)[:, None]).astype(np.float32)
        # tissue field on a coarse grid: node (row, col) sits at level-0 (x, y) = (col, row) * grid_px
        rng = np.random.default_rng([spec.seed, _TISSUE_STREAM])
        self.grid_px = max(long_px - 1, 1) / _GRID_NODES
        gw, gh = (math.ceil((n - 1) / self.grid_px) + 2 for n in (w, h))
        yy, xx = np.mgrid[0:gh, 0:gw] * self.grid_px / long_px
        field = np.zeros((gh, gw))
        for _ in range(int(rng.integers(3, 7))):  # blobs, in units of the long side
            cx, cy = rng.uniform(0.1, 0.9) * w / long_px, rng.uniform(0.1, 0.9) * h / long_px
            s_major, s_minor, theta = rng.uniform(0.1, 0.22), rng.uniform(0.05, 0.14), rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
            v = (yy - cy) * np.cos(theta) - (xx - cx) * np.sin(theta)
            field += rng.uniform(0.6, 1.0) * np.exp(-0.5 * ((u / s_major) ** 2 + (v / s_minor) ** 2))
        for sigma, amp in ((6.0, 0.3), (2.0, 0.1)):  # irregular edges
            noise = scipy.ndimage.gaussian_filter(rng.standard_normal((gh, gw)), sigma)
            field += amp * noise / max(float(noise.std()), 1e-12)
        self.field = field
        inside = field[: math.ceil((h - 1) / self.grid_px) + 1, : math.ceil((w - 1) / self.grid_px) + 1]
        thr = float(np.quantile(inside, 1 - spec.tissue_fraction))
        grad = np.hypot(*np.gradient(field, self.grid_px))  # field units per level-0 px
        near = np.abs(field - thr) < 0.05 * float(np.ptp(field))
        grad_edge = max(float(np.median(grad[near] if near.any() else grad)), 1e-12)
        self.band = grad_edge * _TISSUE_EDGE_UM / spec.mpp  # soft tissue edge, in field units
        nudge = {0.0: 2.0, 1.0: -2.0}.get(float(spec.tissue_fraction), 0.0)  # no / all tissue
        self.thr = thr + nudge * self.band
        # nucleus centres where the tissue weight is > 0.8, and about half a radius further in
        self.thr_nucleus = self.thr + self.band / 4 + grad_edge * 0.5 * self.hi_px
        # textures: the period is whole tiles, so tile windows never wrap
        tex_rng = np.random.default_rng([spec.seed, _TEXTURE_STREAM])
        period = spec.tile_px * math.ceil(_TEXTURE_PX / spec.tile_px)
        eosin = _periodic_noise(tex_rng, period, (3, 3)) + 0.7 * _periodic_noise(tex_rng, period, (1, 5))
        self.tex_eosin = eosin / eosin.std()  # blotches plus horizontal fibres
        self.tex_fine = _periodic_noise(tex_rng, period, (0.8, 0.8))
        self.cell_px = _BLOCK_PX
        if self.per_px2 > 0:
            self.cell_px, best = _calibrate_cell_px(self.lo_px, self.hi_px, self.per_px2)
            if math.isnan(self.cell_px):
                raise ValueError(
                    f"SyntheticSpec.nuclei_per_mm2={spec.nuclei_per_mm2!r}: at most about "
                    f"{best / (spec.mpp * 1e-3) ** 2:.0f} nuclei/mm² fit with centres "
                    f"{_SEP_RADII:g} radii apart for nucleus_radius_um={spec.nucleus_radius_um}")
        self.halo = _halo_cells(self.cell_px, self.hi_px)
        self.block_cells = max(1, round(_BLOCK_PX / self.cell_px), self.halo)
        self.block_px = self.block_cells * self.cell_px
        self.n_blocks = (math.ceil(w / self.block_px), math.ceil(h / self.block_px))  # (x, y)
        self._lock = threading.Lock()
        self._cand_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._nuc_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.reserve_rows(_BLOCK_PX)

    def reserve_rows(self, rows_px: float) -> None:
        """Size the block caches for regions ``rows_px`` level-0 px tall, visited row-major."""
        self.cache_blocks = (math.ceil(rows_px / self.block_px) + 4) * (self.n_blocks[0] + 2)

    def _interp_axis(self, coords: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.clip(coords / self.grid_px, 0, n_nodes - 1)
        idx = np.minimum(pos.astype(np.intp), n_nodes - 2)
        return idx, pos - idx

    def field_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue field at level-0 points (x, y), same shape; tissue where >= ``self.thr``."""
        c, wx = self._interp_axis(np.asarray(x, float), self.field.shape[1])
        r, wy = self._interp_axis(np.asarray(y, float), self.field.shape[0])
        f = self.field
        return ((f[r, c] * (1 - wx) + f[r, c + 1] * wx) * (1 - wy)
                + (f[r + 1, c] * (1 - wx) + f[r + 1, c + 1] * wx) * wy)

    def tissue_weight(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """(len(ys), len(xs)) float32 tissue weight in [0, 1] on the grid of level-0 xs, ys."""
        c, wx = self._interp_axis(xs, self.field.shape[1])
        r, wy = self._interp_axis(ys, self.field.shape[0])
        rows = self.field[r] * (1 - wy)[:, None] + self.field[r + 1] * wy[:, None]  # separable
        value = rows[:, c] * (1 - wx) + rows[:, c + 1] * wx
        t = np.clip((value - self.thr) / self.band + 0.5, 0, 1).astype(np.float32)
        return t * t * (3 - 2 * t)

    def _cached(self, cache: OrderedDict, key: tuple[int, int],
                make: Callable[[int, int], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        value = make(*key)  # outside the lock: two threads may both compute it, harmlessly
        with self._lock:
            cache[key] = value
            while len(cache) > self.cache_blocks:
                cache.popitem(last=False)
        return value

    def _candidates(self, bx: int, by: int) -> np.ndarray:
        """(9, k, k) candidates of block (bx, by): x, y, radius, semi-major, semi-minor (level-0 px),
        angle (rad), hematoxylin OD, priority, valid (centre in the slide and in tissue)."""
        k = self.block_cells
        cand = np.zeros((9, k, k))
        if not (0 <= bx < self.n_blocks[0] and 0 <= by < self.n_blocks[1]):
            return cand
        rng = np.random.default_rng([self.spec.seed, _NUCLEI_STREAM, bx, by])
        jitter, cells = 0.25 + 0.5 * rng.random((2, k, k)), np.arange(k)
        cand[0] = (bx * k + cells[None, :] + jitter[0]) * self.cell_px
        cand[1] = (by * k + cells[:, None] + jitter[1]) * self.cell_px
        cand[2] = rng.uniform(self.lo_px, self.hi_px, (k, k))
        aspect = np.sqrt(rng.uniform(1.0, _MAX_ASPECT, (k, k)))
        cand[3], cand[4] = cand[2] * aspect, cand[2] / aspect
        cand[5] = rng.uniform(0, np.pi, (k, k))
        cand[6] = rng.uniform(*_NUCLEUS_OD, (k, k))
        cand[7] = rng.random((k, k))
        inside = (cand[0] <= self.spec.width_px - 1) & (cand[1] <= self.spec.height_px - 1)
        cand[8] = inside & (self.field_at(cand[0], cand[1]) >= self.thr_nucleus)
        return cand

    def _block_nuclei(self, bx: int, by: int) -> np.ndarray:
        """(7, n) nuclei kept in block (bx, by), rows as ``_NUCLEI_COLUMNS``, in cell order."""
        k, halo = self.block_cells, self.halo
        rows = [np.concatenate([self._cached(self._cand_cache, (bx + dx, by + dy), self._candidates)
                                for dx in (-1, 0, 1)], axis=2) for dy in (-1, 0, 1)]
        cand = np.concatenate(rows, axis=1)[:, k - halo:2 * k + halo, k - halo:2 * k + halo]
        keep = (cand[8, halo:halo + k, halo:halo + k] > 0) & ~_hardcore_kill(cand, halo)
        return cand[:7, halo:halo + k, halo:halo + k][:, keep]

    def nuclei_in(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """(7, n) nuclei with centre in the level-0 box [x0, x1] x [y0, y1] (inclusive)."""
        if self.per_px2 <= 0:
            return np.zeros((7, 0))
        bxs = range(max(0, int(x0 // self.block_px)), min(self.n_blocks[0] - 1, int(x1 // self.block_px)) + 1)
        bys = range(max(0, int(y0 // self.block_px)), min(self.n_blocks[1] - 1, int(y1 // self.block_px)) + 1)
        parts = [self._cached(self._nuc_cache, (bx, by), self._block_nuclei) for by in bys for bx in bxs]
        nuc = np.concatenate(parts, axis=1) if parts else np.zeros((7, 0))
        return nuc[:, (nuc[0] >= x0) & (nuc[0] <= x1) & (nuc[1] >= y0) & (nuc[1] <= y1)]

    def _nuclei_od(self, col0: int, row0: int, w: int, h: int, downsample: float,
                   tissue: np.ndarray) -> np.ndarray:
        """(h, w) float32 nuclear hematoxylin OD of a level region (see :meth:`render`)."""
        if (self.lo_px + self.hi_px) / 2 / downsample < 0.5:  # sub-pixel nuclei: mean OD over tissue
            mean_area = np.pi * (self.lo_px**2 + self.lo_px * self.hi_px + self.hi_px**2) / 3
            return tissue * np.float32(self.per_px2 * mean_area * np.mean(_NUCLEUS_OD))
        edge = max(_EDGE_UM / self.spec.mpp / downsample, 0.7)  # level px
        hw = math.ceil(self.hi_px * math.sqrt(_MAX_ASPECT) / downsample + edge) + 1  # window half-width
        off0 = (downsample - 1) / 2
        nuc = self.nuclei_in((col0 - hw) * downsample + off0, (row0 - hw) * downsample + off0,
                             (col0 + w + hw - 1) * downsample + off0, (row0 + h + hw - 1) * downsample + off0)
        u = ((nuc[0] - off0) / downsample - col0)[:, None, None]  # centres, level px in the region
        v = ((nuc[1] - off0) / downsample - row0)[:, None, None]
        offsets = np.arange(-hw, hw + 1)
        cols = np.rint(u).astype(np.intp) + offsets[None, None, :]  # (n, 1, win)
        rows = np.rint(v).astype(np.intp) + offsets[None, :, None]  # (n, win, 1)
        dx, dy = (cols - u).astype(np.float32), (rows - v).astype(np.float32)
        cos, sin = (f(nuc[5]).astype(np.float32)[:, None, None] for f in (np.cos, np.sin))
        a, b, r = (nuc[i].astype(np.float32)[:, None, None] / downsample for i in (3, 4, 2))
        rho = np.sqrt(((dx * cos + dy * sin) / a) ** 2 + ((dy * cos - dx * sin) / b) ** 2)
        t = np.clip(0.5 - (rho - 1) * r / edge, 0, 1)  # 1 inside, 0 outside, ramp of width `edge`
        profile = t * t * (3 - 2 * t)
        amp = nuc[6]
        if downsample > 1:  # keep each nucleus' integrated OD when it shrinks to a few pixels
            area = np.pi * nuc[3] * nuc[4] / downsample**2
            amp = amp * np.clip(area / np.maximum(profile.sum(axis=(1, 2)), 1e-6), 0, 4)
        pad = 2 * hw
        flat = (rows + pad) * (w + 2 * pad) + (cols + pad)
        acc = np.bincount(flat.ravel(), weights=(profile * amp[:, None, None]).ravel(),
                          minlength=(h + 2 * pad) * (w + 2 * pad))  # ODs add (Beer-Lambert)
        return acc.reshape(h + 2 * pad, w + 2 * pad)[pad:pad + h, pad:pad + w].astype(np.float32)

    def render(self, col0: int, row0: int, w: int, h: int, downsample: float) -> np.ndarray:
        """(h, w, 3) uint8 RGB of a level region; (col0, row0) is its top-left pixel at the level
        of ``downsample`` (any value >= 1), which samples the scene at level-0 ``col * d + (d-1)/2``."""
        off0 = (downsample - 1) / 2
        tissue = self.tissue_weight((col0 + np.arange(w)) * downsample + off0,
                                    (row0 + np.arange(h)) * downsample + off0)
        damp = np.float32(1 / math.sqrt(downsample))  # texture averages out when downsampled
        tex_e = _wrap_window(self.tex_eosin, row0, col0, h, w)
        tex_f = _wrap_window(self.tex_fine, row0, col0, h, w)
        shift = self.tex_fine.shape[0] // 2 // self.spec.tile_px * self.spec.tile_px
        tex_g = _wrap_window(self.tex_fine, row0 + shift, col0 + shift, h, w)
        c_e = tissue * np.maximum(0.42 + (0.12 * damp) * tex_e, 0.05)
        c_h = tissue * (0.10 + (0.025 * damp) * tex_f)
        c_h += self._nuclei_od(col0, row0, w, h, downsample, tissue) * (1 + 0.12 * damp * tex_f)
        glass = np.maximum(0.02 + (0.006 * damp) * tex_g, 0.005)  # about 240 +- 1.5
        od = c_h[..., None] * self.stains[0] + c_e[..., None] * self.stains[1] + glass[..., None]
        np.exp(-od, out=od)
        return (od * np.float32(_I0) + 0.5).astype(np.uint8)  # rounded, values in (0, 245]


def _levels(spec: SyntheticSpec) -> list[tuple[int, int, int]]:
    """Pyramid as (downsample, width_px, height_px): 1, 4, 16, ... until one tile holds it."""
    levels = [(1, spec.width_px, spec.height_px)]
    while max(levels[-1][1:]) > spec.tile_px:
        d = levels[-1][0] * 4
        levels.append((d, max(1, spec.width_px // d), max(1, spec.height_px // d)))
    return levels


def _jpeg_args(spec: SyntheticSpec) -> dict:
    """imagecodecs.jpeg_encode keywords: RGB-coded (Aperio) or YCbCr 4:2:0 JPEG."""
    ycbcr = spec.jpeg_ycbcr
    return {"level": spec.jpeg_quality, "colorspace": "RGB", "outcolorspace": "YCBCR" if ycbcr else "RGB",
            "subsampling": (2, 2) if ycbcr else (1, 1)}


def _encode_tile(scene: _Scene, col0: int, row0: int, downsample: int) -> bytes:
    """Render and JPEG-encode one full tile, as tifffile would with the same tags."""
    t = scene.spec.tile_px
    return imagecodecs.jpeg_encode(scene.render(col0, row0, t, t, downsample), **_jpeg_args(scene.spec))


def _tile_stream(scene: _Scene, pool: ThreadPoolExecutor, depth: int, level: int, downsample: int,
                 w: int, h: int, hook: Callable[[int, int, int], None] | None) -> Iterator[bytes]:
    """Encoded tiles of a (w, h) px level in TIFF order, at most ``depth`` in flight."""
    t = scene.spec.tile_px
    pending: deque[Future[bytes]] = deque()
    try:
        for row0, col0 in itertools.product(range(0, h, t), range(0, w, t)):
            if hook is not None:
                hook(level, col0, row0)
            pending.append(pool.submit(_encode_tile, scene, col0, row0, downsample))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _description(spec: SyntheticSpec, w: int, h: int) -> str:
    """Aperio ImageDescription of a level (or the thumbnail) of size (w, h) px."""
    size, t = f"{spec.width_px}x{spec.height_px}", spec.tile_px
    head = (f"{size} [0,0 {size}] ({t}x{t}) JPEG/RGB Q={spec.jpeg_quality}"
            if (w, h) == (spec.width_px, spec.height_px) else f"{size} -> {w}x{h} - ")
    return (f"{_APERIO_HEADER}{head}|AppMag = {max(1, round(10 / spec.mpp))}|MPP = {float(spec.mpp)!r}"
            f"|Generator = gpupath {__version__} synthetic|Seed = {spec.seed}")


def _write_tiff(path: Path, scene: _Scene, *, bigtiff: bool, workers: int,
                hook: Callable[[int, int, int], None] | None) -> None:
    """Level 0, the thumbnail, then levels 1, 2, ... as Aperio orders its IFDs."""
    spec, t, jpeg = scene.spec, scene.spec.tile_px, _jpeg_args(scene.spec)
    px_per_cm = 1e4 / spec.mpp  # resolution tags too: cuCIM takes its spacing from them
    common = {"photometric": "rgb", "compression": "jpeg", "metadata": None, "software": False,
              "resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER",
              "subsampling": jpeg["subsampling"], "compressionargs": jpeg}
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif, ThreadPoolExecutor(workers) as pool:
        for level, (downsample, w, h) in enumerate(_levels(spec)):
            scene.reserve_rows(t * downsample)
            tiles = _tile_stream(scene, pool, 2 * workers + 2, level, downsample, w, h, hook)
            tif.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=(t, t),
                      description=_description(spec, w, h), maxworkers=1, **common)
            if level == 0:  # the thumbnail is the second IFD, in strips
                scale = max(1.0, max(spec.width_px, spec.height_px) / _THUMB_PX)
                tw, th = max(1, round(spec.width_px / scale)), max(1, round(spec.height_px / scale))
                scene.reserve_rows(t * scale)
                thumb = np.concatenate([scene.render(0, r0, tw, min(t, th - r0), scale)
                                        for r0 in range(0, th, t)])
                tif.write(thumb, description=_description(spec, tw, th), **common)


def _write_truth(path: Path, scene: _Scene, slide_path: Path) -> int:
    """Stream the kept nuclei, one row of blocks at a time, to Parquet; return their number."""
    spec, n_total = scene.spec, 0
    schema = pa.schema([pa.field(name, pa.float64()) for name in _NUCLEI_COLUMNS]).with_metadata({
        "gpupath.version": __version__, "gpupath.slide": str(slide_path),
        "gpupath.mpp": repr(float(spec.mpp)), "gpupath.spec": json.dumps(asdict(spec)),
        "gpupath.coordinates": "level-0 px, pixel (col, row) spans [col, col+1) x [row, row+1)"})
    scene.reserve_rows(scene.block_px)
    with pq.ParquetWriter(path, schema) as writer:
        for by in range(scene.n_blocks[1] if scene.per_px2 > 0 else 0):
            nuc = np.concatenate([scene._cached(scene._nuc_cache, (bx, by), scene._block_nuclei)
                                  for bx in range(scene.n_blocks[0])], axis=1)
            if nuc.shape[1]:
                nuc[:2] += 0.5  # scene pixel-index centres -> half-open pixel convention
                writer.write_table(pa.table(dict(zip(_NUCLEI_COLUMNS, nuc, strict=True)), schema=schema))
                n_total += nuc.shape[1]
    return n_total


def write_synthetic_slide(path: str | os.PathLike[str], spec: SyntheticSpec, *,
                          bigtiff: bool | None = None, workers: int | None = None,
                          _tile_hook: Callable[[int, int, int], None] | None = None) -> SyntheticTruth:
    """Write an Aperio-like synthetic slide and its nuclei table.

    Parameters
    ----------
    path : str or os.PathLike
        Slide file to write (e.g. ``slide.svs``); its folder must exist. The nuclei go to
        ``<path>.nuclei.parquet``. Both are first written as ``<name>.tmp-<random>`` in the same
        folder and renamed when complete; on any error the temporary files are removed.
    spec : SyntheticSpec
        What to draw.
    bigtiff : bool, optional
        Write BigTIFF. Default: only when the uncompressed pyramid exceeds 4 GiB - 32 MiB.
    workers : int, optional
        Threads that render and encode tiles; default the usable CPU count (at most 16).
    _tile_hook : callable, optional
        Private test hook, called as ``hook(level, col0_px, row0_px)`` before each tile.

    Returns
    -------
    SyntheticTruth
        Paths, number of nuclei and the spec.

    Raises
    ------
    TypeError
        ``spec`` is not a :class:`SyntheticSpec`.
    ValueError
        ``nuclei_per_mm2`` is more than fits with centres 3 radii apart, or ``workers`` < 1.

    Notes
    -----
    Memory: ``2 * workers + 2`` tiles in flight plus a few rows of ~1024 px nucleus blocks.

    Examples
    --------
    >>> truth = write_synthetic_slide("s.svs", SyntheticSpec(4096, 3072))  # doctest: +SKIP
    >>> read_nuclei(truth)["x_px"].shape  # doctest: +SKIP
    (1432,)
    """
    if not isinstance(spec, SyntheticSpec):
        raise TypeError(f"spec={spec!r}: expected a SyntheticSpec")
    if workers is None:
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        workers = min(16, len(usable))
    if not _is_int(workers) or workers < 1:
        raise ValueError(f"workers={workers!r}: expected an int >= 1")
    slide_path = Path(path)
    nuclei_path = slide_path.with_name(f"{slide_path.name}.nuclei.parquet")
    scene = _Scene(spec)
    if bigtiff is None:
        bigtiff = sum(3 * w * h for _, w, h in _levels(spec)) + 3 * _THUMB_PX**2 > 2**32 - 2**25
    token = uuid.uuid4().hex[:8]
    tmp_slide = slide_path.with_name(f"{slide_path.name}.tmp-{token}")
    tmp_nuclei = slide_path.with_name(f"{nuclei_path.name}.tmp-{token}")
    try:
        _write_tiff(tmp_slide, scene, bigtiff=bigtiff, workers=workers, hook=_tile_hook)
        n_nuclei = _write_truth(tmp_nuclei, scene, slide_path)
        os.replace(tmp_nuclei, nuclei_path)
        os.replace(tmp_slide, slide_path)
    except BaseException:
        tmp_slide.unlink(missing_ok=True)
        tmp_nuclei.unlink(missing_ok=True)
        raise
    return SyntheticTruth(slide_path=slide_path, nuclei_path=nuclei_path, n_nuclei=n_nuclei, spec=spec)


def read_nuclei(source: SyntheticTruth | str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Ground-truth nuclei of a synthetic slide.

    Parameters
    ----------
    source : SyntheticTruth, str or os.PathLike
        What :func:`write_synthetic_slide` returned, the slide path, or the ``.nuclei.parquet`` path.

    Returns
    -------
    dict of str to (n,) float64 ndarray
        ``x_px``, ``y_px``: level-0 centres (pixel (col, row) spans [col, col + 1));
        ``radius_px``: geometric-mean radius; ``semi_major_px``, ``semi_minor_px``; ``angle_rad`` of
        the major axis from +x towards +y; ``hematoxylin_od`` at the centre. Shape (0,) if none.

    Raises
    ------
    FileNotFoundError
        The Parquet file does not exist.
    """
    if isinstance(source, SyntheticTruth):
        parquet = source.nuclei_path
    else:
        parquet = Path(source)
        if not parquet.name.endswith(".nuclei.parquet"):
            parquet = parquet.with_name(f"{parquet.name}.nuclei.parquet")
    if not parquet.is_file():
        raise FileNotFoundError(f"{parquet}: no synthetic nuclei table "
                                "(expected <slide>.nuclei.parquet written by write_synthetic_slide)")
    table = pq.read_table(parquet)
    return {name: table.column(name).to_numpy().astype(np.float64) for name in table.column_names}
