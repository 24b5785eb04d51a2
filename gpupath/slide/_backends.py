"""Reader backends: cuCIM, OpenSlide and tifffile behind one narrow interface.

Each reader decodes an RGB rectangle that lies inside one pyramid level, given in that level's
pixel coordinates. Clipping, out-of-slide fill, the OpenSlide-compatible API and level choice
live in :mod:`gpupath.slide._slide`, once for all readers.

Device: the cuCIM reader can decode straight into GPU memory (``device="cuda"``); the
others decode on the host.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gpupath._coords import level0_origin, pyramid_downsamples
from gpupath.errors import SlideReadError
from gpupath.slide._jpeg import TileGuard
from gpupath.slide._meta import TiffLayout

__all__ = ["Reader", "CucimReader", "OpenSlideReader", "TifffileReader", "import_cucim"]

log = logging.getLogger("gpupath.slide")
DEVICE_PROBE_PX = 256        # edge of the region decoded on both devices before cuCIM's GPU decode is trusted
DECODER_TOLERANCE = 8        # grey levels two sound JPEG decoders (IDCT, upsampling) may differ by


class Reader(Protocol):
    """What a backend provides. Coordinates are pixels of ``level``; the rectangle is inside it."""

    name: str
    level_dims: tuple[tuple[int, int], ...]
    tile_dims: tuple[tuple[int, int], ...]
    level0_downsamples: tuple[float, ...]

    def read_rgb(self, level: int, x_lvl: int, y_lvl: int, w: int, h: int, *, device: str) -> Any: ...

    def close(self) -> None: ...


class OpenSlideReader:
    """OpenSlide: NDPI, MRXS, SCN, VMS, BIF, DICOM, Philips, generic TIFF, Aperio."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        try:
            self.osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"{path}: OpenSlide cannot open it: {exc}") from exc
        self.path = path
        self.level_dims = tuple(self.osr.level_dimensions)
        self.level0_downsamples = tuple(self.osr.level_downsamples)
        props = self.osr.properties
        self.tile_dims = tuple(
            (
                int(props.get(f"openslide.level[{i}].tile-width", 256)),
                int(props.get(f"openslide.level[{i}].tile-height", 256)),
            )
            for i in range(self.osr.level_count)
        )

    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        """OpenSlide's own read_region (PIL RGBA), bit-exact semantics."""
        import openslide

        try:
            return self.osr.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"{self.path}: OpenSlide cannot decode level {level} at {location}: {exc}") from exc

    def read_rgb(self, level: int, x_lvl: int, y_lvl: int, w: int, h: int, *, device: str) -> np.ndarray:
        ds = self.level0_downsamples[level]
        rgba = np.asarray(self.read_rgba((level0_origin(x_lvl, ds), level0_origin(y_lvl, ds)), level, (w, h)))
        rgb = rgba[..., :3]
        alpha = rgba[..., 3:]
        if alpha.min() < 255:  # composite transparent areas (sparse scans) onto white glass
            rgb = (rgb.astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16))) // 255
            rgb = rgb.astype(np.uint8)
        return np.ascontiguousarray(rgb)

    def close(self) -> None:
        self.osr.close()


_NVIDIA_NODES = ("/dev/nvidiactl", "/dev/nvidia0")


def import_cucim() -> Any:
    """cuCIM's ``CuImage`` class (ImportError when cuCIM is not installed).

    cuCIM imports CuPy at import when CuPy is installed (and preloads cuSOLVER through it): about
    240 MiB of resident memory (measured: 31 MiB for cuCIM alone, 267 MiB with CuPy) that its CPU
    reader never uses. On a machine with no NVIDIA device node, where no device read can happen,
    cuCIM is imported as on a CPU-only install: CuPy is hidden from that one import (cuCIM's own
    ``try: import cupy`` branch), and imports normally afterwards for whoever asks.
    """
    if "cucim" not in sys.modules and "cupy" not in sys.modules and not any(Path(p).exists() for p in _NVIDIA_NODES):
        sys.modules["cupy"] = None  # type: ignore[assignment]  # makes `import cupy` raise ImportError
        try:
            import cucim  # noqa: F401
        finally:
            del sys.modules["cupy"]
    from cucim import CuImage

    return CuImage


def _guard_margin(downsample: float) -> int:
    """Level px of margin around a request for the tile check: cuCIM maps level-0 origins to level px in
    float32 and may land one px left of (or above) ours where the downsample is not a whole number."""
    return 0 if float(downsample).is_integer() else 1


class CucimReader:
    """cuCIM's cuslide reader: tiled JPEG TIFF pyramids, decoded on the CPU or into GPU memory."""

    name = "cucim"

    def __init__(self, path: Path, layout: TiffLayout) -> None:
        try:
            self.img = import_cucim()(str(path))
        except Exception as exc:  # cuCIM raises RuntimeError/ValueError variously
            raise SlideReadError(f"{path}: cuCIM cannot open it: {exc}") from exc
        res = self.img.resolutions
        self.path = path
        self.level_dims = tuple((int(w), int(h)) for w, h in res["level_dimensions"])
        if self.level_dims != layout.level_dims:
            raise SlideReadError(
                f"{path}: cuCIM sees levels {self.level_dims}, the TIFF holds {layout.level_dims}"
            )
        self.tile_dims = tuple((int(w), int(h)) for w, h in res["level_tile_sizes"])
        self.level0_downsamples = pyramid_downsamples(self.level_dims)
        try:  # cuCIM decodes a corrupt JPEG tile to garbage without raising: check each tile's structure first
            self.guard = TileGuard(path, layout.level_pages)
        except BaseException as exc:
            self.img.close()
            if isinstance(exc, Exception) and not isinstance(exc, SlideReadError):
                raise SlideReadError(f"{path}: cannot index its JPEG tiles for checking: {exc}") from exc
            raise
        self._device_decode_ok: bool | None = None  # None until the first device read compares it with the host

    def device_decode_ok(self) -> bool:
        """Whether cuCIM's GPU decode (nvJPEG) gives the CPU decode's pixels on a probe region.

        cuCIM's device path decodes with nvJPEG, which does not take the TIFF's colour space the way
        its libjpeg path does; a mismatch (e.g. RGB-coded JPEG tiles without an Adobe marker, read as
        YCbCr) would be false colours without an error. Checked once, at the first device read; on a
        mismatch the device reads decode on the CPU and upload (one warning).
        """
        if self._device_decode_ok is None:
            import cupy

            level = len(self.level_dims) - 1
            w, h = (min(v, DEVICE_PROBE_PX) for v in self.level_dims[level])
            self.guard.check(level, 0, 0, w + 1, h + 1)
            try:
                host = np.asarray(self.img.read_region((0, 0), (w, h), level, device="cpu"))
                dev = cupy.asnumpy(cupy.asarray(self.img.read_region((0, 0), (w, h), level, device="cuda")))
            except Exception as exc:
                raise SlideReadError(f"{self.path}: cuCIM cannot decode the probe region on the GPU: {exc}") from exc
            diff = int(np.abs(host.astype(np.int16) - dev.astype(np.int16)).max()) if host.shape == dev.shape else 255
            self._device_decode_ok = diff <= DECODER_TOLERANCE
            if not self._device_decode_ok:
                log.warning("%s: cuCIM's GPU decode differs from its CPU decode by up to %d grey levels on a probe "
                            "region; tiles are decoded on the CPU and uploaded", self.path, diff)
        return self._device_decode_ok

    def read_rgb(self, level: int, x_lvl: int, y_lvl: int, w: int, h: int, *, device: str) -> Any:
        ds = self.level0_downsamples[level]
        loc = (level0_origin(x_lvl, ds), level0_origin(y_lvl, ds))
        m = _guard_margin(ds)
        self.guard.check(level, x_lvl - m, y_lvl - m, w + 2 * m, h + 2 * m)
        if device == "cuda" and not self.device_decode_ok():
            import cupy

            return cupy.asarray(self.read_rgb(level, x_lvl, y_lvl, w, h, device="cpu"))  # host decode, one upload
        try:
            region = self.img.read_region(loc, (w, h), level, device=device)
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cuCIM cannot decode level {level} at {loc}: {exc}") from exc
        if device == "cuda":
            import cupy

            return cupy.asarray(region)  # zero-copy via __cuda_array_interface__
        return np.asarray(region)

    def read_batch(self, level: int, locations_l0: list[tuple[int, int]], w: int, h: int, *, device: str,
                   num_workers: int) -> Any:
        """Decode many same-size in-bounds regions with cuCIM's batched, multi-threaded reader."""
        ds = self.level0_downsamples[level]
        m = _guard_margin(ds)
        for x0, y0 in locations_l0:  # level px of a level-0 origin: floor, with the margin as in read_rgb
            self.guard.check(level, int(x0 // ds) - m, int(y0 // ds) - m, w + 2 * m, h + 2 * m)
        if device == "cuda" and not self.device_decode_ok():
            import cupy

            return cupy.asarray(self.read_batch(level, locations_l0, w, h, device="cpu", num_workers=num_workers))
        try:
            batches = self.img.read_region(
                locations_l0, (w, h), level, batch_size=len(locations_l0),
                num_workers=num_workers, device=device,
            )
            (batch,) = list(batches)
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cuCIM batched read failed on level {level}: {exc}") from exc
        if device == "cuda":
            import cupy

            return cupy.asarray(batch)
        return np.asarray(batch)

    def close(self) -> None:
        try:
            self.img.close()
        finally:
            self.guard.close()


class TifffileReader:
    """tifffile + imagecodecs: any tiled or stripped TIFF/OME-TIFF, decoded tile by tile.

    Only the tiles that overlap a request are read and decoded, so memory stays bounded by
    the request size whatever the slide size.
    """

    name = "tifffile"

    def __init__(self, path: Path, layout: TiffLayout) -> None:
        import tifffile

        try:
            self.tf = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError) as exc:
            raise SlideReadError(f"{path}: tifffile cannot open it: {exc}") from exc
        self.path = path
        self.level_dims = layout.level_dims
        self.tile_dims = layout.tile_dims
        self.level0_downsamples = pyramid_downsamples(self.level_dims)
        self._lock = threading.Lock()  # the file handle is shared: seek+read under the lock
        try:
            self._check(layout)
        except BaseException:
            self.tf.close()
            raise

    def _check(self, layout: TiffLayout) -> None:
        """Refuse what this reader cannot decode, and decode one tile now, so an undecodable file
        fails at open, not mid-run."""
        if layout.truncated:
            raise SlideReadError(f"{self.path}: truncated file: tile data runs to byte {layout.data_end_bytes}, "
                                 f"file has {layout.file_bytes}")
        self.pages = [self.tf.pages[i] for i in layout.level_pages]
        for page in self.pages:
            if page.samplesperpixel not in (3, 4) or page.bitspersample != 8:
                raise SlideReadError(f"{self.path}: page {page.index} has {page.samplesperpixel} samples of "
                                     f"{page.bitspersample} bits; expected 8-bit RGB")
        level = len(self.level_dims) - 1
        self.read_rgb(level, 0, 0, min(self.level_dims[level][0], 16), min(self.level_dims[level][1], 16), device="cpu")

    def _segment(self, page: Any, index: int) -> np.ndarray | None:
        nbytes = int(page.databytecounts[index])
        if nbytes == 0:
            return None  # sparse TIFF: tile absent
        with self._lock:
            fh = self.tf.filehandle
            fh.seek(int(page.dataoffsets[index]))
            data = fh.read(nbytes)
        try:
            seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # imagecodecs raises codec-specific errors
            raise SlideReadError(f"{self.path}: cannot decode tile {index} of page {page.index}: {exc}") from exc
        return seg.reshape(seg.shape[-3:])

    def read_rgb(self, level: int, x_lvl: int, y_lvl: int, w: int, h: int, *, device: str) -> np.ndarray:
        page = self.pages[level]
        tw, th = self.tile_dims[level]
        img_w, _ = self.level_dims[level]
        out = np.full((h, w, 3), 255, np.uint8)
        tiles_across = -(-img_w // tw) if page.is_tiled else 1
        for ty in range(y_lvl // th, (y_lvl + h - 1) // th + 1):
            for tx in range(x_lvl // tw, (x_lvl + w - 1) // tw + 1):
                seg = self._segment(page, ty * tiles_across + tx)
                if seg is None:
                    continue
                # intersection of the tile and the request, in level px
                c0, c1 = max(x_lvl, tx * tw), min(x_lvl + w, (tx + 1) * tw)
                r0, r1 = max(y_lvl, ty * th), min(y_lvl + h, (ty + 1) * th)
                part = seg[r0 - ty * th : r1 - ty * th, c0 - tx * tw : c1 - tx * tw, :3]
                out[r0 - y_lvl : r0 - y_lvl + part.shape[0], c0 - x_lvl : c0 - x_lvl + part.shape[1]] = part
        return out

    def close(self) -> None:
        self.tf.close()
