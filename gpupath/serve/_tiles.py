"""Deep Zoom (DZI) geometry, tile rendering from a slide's levels, and a byte-bounded LRU cache.

Takes an open :class:`gpupath.slide.Slide` and returns encoded tiles (JPEG or PNG bytes) of the
Deep Zoom pyramid of its level 0. The geometry follows OpenSlide's ``DeepZoomGenerator``: DZI
level ``L`` of ``max_level + 1`` (``max_level = ceil(log2(max(W, H)))``) is level 0 scaled by
``2 ** (L - max_level)``; tile ``(col, row)`` covers ``[col*T - overlap, (col+1)*T + overlap)``
level-``L`` px, clipped to the level. Pixels are read from the slide level with the largest
downsample not above the one needed and resized where no level matches. Decode and resize run
on the GPU (cuCIM read + :func:`gpupath._resize` as matrix products on the device) when
``device="cuda"``; encoding is on the host (Pillow).
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["DziGeometry", "TileCache", "render_tile", "TILE_FORMATS", "Overview", "build_overview", "OVERVIEW_MAX_PX",
           "MAX_READ_PX"]

TILE_FORMATS = {"jpeg": "image/jpeg", "png": "image/png"}


@dataclass(frozen=True, slots=True)
class DziGeometry:
    """The Deep Zoom pyramid of a ``width_px`` x ``height_px`` level 0."""

    width_px: int        # level 0
    height_px: int       # level 0
    tile_px: int = 254   # tile edge without overlap, px at the DZI level
    overlap_px: int = 1  # px added on each inner side of a tile

    def __post_init__(self) -> None:
        if self.width_px < 1 or self.height_px < 1:
            raise ValueError(f"DZI needs a non-empty image, got {self.width_px} x {self.height_px} px")
        if self.tile_px < 1 or self.overlap_px < 0:
            raise ValueError(f"tile_px must be >= 1 and overlap_px >= 0, got {self.tile_px}, {self.overlap_px}")

    @property
    def max_level(self) -> int:
        """The DZI level at full resolution (level count - 1)."""
        return math.ceil(math.log2(max(self.width_px, self.height_px)))

    def downsample(self, level: int) -> int:
        """Level-0 px per px of DZI ``level``."""
        return 2 ** (self.max_level - level)

    def level_dimensions(self, level: int) -> tuple[int, int]:
        """(width, height) px of DZI ``level`` (ceil of level 0 over the downsample)."""
        ds = self.downsample(level)
        return -(-self.width_px // ds), -(-self.height_px // ds)

    def tile_count(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at DZI ``level``."""
        w, h = self.level_dimensions(level)
        return -(-w // self.tile_px), -(-h // self.tile_px)

    def valid(self, level: int, col: int, row: int) -> bool:
        """Whether ``(level, col, row)`` names a tile of the pyramid."""
        if not 0 <= level <= self.max_level:
            return False
        cols, rows = self.tile_count(level)
        return 0 <= col < cols and 0 <= row < rows

    def tile_bounds(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of a tile, px at DZI ``level`` (x1, y1 exclusive), overlap included."""
        if not self.valid(level, col, row):
            raise ValueError(f"no tile ({col}, {row}) at DZI level {level} of a {self.width_px} x {self.height_px} image")
        w, h = self.level_dimensions(level)
        t, ov = self.tile_px, self.overlap_px
        x0, y0 = max(col * t - ov, 0), max(row * t - ov, 0)
        return x0, y0, min((col + 1) * t + ov, w), min((row + 1) * t + ov, h)

    def xml(self, fmt: str = "jpeg") -> str:
        """The ``.dzi`` descriptor."""
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
                f'Overlap="{self.overlap_px}" TileSize="{self.tile_px}">'
                f'<Size Width="{self.width_px}" Height="{self.height_px}"/></Image>\n')


MAX_READ_PX = 4 * 1024 * 1024    # pixels one tile may read from the slide (12 MiB of RGB); more: the overview
OVERVIEW_MAX_PX = 2048           # long side of a slide's overview, px (at most 12 MiB of RGB)


class TileTooCostly(ValueError):
    """The slide has no level close enough to this zoom: one tile would read too many pixels."""


@dataclass(frozen=True, slots=True)
class Overview:
    """The whole slide at ``downsample`` level-0 px per px (a power of two; long side <= OVERVIEW_MAX_PX)."""

    rgb: np.ndarray   # (h, w, 3) uint8
    downsample: int


def build_overview(slide: Any, geom: DziGeometry, lock: threading.Lock | None = None) -> Overview:
    """The slide's overview, read in strips of at most MAX_READ_PX pixels from the level closest to it.

    For a slide without a pyramid this reads level 0 once, strip by strip (memory: one strip and the
    overview), where serving its low-zoom tiles one by one would decode the whole slide for each.
    """
    from PIL import Image

    ds = 1 << max(0, math.ceil(math.log2(max(geom.width_px, geom.height_px) / OVERVIEW_MAX_PX)))
    ow, oh = -(-geom.width_px // ds), -(-geom.height_px // ds)
    level = slide.get_best_level_for_downsample(ds)
    d = float(slide.level_downsamples[level])
    lw, lh = slide.level_dimensions[level]
    out = np.empty((oh, ow, 3), np.uint8)
    rows = max(1, int(MAX_READ_PX // max(lw, 1) * d // ds))  # overview rows per strip
    for r0 in range(0, oh, rows):
        r1 = min(oh, r0 + rows)
        y0, y1 = int(r0 * ds / d), min(lh, max(int(r0 * ds / d) + 1, math.ceil(r1 * ds / d)))
        with lock if lock is not None else contextlib.nullcontext():
            strip = slide.read_rgb((0, int(round(y0 * d))), level, (lw, y1 - y0))
        strip = np.asarray(strip)  # host (the overview is host memory whatever the device)
        out[r0:r1] = np.asarray(Image.fromarray(np.ascontiguousarray(strip)).resize((ow, r1 - r0), Image.Resampling.BOX))
    return Overview(out, ds)


def _from_overview(ov: Overview, geom: DziGeometry, level: int, col: int, row: int) -> np.ndarray:
    """A tile cut from the overview and resized to the DZI level (upsampled where the overview is coarser)."""
    from PIL import Image

    x0, y0, x1, y1 = geom.tile_bounds(level, col, row)
    f = geom.downsample(level) / ov.downsample  # overview px per DZI px
    h, w = ov.rgb.shape[:2]
    box = (min(x0 * f, w), min(y0 * f, h), min(x1 * f, w), min(y1 * f, h))
    img = Image.fromarray(ov.rgb).resize((x1 - x0, y1 - y0), Image.Resampling.BOX if f >= 1 else
                                         Image.Resampling.BILINEAR, box=box)
    return np.asarray(img)


def _read_level_rgb(slide: Any, geom: DziGeometry, level: int, col: int, row: int,
                    device: Literal["cpu", "cuda"], lock: threading.Lock | None,
                    overview: Callable[[], Overview] | None = None) -> Any:
    """(h, w, 3) uint8 pixels of a tile (NumPy, or CuPy when ``device="cuda"``), resized to the DZI level;
    from ``overview()`` where the slide read would exceed MAX_READ_PX (a slide without the level)."""
    x0, y0, x1, y1 = geom.tile_bounds(level, col, row)
    ds = geom.downsample(level)
    slide_level = slide.get_best_level_for_downsample(ds)
    ds_slide = slide.level_downsamples[slide_level]
    # level-0 px of the tile, then px at the slide level read (cover the whole tile: ceil)
    w_lvl = max(1, math.ceil((x1 - x0) * ds / ds_slide))
    h_lvl = max(1, math.ceil((y1 - y0) * ds / ds_slide))
    if w_lvl * h_lvl > MAX_READ_PX and overview is not None:
        return _from_overview(overview(), geom, level, col, row)  # host pixels: encoded on the host anyway
    if w_lvl * h_lvl > MAX_READ_PX:
        # a slide without the levels this view needs: one tile would read a whole slide into memory
        raise TileTooCostly(f"tile needs {w_lvl} x {h_lvl} px from level {slide_level} (downsample {ds_slide:g}); "
                            "the slide has no pyramid level for this zoom: convert it with gpupath convert")
    if lock is None:
        rgb = slide.read_rgb((x0 * ds, y0 * ds), slide_level, (w_lvl, h_lvl), device=device)
    else:
        with lock:  # one reader per slide: file handles are not shared across threads
            rgb = slide.read_rgb((x0 * ds, y0 * ds), slide_level, (w_lvl, h_lvl), device=device)
    w, h = x1 - x0, y1 - y0
    if (w_lvl, h_lvl) == (w, h):
        return rgb
    if device == "cuda":
        import cupy

        from gpupath._resize import resample_weights

        wy = cupy.asarray(resample_weights(h_lvl, h))
        wx = cupy.asarray(resample_weights(w_lvl, w))
        f = rgb.astype(cupy.float32)
        out = cupy.einsum("yh,hwc->ywc", wy, f)
        out = cupy.einsum("xw,ywc->yxc", wx, out)
        return cupy.clip(cupy.rint(out), 0, 255).astype(cupy.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.Resampling.BOX))


def render_tile(slide: Any, geom: DziGeometry, level: int, col: int, row: int, *, fmt: str = "jpeg",
                quality: int = 80, device: Literal["cpu", "cuda"] = "cpu",
                lock: threading.Lock | None = None, overview: Callable[[], Overview] | None = None) -> bytes:
    """Encoded tile ``(col, row)`` of DZI ``level``.

    Parameters
    ----------
    slide : an open :class:`gpupath.slide.Slide`.
    geom : the slide's :class:`DziGeometry`.
    level, col, row : DZI level and tile column, row (validated: ValueError when out of range).
    fmt : ``jpeg`` or ``png``.
    quality : JPEG quality (1-95).
    device : ``cuda`` decodes (cuCIM) and resizes on the GPU; the host encodes.
    lock : held around the slide read.
    overview : gives the slide's :class:`Overview` (built once by the caller); tiles whose read would exceed
        MAX_READ_PX are cut from it. Without it such a tile raises TileTooCostly.

    Returns
    -------
    The encoded image bytes, (x1 - x0) x (y1 - y0) px of :meth:`DziGeometry.tile_bounds`.
    """
    if fmt not in TILE_FORMATS:
        raise ValueError(f"tile format {fmt!r}: expected one of {sorted(TILE_FORMATS)}")
    from PIL import Image

    rgb = _read_level_rgb(slide, geom, level, col, row, device, lock, overview)
    if device == "cuda" and not isinstance(rgb, np.ndarray):
        import cupy

        rgb = cupy.asnumpy(rgb)  # to host for the encoder
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality, subsampling=0)  # 4:4:4: stain colour at nucleus edges
    else:
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class TileCache:
    """Thread-safe LRU of encoded tiles whose total size stays within ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[Any, ...], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return  # larger than the whole budget: not kept
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= len(old)
            self._items[key] = data
            self.nbytes += len(data)
            while self.nbytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= len(dropped)
