"""`open_slide` and `Slide`: one reader API over cuCIM, OpenSlide and tifffile.

A :class:`Slide` answers OpenSlide's questions (``dimensions``, ``level_dimensions``,
``read_region`` -> RGBA image, ``get_thumbnail``, ...) whatever backend decodes it, and adds
what the pipeline needs: microns per pixel, level choice for a target resolution, and batched
RGB reads into a :class:`TileBatch` on the host (NumPy) or the device (CuPy).

Coordinates: ``location`` / ``x, y`` are level-0 pixels (x right, y down) unless a name ends in
``_lvl``; sizes are in pixels of the level read, as in OpenSlide. A level-0 position maps to
level ``L`` as ``floor(x / level_downsamples[L])``.

Backend choice (``backend="auto"``), per file: cuCIM when the TIFF structure is one cuCIM reads
(tiled JPEG, not NDPI) and a probe tile decodes; else OpenSlide; else tifffile (single-level
OME-TIFF and other TIFFs OpenSlide refuses). Each fallback is logged with its reason.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from gpupath._coords import level0_origin, level_px
from gpupath._xp import device_module
from gpupath.errors import MetadataError, SlideReadError
from gpupath.slide._backends import (
    DECODER_TOLERANCE,
    CucimReader,
    OpenSlideReader,
    Reader,
    TifffileReader,
    import_cucim,
)
from gpupath.slide._cache import FileTileCache
from gpupath.slide._meta import TiffLayout, cucim_refusal, read_tiff_layout, tiff_truncation

__all__ = ["open_slide", "Slide", "TileBatch", "BackendName", "MPP_PLAUSIBLE_MIN", "MPP_PLAUSIBLE_MAX", "mpp_plausible",
           "describe_slide"]

log = logging.getLogger("gpupath.slide")

BackendName = Literal["auto", "cucim", "openslide", "tifffile"]
Device = Literal["cpu", "cuda"]
_PROBE_PX = 64          # edge of the region decoded by both tifffile and cuCIM before trusting cuCIM
MPP_PLAUSIBLE_MAX = 20.0  # µm/px; above this, level 0 is no microscope scan (e.g. a 72-dpi default tag)
MPP_PLAUSIBLE_MIN = 0.01  # µm/px; below this, no light microscope (the diffraction limit is ~0.2 µm)


def mpp_plausible(mpp: float) -> bool:
    """Whether ``mpp`` (µm/px) can be a light-microscope scan's: MPP_PLAUSIBLE_MIN <= mpp <= MPP_PLAUSIBLE_MAX
    (False for NaN). Smaller values make tile grids of billions of cells; larger ones are default tags."""
    return MPP_PLAUSIBLE_MIN <= mpp <= MPP_PLAUSIBLE_MAX


@dataclass(frozen=True, slots=True)
class TileBatch:
    """A batch of RGB tiles and where they came from.

    ``pixels`` is (N, H, W, 3) uint8, NumPy on the host or CuPy on the device. ``x, y`` are the
    level-0 origins (top-left, inclusive) of each tile; ``size_l0_px`` is the level-0 extent of
    a tile edge (tiles are square), so tile ``i`` covers ``[x, x + size_l0_px)`` level-0 px.
    """

    pixels: Any
    x: np.ndarray   # (N,) int64 level-0 px
    y: np.ndarray   # (N,) int64 level-0 px
    size_l0_px: int

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _is_ome_path(path: Path) -> bool:
    return path.name.lower().endswith((".ome.tif", ".ome.tiff", ".ome.tf2", ".ome.tf8", ".ome.btf"))


class Slide:
    """An open whole-slide image. Use :func:`open_slide` to make one.

    Speaks OpenSlide's API (so code written for ``openslide.OpenSlide`` runs unchanged) on every
    backend, plus :meth:`read_rgb` / :meth:`read_tiles` for the pipeline.
    """

    def __init__(self, path: Path, reader: Reader, layout: TiffLayout | None, mpp_override: float | None,
                 tile_cache_bytes: int | None = None) -> None:
        self.path = path
        self._reader = reader
        self._layout = layout
        self._mpp_override = mpp_override
        self._properties: Mapping[str, str] | None = None
        # host reads of tiles decode each file tile once (cuCIM, tifffile); OpenSlide keeps its own cache
        cached = reader.name in ("cucim", "tifffile") and tile_cache_bytes != 0
        self._tile_cache = FileTileCache(reader, tile_cache_bytes) if cached else None

    # ------------------------------------------------------------------ gpupath API
    @property
    def backend(self) -> str:
        """Name of the reader that decodes pixels: ``cucim``, ``openslide`` or ``tifffile``."""
        return self._reader.name

    def tile_cache_stats(self) -> dict[str, float] | None:
        """The host file-tile cache's counters (:meth:`FileTileCache.stats`), or None for a reader without one
        (OpenSlide keeps its own cache)."""
        return None if self._tile_cache is None else self._tile_cache.stats()

    @property
    def vendor(self) -> str:
        """Format vendor as OpenSlide names it (``aperio``, ``hamamatsu``, ``generic-tiff``, ...)."""
        return self.properties.get("openslide.vendor", "unknown")

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel (x), from the ``mpp=`` override or the metadata; None if unknown."""
        if self._mpp_override is not None:
            return float(self._mpp_override)
        value = self.properties.get("openslide.mpp-x")
        return float(value) if value not in (None, "") else None

    def require_mpp(self) -> float:
        """Level-0 microns per pixel, or a :class:`MetadataError` that says how to supply it.

        Refuses a missing or implausible value (e.g. a 72-dpi default tag) and non-square pixels
        (x and y differing by more than 1 %), which the tiling does not handle.
        """
        mpp = self.mpp
        if mpp is None:
            raise MetadataError(f"{self.path}: no mpp in metadata or TIFF tags; pass --mpp")
        if self._mpp_override is not None:
            return mpp  # validated by open_slide; the user's word wins
        if not mpp_plausible(mpp):
            raise MetadataError(
                f"{self.path}: metadata says {mpp:.4g} µm/px, not a microscope scan "
                f"(expected {MPP_PLAUSIBLE_MIN} to {MPP_PLAUSIBLE_MAX} µm/px); pass --mpp"
            )
        mpp_y = self.properties.get("openslide.mpp-y")
        if mpp_y not in (None, "") and abs(float(mpp_y) - mpp) > 0.01 * mpp:
            raise MetadataError(f"{self.path}: non-square pixels ({mpp:.4g} x {float(mpp_y):.4g} µm) are not supported; "
                                "pass --mpp to treat them as square")
        return mpp

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int], *, device: Device = "cpu") -> Any:
        """RGB pixels of a region; areas outside the level are white (glass).

        Parameters
        ----------
        location : (x, y) level-0 px of the top-left corner (may be negative).
        level : pyramid level to read.
        size : (width, height) px at ``level``.
        device : ``cpu`` returns NumPy; ``cuda`` returns CuPy (decoded on the GPU by cuCIM,
            copied up once for host-decoding backends).

        Returns
        -------
        (height, width, 3) uint8 array.
        """
        w, h = self._check_region(level, size)
        ds = self.level_downsamples[level]
        x_lvl, y_lvl = level_px(location[0], ds), level_px(location[1], ds)
        on_device = device == "cuda" and isinstance(self._reader, CucimReader)
        out = self._rect(level, x_lvl, y_lvl, w, h, "cuda" if on_device else "cpu")
        return device_module("cuda").asarray(out) if device == "cuda" and not on_device else out

    def _read_clipped(self, level: int, x_lvl: int, y_lvl: int, w: int, h: int,
                      device: Device) -> tuple[Any, tuple[int, int, int, int]]:
        """Decode the part of a level-px rectangle that lies inside the level.

        Returns (pixels or None when nothing is inside, (r0, r1, c0, c1) where they go in the
        requested rectangle). The single place requests are clipped to a level's bounds.
        """
        lw, lh = self.level_dimensions[level]
        c0, c1 = max(x_lvl, 0), min(x_lvl + w, lw)
        r0, r1 = max(y_lvl, 0), min(y_lvl + h, lh)
        if c1 <= c0 or r1 <= r0:
            return None, (0, 0, 0, 0)
        pixels = self._reader.read_rgb(level, c0, r0, c1 - c0, r1 - r0, device=device)
        return pixels, (r0 - y_lvl, r1 - y_lvl, c0 - x_lvl, c1 - x_lvl)

    def read_tiles(self, locations: Sequence[tuple[int, int]], level: int, size_px: int, *,
                   device: Device = "cpu", num_workers: int = 1) -> TileBatch:
        """Decode square regions of one level into a :class:`TileBatch`.

        Parameters
        ----------
        locations : level-0 (x, y) top-left corners, one per tile.
        level : pyramid level to read.
        size_px : tile edge, px at ``level``.
        device : ``cpu`` (NumPy pixels) or ``cuda`` (CuPy pixels; cuCIM decodes on the device).
        num_workers : cuCIM decoder threads of device reads.

        Returns
        -------
        TileBatch with (N, size_px, size_px, 3) uint8 pixels; areas outside the slide are white.
        On the device, cuCIM's batched multi-threaded reader decodes the tiles wholly inside the level.
        On the host, cuCIM and tifffile slides are assembled from a :class:`FileTileCache` of decoded
        file tiles (each file tile decoded once for neighbouring tiles; the same pixels as direct reads).
        """
        on_device = isinstance(self._reader, CucimReader) and device == "cuda"
        if device == "cuda":
            device_module("cuda")  # fail before decoding anything when no device is usable
        ds = self.level_downsamples[level]
        lvl = [(level_px(x, ds), level_px(y, ds)) for x, y in locations]
        if on_device:
            out = self._read_on_device(lvl, level, size_px, num_workers)
        else:
            out = self._read_on_host(lvl, level, size_px)
        if device == "cuda" and not on_device:
            out = device_module("cuda").asarray(out)  # host decoder (OpenSlide/tifffile): one upload per batch
        return TileBatch(
            pixels=out,
            x=np.array([x for x, _ in locations], np.int64).reshape(-1),
            y=np.array([y for _, y in locations], np.int64).reshape(-1),
            size_l0_px=int(round(size_px * ds)),
        )

    def _read_on_device(self, lvl: list[tuple[int, int]], level: int, size_px: int, num_workers: int) -> Any:
        """cuCIM onto the device: squares wholly inside the level through its batched multi-threaded reader
        (nvJPEG), the others one by one with white fill."""
        cp = device_module("cuda")
        out = cp.empty((len(lvl), size_px, size_px, 3), np.uint8)
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        inner = [i for i, (c, r) in enumerate(lvl) if c >= 0 and r >= 0 and c + size_px <= lw and r + size_px <= lh]
        if len(inner) > 1:
            locs_l0 = [(level0_origin(lvl[i][0], ds), level0_origin(lvl[i][1], ds)) for i in inner]
            out[inner] = self._reader.read_batch(level, locs_l0, size_px, size_px, device="cuda", num_workers=num_workers)
        done = set(inner) if len(inner) > 1 else set()
        for i, (c, r) in enumerate(lvl):
            if i not in done:
                out[i] = self._rect(level, c, r, size_px, size_px, "cuda")
        return out

    def _read_on_host(self, lvl: list[tuple[int, int]], level: int, size_px: int) -> np.ndarray:
        """Squares of level px on the host, white outside the level: assembled from the file-tile cache
        where it covers the level, else read one by one."""
        out = np.empty((len(lvl), size_px, size_px, 3), np.uint8)
        if self._tile_cache is None or not self._tile_cache.covers(level):
            for i, (c, r) in enumerate(lvl):
                out[i] = self._rect(level, c, r, size_px, size_px, "cpu")
            return out
        lw, lh = self.level_dimensions[level]
        rects, views = [], []
        for i, (c, r) in enumerate(lvl):
            c0, c1, r0, r1 = max(c, 0), min(c + size_px, lw), max(r, 0), min(r + size_px, lh)
            if (c1 - c0, r1 - r0) != (size_px, size_px):
                out[i] = 255  # glass outside the level
            if c1 > c0 and r1 > r0:
                rects.append((c0, r0, c1 - c0, r1 - r0))
                views.append(out[i, r0 - r:r1 - r, c0 - c:c1 - c])
        self._tile_cache.fill(level, rects, views)
        return out

    def _rect(self, level: int, x_lvl: int, y_lvl: int, w: int, h: int, device: Device) -> Any:
        """A rectangle of level px read directly by the reader, white outside the level."""
        pixels, (r0, r1, c0, c1) = self._read_clipped(level, x_lvl, y_lvl, w, h, device)
        if pixels is not None and pixels.shape[:2] == (h, w):
            return pixels
        out = device_module(device).full((h, w, 3), 255, np.uint8)
        if pixels is not None:
            out[r0:r1, c0:c1] = pixels
        return out

    def _check_region(self, level: int, size: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range [0, {self.level_count})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {size}")
        return w, h

    # ------------------------------------------------------------------ OpenSlide API
    @property
    def level_count(self) -> int:
        return len(self._reader.level_dims)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0, px."""
        return self._reader.level_dims[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._reader.level_dims)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._reader.level0_downsamples)

    @property
    def properties(self) -> Mapping[str, str]:
        """Metadata with OpenSlide's keys (``openslide.vendor``, ``openslide.mpp-x``, ...)."""
        if self._properties is None:
            self._properties = MappingProxyType(self._build_properties())
        return self._properties

    def _build_properties(self) -> dict[str, str]:
        if isinstance(self._reader, OpenSlideReader):
            props = dict(self._reader.osr.properties)
        else:
            layout = self._layout
            assert layout is not None  # cuCIM/tifffile readers are only built from a TIFF layout
            props = dict(layout.properties)
            props["openslide.vendor"] = layout.vendor
            if layout.mpp is not None:
                props["openslide.mpp-x"], props["openslide.mpp-y"] = (repr(v) for v in layout.mpp)
            props["openslide.level-count"] = str(self.level_count)
            for i, ((w, h), (tw, th), ds) in enumerate(
                zip(self.level_dimensions, self._reader.tile_dims, self.level_downsamples)
            ):
                props[f"openslide.level[{i}].width"] = str(w)
                props[f"openslide.level[{i}].height"] = str(h)
                props[f"openslide.level[{i}].downsample"] = repr(ds)
                props[f"openslide.level[{i}].tile-width"] = str(tw)
                props[f"openslide.level[{i}].tile-height"] = str(th)
        if self._mpp_override is not None:
            props["openslide.mpp-x"] = props["openslide.mpp-y"] = repr(float(self._mpp_override))
        props["gpupath.backend"] = self.backend
        return props

    @property
    def associated_images(self) -> Mapping[str, Any]:
        """Label, macro, thumbnail... as PIL RGBA images (read lazily)."""
        if isinstance(self._reader, OpenSlideReader):
            return self._reader.osr.associated_images
        layout = self._layout
        return _LazyAssociated(self.path, dict(layout.associated) if layout else {})

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        """OpenSlide's read_region: a PIL RGBA image, transparent (0, 0, 0, 0) outside the level."""
        from PIL import Image

        w, h = self._check_region(level, size)
        if isinstance(self._reader, OpenSlideReader):
            return self._reader.read_rgba((int(location[0]), int(location[1])), level, (w, h))
        ds = self.level_downsamples[level]
        pixels, (r0, r1, c0, c1) = self._read_clipped(level, level_px(location[0], ds), level_px(location[1], ds),
                                                      w, h, "cpu")
        rgba = np.zeros((h, w, 4), np.uint8)  # transparent outside the level, as OpenSlide
        if pixels is not None:
            rgba[r0:r1, c0:c1, :3] = pixels
            rgba[r0:r1, c0:c1, 3] = 255
        return Image.fromarray(rgba, "RGBA")

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """Largest level whose downsample is <= ``downsample`` (OpenSlide's rule)."""
        downsamples = self.level_downsamples
        if downsample < downsamples[0]:
            return 0
        for i in range(1, len(downsamples)):
            if downsample < downsamples[i]:
                return i - 1
        return len(downsamples) - 1

    def get_thumbnail(self, size: tuple[int, int]) -> Any:
        """An RGB PIL image fitting in ``size`` (width, height), made as OpenSlide makes it."""
        from PIL import Image

        downsample = max(dim / thumb for dim, thumb in zip(self.dimensions, size))
        level = self.get_best_level_for_downsample(downsample)
        tile = self.read_region((0, 0), level, self.level_dimensions[level])
        background = "#" + self.properties.get("openslide.background-color", "ffffff")
        thumb = Image.new("RGB", tile.size, background)
        thumb.paste(tile, None, tile)
        thumb.thumbnail(size, Image.Resampling.LANCZOS)
        return thumb

    def close(self) -> None:
        if self._tile_cache is not None:
            self._tile_cache.clear()
        self._reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions})"


class _LazyAssociated(Mapping[str, Any]):
    """Associated images of a TIFF slide, decoded with tifffile on first access."""

    def __init__(self, path: Path, pages: dict[str, int]) -> None:
        self._path, self._pages = path, pages

    def __getitem__(self, name: str) -> Any:
        import tifffile
        from PIL import Image

        with tifffile.TiffFile(self._path) as tf:
            rgb = tf.pages[self._pages[name]].asarray()[..., :3]
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("RGBA")

    def __iter__(self) -> Iterator[str]:
        return iter(self._pages)

    def __len__(self) -> int:
        return len(self._pages)


def check_slide_file(path: Path) -> None:
    """Raise :class:`SlideReadError` when ``path`` is missing, a broken link or a symlink loop, a folder, not
    a regular file (FIFO, device), empty, or unreadable (permission) - one sentence naming the file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise SlideReadError(f"{path}: broken symbolic link (to {os.readlink(path)})") from None
        raise SlideReadError(f"{path}: no such file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SlideReadError(f"{path}: symlink loop (the link resolves to itself)") from None
        raise SlideReadError(f"{path}: cannot read its status: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SlideReadError(f"{path}: is a folder, not a slide file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file"
        raise SlideReadError(f"{path}: {kind}, not a slide file")
    if st.st_size == 0:
        raise SlideReadError(f"{path}: file is empty (0 bytes)")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise SlideReadError(f"{path}: not readable (permission denied)") from None
    except OSError as exc:
        raise SlideReadError(f"{path}: cannot open it: {exc.strerror or exc}") from None


def _probe_tiff(path: Path, layout: TiffLayout) -> tuple[str | None, np.ndarray | None]:
    """Decode a probe region of the smallest level with tifffile.

    Returns (why it fails or None, the probe pixels). cuCIM prints JPEG errors and returns
    garbage instead of raising, so a slide goes to cuCIM only after its probe decodes cleanly
    here, and cuCIM's own decode of the same region agrees (see :func:`_cucim_agrees`).
    """
    try:
        reader = TifffileReader(path, layout)
    except SlideReadError as exc:
        return str(exc).removeprefix(f"{path}: "), None
    with contextlib.closing(reader):
        level = len(layout.level_dims) - 1
        w, h = (min(v, _PROBE_PX) for v in layout.level_dims[level])
        return None, reader.read_rgb(level, 0, 0, w, h, device="cpu")


def _cucim_agrees(reader: CucimReader, probe: np.ndarray) -> str | None:
    """Why cuCIM's pixels differ from libjpeg's for the probe region (None when they agree).

    Seen on real files: JPEG tiles with a JFIF (YCbCr) marker in a TIFF that says RGB; cuCIM
    skips the colour conversion and returns false colours without an error.
    """
    level = len(reader.level_dims) - 1
    h, w = probe.shape[:2]
    got = np.asarray(reader.read_rgb(level, 0, 0, w, h, device="cpu"))
    diff = int(np.abs(got.astype(np.int16) - probe.astype(np.int16)).max())
    if diff > DECODER_TOLERANCE:
        return f"decodes colours unlike libjpeg (max diff {diff} on a probe tile; YCbCr JPEG in an RGB TIFF?)"
    return None


def _tiff_cut(path: Path) -> str | None:
    """Why a TIFF-family file is truncated, or None (also when it cannot be checked)."""
    try:
        problem = tiff_truncation(path)
    except OSError:
        return None
    return problem if problem and problem.startswith("truncated") else None


def _cucim_installed() -> bool:
    try:
        import_cucim()
    except ImportError:
        return False
    return True


def _read_layout(path: Path) -> tuple[TiffLayout | None, str]:
    """The file's TIFF layout and, when there is none, why: "not a TIFF file", or the parse error
    (without the leading path)."""
    tiff_problem = "not a TIFF file"
    try:
        layout = read_tiff_layout(path)
    except SlideReadError as exc:
        layout, tiff_problem = None, str(exc).removeprefix(f"{path}: ")
    return layout, tiff_problem


def _try_cucim(path: Path, layout: TiffLayout | None, tiff_problem: str, reasons: list[str]) -> Reader | None:
    """A cuCIM reader, or None with the reason appended to ``reasons``: not a (readable) TIFF, cuCIM
    not installed, a refusal by :func:`cucim_refusal` or the probe, an open error, or colours unlike
    libjpeg's on the probe tile (the reader is closed again)."""
    if layout is None:
        reasons.append("cuCIM: not a TIFF" if tiff_problem == "not a TIFF file" else "cuCIM: unreadable TIFF")
        return None
    if not _cucim_installed():
        reasons.append("cuCIM: not installed (pip install 'gpupath[cucim]')")
        return None
    refusal, probe = cucim_refusal(layout), None
    if refusal is None:
        refusal, probe = _probe_tiff(path, layout)
    if refusal is None:
        try:
            reader = CucimReader(path, layout)
        except SlideReadError as exc:
            refusal = str(exc).removeprefix(f"{path}: ")
        else:
            try:
                refusal = _cucim_agrees(reader, probe)
            except SlideReadError as exc:
                refusal = str(exc).removeprefix(f"{path}: ")
            if refusal is None:
                return reader
            reader.close()
    reasons.append(f"cuCIM: {refusal}")
    return None


def _try_openslide(path: Path, reasons: list[str]) -> Reader | None:
    """An OpenSlide reader, or None with OpenSlide's reason appended to ``reasons``."""
    try:
        return OpenSlideReader(path)
    except SlideReadError as exc:
        reasons.append(f"OpenSlide: {str(exc).removeprefix(f'{path}: ')}")
        return None


def _try_tifffile(path: Path, layout: TiffLayout | None, tiff_problem: str, reasons: list[str]) -> Reader | None:
    """A tifffile reader, or None with the reason (no TIFF layout, or the open error) appended to ``reasons``."""
    if layout is None:
        reasons.append(f"tifffile: {tiff_problem}")
        return None
    try:
        return TifffileReader(path, layout)
    except SlideReadError as exc:
        reasons.append(f"tifffile: {str(exc).removeprefix(f'{path}: ')}")
        return None


def _backend_order(backend: BackendName, path: Path, layout: TiffLayout | None) -> list[str]:
    """The backends to try, in order: ``auto`` is cuCIM, OpenSlide, tifffile (tifffile before
    OpenSlide for an OME-TIFF); a named backend alone."""
    order = ["cucim", "openslide", "tifffile"] if backend == "auto" else [backend]
    if backend == "auto" and layout is not None and layout.is_ome and _is_ome_path(path):
        order = ["cucim", "tifffile", "openslide"]  # OpenSlide ignores OME-XML (no mpp) or refuses
    return order


def open_slide(path: str | os.PathLike[str], *, backend: BackendName = "auto", mpp: float | None = None,
               tile_cache_mib: float | None = None) -> Slide:
    """Open a whole-slide image with the best reader for the file.

    Parameters
    ----------
    path : slide file (.svs, .ndpi, .tif/.tiff, .ome.tif, .scn, .mrxs, .dcm, ...).
    backend : ``auto`` (cuCIM -> OpenSlide -> tifffile, chosen per file, each fallback logged
        with its reason) or one backend by name.
    mpp : level-0 microns per pixel to use instead of the file's metadata (for slides whose
        metadata lacks it or is wrong).
    tile_cache_mib : memory for decoded file tiles that :meth:`Slide.read_tiles` shares between
        neighbouring tiles on the host (default: three rows of file tiles across the widest level,
        16-256 MiB; 0: none, every tile decodes its own file tiles).

    Returns
    -------
    Slide

    Raises
    ------
    SlideReadError
        Missing, empty or unreadable file, or no backend can open it; the message names the
        file and each backend's reason.
    ValueError
        Unknown ``backend`` or non-positive ``mpp``.
    """
    if backend not in ("auto", "cucim", "openslide", "tifffile"):
        raise ValueError(f"backend must be auto, cucim, openslide or tifffile, got {backend!r}")
    if mpp is not None and not mpp_plausible(mpp):
        raise ValueError(f"mpp must be in [{MPP_PLAUSIBLE_MIN}, {MPP_PLAUSIBLE_MAX}] µm/px, got {mpp!r}")
    if tile_cache_mib is not None and not tile_cache_mib >= 0:
        raise ValueError(f"tile_cache_mib must be >= 0, got {tile_cache_mib!r}")
    path = Path(path)
    check_slide_file(path)
    reasons: list[str] = []
    layout, tiff_problem = _read_layout(path)
    if layout is None and tiff_problem.startswith(("corrupt:", "truncated")):
        raise SlideReadError(f"{path}: {tiff_problem}")  # no reader may paper over a damaged structure
    if layout is not None and layout.truncated:
        raise SlideReadError(f"{path}: truncated: pixel data runs to byte {layout.data_end_bytes}, the file has "
                             f"{layout.file_bytes} bytes")
    attempts: dict[str, Callable[[], Reader | None]] = {
        "cucim": lambda: _try_cucim(path, layout, tiff_problem, reasons),
        "openslide": lambda: _try_openslide(path, reasons),
        "tifffile": lambda: _try_tifffile(path, layout, tiff_problem, reasons),
    }
    for name in _backend_order(backend, path, layout):
        reader = attempts[name]()
        if reader is not None:
            if reasons:
                log.info("%s: using %s (%s)", path, reader.name, "; ".join(reasons))
            return Slide(path, reader, layout, mpp, None if tile_cache_mib is None else int(tile_cache_mib * 2**20))
    if layout is None and (cut := _tiff_cut(path)):  # a cut TIFF: say so first, the readers' reasons after
        raise SlideReadError(f"{path}: {cut} (readers: {'; '.join(reasons)})")
    raise SlideReadError(f"{path}: not a readable slide ({'; '.join(reasons)})")


CHECK_TILE_PX = 256  # edge of the region decoded at each level by describe_slide


def describe_slide(path: str | os.PathLike[str], *, backend: BackendName = "auto", mpp: float | None = None) -> dict:
    """What ``gpupath info`` shows of a slide: backend, vendor, dimensions, mpp, objective, levels,
    associated images; after decoding the first ``CHECK_TILE_PX`` square of every level, so a slide whose
    tiles cannot be decoded fails here (SlideReadError naming the level) instead of looking fine.

    Raises
    ------
    SlideReadError, MetadataError, ValueError
        As :func:`open_slide`, or a level whose first tile does not decode.
    """
    with open_slide(path, backend=backend, mpp=mpp) as s:
        for level, (w, h) in enumerate(s.level_dimensions):
            try:
                s.read_rgb((0, 0), level, (min(w, CHECK_TILE_PX), min(h, CHECK_TILE_PX)))
            except SlideReadError:
                raise
            except Exception as exc:
                raise SlideReadError(f"{path}: level {level}: its first tile does not decode: "
                                     f"{type(exc).__name__}: {exc}") from exc
        return {
            "path": str(path), "backend": s.backend, "vendor": s.vendor, "dimensions": s.dimensions,
            "mpp": s.mpp, "objective_power": s.properties.get("openslide.objective-power"),
            "levels": [{"level": i, "width": w, "height": h, "downsample": ds, "mpp": None if s.mpp is None else s.mpp * ds}
                       for i, ((w, h), ds) in enumerate(zip(s.level_dimensions, s.level_downsamples))],
            "associated_images": sorted(s.associated_images),
        }
