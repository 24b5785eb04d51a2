"""Convert's parameters and result, and the per-tile pieces the host and device paths share.

:class:`ConvertParams`, :class:`ConvertResult`, :func:`pyramid_dimensions` (width, height px per
level), the host tile encoders (imagecodecs, as tifffile would encode them), the TIFF write
arguments, cutting (h, w, 3) rows into (T, T, 3) tiles and the integer 2 x 2 mean that makes each
reduced level (NumPy or CuPy in, same module out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import imagecodecs
import numpy as np

from gpupath._version import __version__
from gpupath._xp import array_module
from gpupath.errors import ConfigError
from gpupath.slide import BackendName

Compression = Literal["jpeg", "jpeg2000", "deflate"]
StainMethod = Literal["none", "macenko", "vahadane"]
ConvertDevice = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True, slots=True)
class ConvertParams:
    """How to write the OME-TIFF.

    Parameters
    ----------
    tile_px : TIFF tile edge, px (a multiple of 16 in [64, 4096]; 256 or 512 are usual).
    compression : ``jpeg`` (YCbCr 4:2:0, as tifffile writes it), ``jpeg2000`` or ``deflate`` (lossless).
    quality : JPEG / JPEG 2000 quality 1-100, or Deflate level 1-9 (default 90; 6 for Deflate if above 9).
    stain : ``none``, ``macenko`` or ``vahadane`` normalisation of every pixel.
    mpp : level-0 µm/px to write instead of the source's (required when the source has none).
    backend : slide reader (``auto`` as ``run``).
    workers : encoder threads (default: usable CPUs, at most 16).
    device : ``auto`` (GPU when usable, else the CPU; a warning only when a GPU is there but its JPEG
        encoder fails a test tile), ``cpu`` or ``cuda``
        (pyramid and JPEG encode on the GPU; ConfigError at conversion when no GPU is usable).
    """

    tile_px: int = 256
    compression: Compression = "jpeg"
    quality: int = 90
    stain: StainMethod = "none"
    mpp: float | None = None
    backend: BackendName = "auto"
    workers: int | None = None
    device: ConvertDevice = "auto"

    def __post_init__(self) -> None:
        if not (isinstance(self.tile_px, int) and self.tile_px % 16 == 0 and 64 <= self.tile_px <= 4096):
            raise ConfigError(f"tile_px must be a multiple of 16 in [64, 4096], got {self.tile_px!r}")
        if self.compression not in ("jpeg", "jpeg2000", "deflate"):
            raise ConfigError(f"compression must be jpeg, jpeg2000 or deflate, got {self.compression!r}")
        if not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise ConfigError(f"quality must be an int in [1, 100], got {self.quality!r}")
        if self.stain not in ("none", "macenko", "vahadane"):
            raise ConfigError(f"stain must be none, macenko or vahadane, got {self.stain!r}")
        if self.mpp is not None and not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise ConfigError(f"mpp must be a positive number of µm/px, got {self.mpp!r}")
        if self.workers is not None and not (isinstance(self.workers, int) and self.workers >= 1):
            raise ConfigError(f"workers must be an int >= 1, got {self.workers!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What :func:`convert_slide` wrote."""

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]   # (width, height) px per level, level 0 first
    mpp: float                                      # level-0 µm/px written
    seconds: float                                  # wall time, s
    stain: str = "none"
    warnings: tuple[str, ...] = field(default_factory=tuple)
    device: str = "cpu"                             # where the pyramid was built and JPEG encoded

    @property
    def megapixels_per_s(self) -> float:
        """Level-0 megapixels converted per second of wall time."""
        w, h = self.level_dimensions[0]
        return w * h / 1e6 / max(self.seconds, 1e-9)


def pyramid_dimensions(width_px: int, height_px: int, tile_px: int) -> list[tuple[int, int]]:
    """(width, height) px of each level: halved (rounded up) until one ``tile_px`` tile holds it."""
    dims = [(int(width_px), int(height_px))]
    while max(dims[-1]) > tile_px:
        w, h = dims[-1]
        dims.append(((w + 1) // 2, (h + 1) // 2))
    return dims


# ---------------------------------------------------------------------------------------- encoding
def encoder(params: ConvertParams) -> Callable[[np.ndarray], bytes]:
    """Tile (T, T, 3) uint8 -> bytes, exactly as tifffile would encode it with the same tags."""
    q = params.quality
    if params.compression == "jpeg":
        return lambda tile: imagecodecs.jpeg_encode(tile, level=q, subsampling=(2, 2), colorspace="RGB",
                                                    outcolorspace="YCBCR")
    if params.compression == "jpeg2000":
        return lambda tile: imagecodecs.jpeg2k_encode(tile, level=q)
    level = q if q <= 9 else 6
    return lambda tile: imagecodecs.zlib_encode(tile, level=level)


def tiff_args(params: ConvertParams) -> dict[str, Any]:
    args: dict[str, Any] = {"photometric": "rgb", "compression": params.compression, "tile": (params.tile_px,) * 2,
                            "maxworkers": 1, "resolutionunit": "CENTIMETER", "software": f"gpupath {__version__}"}
    if params.compression == "jpeg":
        args["compressionargs"] = {"level": params.quality}  # sets YCbCr 4:2:0 tags, as encoder encodes
    return args


def tiles_of_row(rows: Any, tile_px: int) -> list[Any]:
    """Cut (h <= T, w, 3) rows into full (T, T, 3) tiles, left to right, edges replicated.

    NumPy or CuPy rows; the tiles are C-contiguous arrays of the same module.
    """
    xp = array_module(rows)
    h, w = rows.shape[:2]
    pad_h, pad_w = tile_px - h, (-w) % tile_px
    if pad_h or pad_w:
        rows = xp.pad(rows, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return [xp.ascontiguousarray(rows[:, c:c + tile_px]) for c in range(0, rows.shape[1], tile_px)]


def halve(rows: Any) -> Any:
    """2 x 2 mean of uint8 rows, rounded half up: (2k, w, 3) -> (k, ceil(w/2), 3), same array module.

    NumPy in, NumPy out; CuPy in, CuPy out. Odd width: the last column is replicated. Integer
    arithmetic (uint16 sum of four, + 2, >> 2), so host and device results are bit-identical.
    """
    xp = array_module(rows)
    if rows.shape[1] % 2:
        rows = xp.concatenate([rows, rows[:, -1:]], axis=1)
    acc = rows[0::2].astype(xp.uint16)
    acc += rows[1::2]
    pair = acc[:, 0::2] + acc[:, 1::2]
    pair += 2
    pair >>= 2
    return pair.astype(xp.uint8)

