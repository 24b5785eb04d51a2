"""Convert any readable slide to a tiled, pyramidal BigTIFF OME-TIFF.

Takes a slide path (anything :func:`gpupath.slide.open_slide` reads, through the same reader as
``gpupath run``) and writes ``OUT.ome.tif``: level 0 in tiles of ``tile_px``, then levels 2, 4,
8, ... times smaller until one tile holds the level, each a 2 x 2 mean of the one above (rounded,
edges replicated on odd sizes; level ``i`` is ``ceil(w / 2**i) x ceil(h / 2**i)`` px). Pixels can be
stain-normalised on the way (Macenko or Vahadane, one fit per slide on its most tissue-rich tiles,
as ``run`` does).

File layout: the reduced levels are SubIFDs of level 0 (the OME-TIFF pyramid that tifffile,
Bio-Formats and QuPath read) and are also chained after level 0 in the main IFD list (so that
OpenSlide and cuCIM, which ignore SubIFDs, see the same pyramid). The OME-XML holds the physical
pixel size (µm) and the source's metadata (its ImageDescription and OpenSlide properties as a
MapAnnotation); the TIFF resolution tags hold the same pixel size per level.

Memory is bounded by a few tile rows per level: level 0 is read one strip of ``tile_px`` rows at
a time (the next strip decoded in a background thread), encoded, and handed to tifffile; each
reduced level is made from the rows of the level above as they pass, encoded when a tile row is
complete and kept, encoded, in a temporary file beside the output until level 0 is written. The
output is written under a temporary name in the output folder and renamed when complete; on any
error the temporary files are removed and one line says why.

Compression: JPEG (YCbCr 4:2:0, TIFF compression 7) and Deflate (8) open in OpenSlide, cuCIM and
tifffile; JPEG 2000 (34712) opens in tifffile (and Bio-Formats / QuPath), not in OpenSlide's
generic-TIFF reader.

Device (``ConvertParams.device``): ``cpu`` reads strips into NumPy, builds the pyramid on the host
and encodes with imagecodecs (JPEG / JPEG 2000 / Deflate, in threads). ``cuda`` reads strips onto
the GPU (decoded there by cuCIM, or uploaded once per strip from the other readers), builds every
reduced level there (the same integer 2 x 2 mean, bit-identical to the host one) and, for JPEG,
encodes each tile row on the device with nvImageCodec (the ``gpu`` extra) as baseline JPEG, YCbCr
4:2:0, the same stream layout the CPU path hands tifffile (pixels agree within JPEG tolerance, not
bit for bit); JPEG 2000 / Deflate tiles are copied to the host a tile row at a time and encoded by
imagecodecs. ``auto`` takes ``cuda`` when CuPy sees a GPU and nvImageCodec encodes a test tile,
else ``cpu`` with one note in the result's warnings saying why.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import imagecodecs
import numpy as np
import tifffile

from gpupath._version import __version__
from gpupath._xp import array_module, cupy_or_none, gpu_available, to_host
from gpupath.errors import ConfigError, GpupathError, SlideReadError
from gpupath.results import atomic_path
from gpupath.slide import BackendName, Slide, open_slide

__all__ = ["ConvertParams", "ConvertResult", "ConvertOutcome", "convert_slide", "convert_slides", "output_name",
           "pyramid_dimensions"]

Compression = Literal["jpeg", "jpeg2000", "deflate"]
StainMethod = Literal["none", "macenko", "vahadane"]
ConvertDevice = Literal["auto", "cpu", "cuda"]

_STAIN_SAMPLE_TILES = 32          # as gpupath.pipeline: tiles the per-slide stain fit sees
_NORMALISE_COLS_PX = 4096         # strip columns normalised at a time (bounds float temporaries)


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
    device : ``auto`` (GPU when usable, else CPU with a note in the warnings), ``cpu`` or ``cuda``
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
def _encoder(params: ConvertParams) -> Callable[[np.ndarray], bytes]:
    """Tile (T, T, 3) uint8 -> bytes, exactly as tifffile would encode it with the same tags."""
    q = params.quality
    if params.compression == "jpeg":
        return lambda tile: imagecodecs.jpeg_encode(tile, level=q, subsampling=(2, 2), colorspace="RGB",
                                                    outcolorspace="YCBCR")
    if params.compression == "jpeg2000":
        return lambda tile: imagecodecs.jpeg2k_encode(tile, level=q)
    level = q if q <= 9 else 6
    return lambda tile: imagecodecs.zlib_encode(tile, level=level)


def _tiff_args(params: ConvertParams) -> dict[str, Any]:
    args: dict[str, Any] = {"photometric": "rgb", "compression": params.compression, "tile": (params.tile_px,) * 2,
                            "maxworkers": 1, "resolutionunit": "CENTIMETER", "software": f"gpupath {__version__}"}
    if params.compression == "jpeg":
        args["compressionargs"] = {"level": params.quality}  # sets YCbCr 4:2:0 tags, as _encoder encodes
    return args


def _tiles_of_row(rows: Any, tile_px: int) -> list[Any]:
    """Cut (h <= T, w, 3) rows into full (T, T, 3) tiles, left to right, edges replicated.

    NumPy or CuPy rows; the tiles are C-contiguous arrays of the same module.
    """
    xp = array_module(rows)
    h, w = rows.shape[:2]
    pad_h, pad_w = tile_px - h, (-w) % tile_px
    if pad_h or pad_w:
        rows = xp.pad(rows, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return [xp.ascontiguousarray(rows[:, c:c + tile_px]) for c in range(0, rows.shape[1], tile_px)]


def _halve(rows: Any) -> Any:
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


# ---------------------------------------------------------------------------------------- device
_NO_NVIMGCODEC = "nvImageCodec is not installed (pip install 'gpupath[gpu]')"


def _jpeg_params(nvimgcodec: Any, quality: int) -> Any:
    """Baseline (not progressive) JPEG, YCbCr 4:2:0: the streams the file's JPEG tags declare."""
    return nvimgcodec.EncodeParams(quality_type=nvimgcodec.QualityType.QUALITY, quality_value=float(quality),
                                   chroma_subsampling=nvimgcodec.ChromaSubsampling.CSS_420,
                                   jpeg_encode_params=nvimgcodec.JpegEncodeParams(progressive=False,
                                                                                  optimized_huffman=False))


class _DeviceJpeg:
    """Tile rows on the GPU (CuPy) -> JPEG bytes per tile, encoded on the device by nvImageCodec."""

    def __init__(self, quality: int, tile_px: int) -> None:
        from nvidia import nvimgcodec  # noqa: PLC0415  (optional: the gpu extra)

        self.nv, self.tile_px = nvimgcodec, tile_px
        self.encoder = nvimgcodec.Encoder()
        self.params = _jpeg_params(nvimgcodec, quality)

    def __call__(self, rows: Any) -> list[bytes]:
        cp = array_module(rows)
        stream = cp.cuda.get_current_stream().ptr
        images = [self.nv.as_image(tile, stream) for tile in _tiles_of_row(rows, self.tile_px)]
        streams = self.encoder.encode(images, "jpeg", params=self.params, cuda_stream=stream)
        if any(cs is None for cs in streams):
            raise GpupathError("nvImageCodec could not JPEG-encode a tile on the GPU; convert with --device cpu")
        return [bytes(cs) for cs in streams]  # encoded bytes: device -> host


@functools.cache
def _device_jpeg_problem() -> str:
    """Why the GPU JPEG path is unusable here ('' when a 16 x 16 test tile encodes on the device)."""
    cp = cupy_or_none()
    if cp is None:
        return "no usable CUDA GPU (CuPy found no device)"
    try:
        enc = _DeviceJpeg(90, 16)
    except ImportError:
        return _NO_NVIMGCODEC
    except Exception as exc:  # noqa: BLE001  driver / library mismatch: report it, fall back
        return f"nvImageCodec's encoder does not start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    try:
        blob = enc(cp.zeros((16, 16, 3), cp.uint8))[0]
    except Exception as exc:  # noqa: BLE001  as above
        return f"nvImageCodec cannot encode a test tile ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return "" if blob[:2] == b"\xff\xd8" else "nvImageCodec's test tile is not a JPEG stream"


def _pick_device(params: ConvertParams) -> tuple[str, str]:
    """(``cpu`` or ``cuda``, note for the result's warnings); ConfigError when ``cuda`` cannot run."""
    if params.device == "cpu":
        return "cpu", ""
    if params.device == "auto":
        problem = _device_jpeg_problem() if gpu_available() else "no usable CUDA GPU (CuPy found no device)"
        return ("cpu", f"converted on the CPU: {problem}") if problem else ("cuda", "")
    if not gpu_available():
        raise ConfigError("device cuda asked for, but CuPy finds no usable CUDA GPU; use --device cpu or auto")
    if params.compression == "jpeg" and (problem := _device_jpeg_problem()):
        raise ConfigError(f"device cuda with JPEG: {problem}; use --device cpu or auto")
    return "cuda", ""


class _Level:
    """One reduced level: takes rows from the level above, keeps its encoded tiles in a temp file."""

    def __init__(self, dims: tuple[int, int], tmp: Path, tile_px: int) -> None:
        self.width, self.height = dims
        self.tmp, self.tile_px = tmp, tile_px
        self.fh: BinaryIO = open(tmp, "wb")  # noqa: SIM115 - closed by _Pyramid.close
        self.spans: list[tuple[int, int]] = []    # (offset, length) of each encoded tile, TIFF order
        self.rows: list[Any] = []                 # rows (NumPy or CuPy) not yet in a full tile row
        self.n_rows = 0                           # rows buffered
        self.carry: Any = None                    # odd row from above awaiting its pair
        self.done_rows = 0                        # rows already encoded


class _Pyramid:
    """Builds every reduced level from level-0 strips, streaming, and encodes their tiles."""

    def __init__(self, dims: list[tuple[int, int]], out: Path, tile_px: int,
                 encode_row: Callable[[Any], list[bytes]]) -> None:
        token = uuid.uuid4().hex[:8]
        self.encode_row, self.tile_px = encode_row, tile_px
        self.levels: list[_Level] = []
        try:
            for i, d in enumerate(dims[1:], start=1):
                self.levels.append(_Level(d, out.with_name(f".{out.name}.level{i}.tmp-{token}"), tile_px))
        except BaseException:
            self.close()
            raise

    def push(self, index: int, rows: Any, *, last: bool) -> None:
        """Rows of level ``index`` (0 = level 0) arrive, top to bottom; ``last`` marks the level's end.

        NumPy or CuPy rows: every reduced level is built on the rows' device.
        """
        if index >= len(self.levels):
            return
        xp = array_module(rows)
        lvl = self.levels[index]
        if lvl.carry is not None:
            rows = xp.concatenate([lvl.carry, rows])
            lvl.carry = None
        if rows.shape[0] % 2:
            if last:
                rows = xp.concatenate([rows, rows[-1:]])  # odd height: last row pairs with itself
            else:
                lvl.carry, rows = rows[-1:].copy(), rows[:-1]
        if rows.shape[0]:
            self._take(index, _halve(rows), last=last)
        elif last:
            self._take(index, xp.empty((0, lvl.width, 3), xp.uint8), last=True)

    def _take(self, index: int, rows: Any, *, last: bool) -> None:
        lvl, t = self.levels[index], self.tile_px
        if rows.shape[0]:
            lvl.rows.append(rows)
            lvl.n_rows += rows.shape[0]
        self.push(index + 1, rows, last=last)
        while lvl.n_rows >= t or (last and lvl.n_rows):
            buf = array_module(lvl.rows[0]).concatenate(lvl.rows) if len(lvl.rows) > 1 else lvl.rows[0]
            head, rest = buf[:t], buf[t:]
            for blob in self.encode_row(head):
                lvl.spans.append((lvl.fh.tell(), len(blob)))
                lvl.fh.write(blob)
            lvl.done_rows += head.shape[0]
            lvl.rows, lvl.n_rows = ([rest] if rest.shape[0] else []), rest.shape[0]

    def tiles(self, index: int) -> Iterator[bytes]:
        """Encoded tiles of reduced level ``index`` (0 = level 1), read back one at a time."""
        lvl = self.levels[index]
        assert lvl.done_rows == lvl.height, (index, lvl.done_rows, lvl.height)  # every row of level 0 came through
        lvl.fh.flush()
        with open(lvl.tmp, "rb") as fh:
            for offset, length in lvl.spans:
                fh.seek(offset)
                yield fh.read(length)

    def close(self) -> None:
        for lvl in self.levels:
            lvl.fh.close()
            lvl.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- reading
def _stain_normaliser(slide: Slide, mpp: float, method: StainMethod) -> tuple[Callable[[np.ndarray], np.ndarray] | None,
                                                                              str]:
    """Fit the slide's stains once (as ``run`` does) and return a strip normaliser, or (None, why not)."""
    if method == "none":
        return None, ""
    from gpupath import stain, vahadane  # noqa: PLC0415
    from gpupath.tiling import TileSpec, tile_grid  # noqa: PLC0415
    from gpupath.tissue import compute_tissue  # noqa: PLC0415

    fit_fn, apply_fn, target = {"macenko": (stain.fit_macenko, stain.apply_macenko, stain.REFERENCE),
                                "vahadane": (vahadane.fit_vahadane, vahadane.apply_vahadane,
                                             vahadane.VAHADANE_REFERENCE)}[method]
    tissue = compute_tissue(slide, mpp=mpp)
    grid = tile_grid(level_dimensions=slide.level_dimensions, level_downsamples=slide.level_downsamples,
                     mpp=mpp, mask=tissue, spec=TileSpec(target_mpp=mpp))
    if len(grid) == 0:
        return None, f"no tissue tile to fit {method} stains on; pixels not normalised"
    order = np.argsort(-grid.tissue_fraction, kind="stable")[:_STAIN_SAMPLE_TILES]
    locations = list(zip(grid.x[np.sort(order)].tolist(), grid.y[np.sort(order)].tolist()))
    try:
        fit = fit_fn(slide.read_tiles(locations, grid.level, grid.read_px).pixels)
    except ValueError as exc:
        return None, f"{method} stain fit failed ({exc}); pixels not normalised"

    def normalise(strip: Any) -> Any:
        out = array_module(strip).empty_like(strip)
        for c in range(0, strip.shape[1], _NORMALISE_COLS_PX):  # bounded float temporaries
            out[:, c:c + _NORMALISE_COLS_PX] = apply_fn(strip[:, c:c + _NORMALISE_COLS_PX], fit, target=target)
        return out

    return normalise, ""


def _strips(slide: Slide, tile_px: int, pool: ThreadPoolExecutor, device: str = "cpu") -> Iterator[Any]:
    """Level-0 strips of ``tile_px`` rows (the last may be shorter), the next one decoded ahead.

    ``device="cuda"``: CuPy strips (decoded on the GPU by cuCIM, else uploaded once per strip).
    """
    w, h = slide.dimensions

    def read(y: int) -> Any:
        try:
            return slide.read_rgb((0, y), 0, (w, min(tile_px, h - y)), device=device)  # type: ignore[arg-type]
        except (SlideReadError, ValueError, OSError) as exc:  # decoder errors: name the rows, keep one line
            msg = (str(exc).splitlines() or [type(exc).__name__])[0].removeprefix(f"{slide.path}: ")
            raise SlideReadError(f"{slide.path}: cannot read level-0 rows {y}-{min(y + tile_px, h)}: {msg}") from exc

    pending: Future[Any] | None = pool.submit(read, 0)
    try:
        for y in range(0, h, tile_px):
            assert pending is not None
            strip = pending.result()
            pending = pool.submit(read, y + tile_px) if y + tile_px < h else None
            yield strip
    finally:
        if pending is not None:
            pending.cancel()


# ---------------------------------------------------------------------------------------- writing
def _ome_metadata(slide: Slide, mpp: float, params: ConvertParams, device: str) -> dict[str, Any]:
    props = dict(slide.properties)
    description = props.get("tiff.ImageDescription", "")
    annotation = {k: v for k, v in props.items() if k != "tiff.ImageDescription" and not k.startswith("openslide.level[")}
    annotation.update({"gpupath.source": str(slide.path), "gpupath.version": __version__,
                       "gpupath.stain": params.stain, "gpupath.compression": params.compression,
                       "gpupath.quality": str(params.quality), "gpupath.device": device})
    clean = {_printable(str(k)): _printable(str(v)) for k, v in annotation.items()}
    return {"axes": "YXS", "Name": slide.path.name,
            "Description": _printable(description or f"converted from {slide.path.name}"),
            "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm",
            "MapAnnotation": clean}


def _printable(text: str) -> str:
    """Drop characters XML 1.0 cannot hold (vendor strings sometimes carry control bytes)."""
    return "".join(ch for ch in text if ch in "\t\n\r" or ord(ch) >= 0x20)


def _chain_subifds(path: Path) -> None:
    """Point level 0's next-IFD at its first SubIFD, so readers of the main IFD chain see the pyramid.

    tifffile already chains the SubIFDs to one another; level 0 is the file's only top-level IFD.
    """
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        subifds = page.tags.get("SubIFDs")
        if subifds is None:
            return
        ifd0, first_sub = page.offset, int(subifds.value[0])
        byteorder, offsetsize = tif.tiff.byteorder, tif.tiff.offsetsize
        assert offsetsize == 8  # BigTIFF: 8-byte tag count, 20-byte entries, 8-byte offsets
    with open(path, "r+b") as fh:
        fh.seek(ifd0)
        n_tags = struct.unpack(f"{byteorder}Q", fh.read(8))[0]
        fh.seek(ifd0 + 8 + 20 * n_tags)
        if struct.unpack(f"{byteorder}Q", fh.read(8))[0] != 0:
            return  # more top-level IFDs than expected: leave the file as tifffile wrote it
        fh.seek(ifd0 + 8 + 20 * n_tags)
        fh.write(struct.pack(f"{byteorder}Q", first_sub))


def _default_workers() -> int:
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return min(16, len(usable))


def convert_slide(src: str | os.PathLike[str], out: str | os.PathLike[str], params: ConvertParams | None = None, *,
                  on_rows: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Convert one slide to a tiled pyramidal BigTIFF OME-TIFF.

    Parameters
    ----------
    src : slide file (any format :func:`gpupath.slide.open_slide` reads).
    out : output path, e.g. ``slide.ome.tif``; its folder is created. Written as a temporary file
        beside it and renamed when complete.
    params : tiles, compression, quality, stain normalisation, mpp override.
    on_rows : called as ``on_rows(rows_done, height_px)`` after each level-0 strip (progress).

    Returns
    -------
    ConvertResult
        Output path, level dimensions (width, height) px, level-0 µm/px, wall seconds.

    Raises
    ------
    SlideReadError
        The source cannot be opened or one of its tiles cannot be decoded.
    MetadataError
        The source has no (plausible) mpp and ``params.mpp`` is not given.
    ConfigError
        Bad parameters, or ``device="cuda"`` where no GPU (or, for JPEG, no nvImageCodec) is usable.
    GpupathError
        The output cannot be written (e.g. disk full). In every error case no output file and no
        temporary file is left behind.

    Notes
    -----
    Level-0 pixels are the source's, re-encoded (JPEG q90: mean absolute difference about 1-2
    grey levels); reduced levels are 2 x 2 means of the level above, rounded. On ``cuda`` the
    reduced levels are bit-identical to the CPU's before encoding; the JPEG encoders differ
    (nvJPEG vs libjpeg-turbo), so JPEG output agrees within JPEG tolerance, Deflate exactly.

    Examples
    --------
    >>> convert_slide("a.svs", "a.ome.tif", ConvertParams(tile_px=512))  # doctest: +SKIP
    """
    params = params or ConvertParams()
    if not isinstance(params, ConvertParams):
        raise TypeError(f"params={params!r}: expected a ConvertParams")
    out_path = Path(out)
    if out_path.exists() and Path(src).exists() and os.path.samefile(out_path, src):
        raise ConfigError(f"{out_path}: is the source slide itself; converting would overwrite it with a re-encoded "
                          "copy (choose another output name or folder)")
    t0 = time.perf_counter()
    workers = params.workers or _default_workers()
    device, device_note = _pick_device(params)  # ConfigError here, before the slide is opened
    with open_slide(src, backend=params.backend, mpp=params.mpp) as slide:
        mpp = slide.require_mpp()
        w, h = slide.dimensions
        dims = pyramid_dimensions(w, h, params.tile_px)
        normalise, warning = _stain_normaliser(slide, mpp, params.stain)
        encode, tiff_args = _encoder(params), _tiff_args(params)
        try:
            with atomic_path(out_path) as tmp, ThreadPoolExecutor(workers, "gpupath-encode") as pool, \
                    ThreadPoolExecutor(1, "gpupath-read") as reader:
                encode_row: Callable[[Any], list[bytes]]
                if device == "cuda" and params.compression == "jpeg":
                    encode_row = _DeviceJpeg(params.quality, params.tile_px)
                else:  # host encoders; a device tile row is copied to the host first
                    def encode_row(rows: Any) -> list[bytes]:
                        return list(pool.map(encode, _tiles_of_row(to_host(rows), params.tile_px)))
                pyramid = _Pyramid(dims, tmp, params.tile_px, encode_row)
                try:
                    def level0() -> Iterator[bytes]:
                        done = 0
                        for strip in _strips(slide, params.tile_px, reader, device):
                            if normalise is not None:
                                strip = normalise(strip)
                            done += strip.shape[0]
                            pyramid.push(0, strip, last=done >= h)
                            yield from encode_row(strip)
                            if on_rows is not None:
                                on_rows(done, h)

                    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
                        tif.write(level0(), shape=(h, w, 3), dtype=np.uint8, subifds=len(dims) - 1,
                                  resolution=(1e4 / mpp, 1e4 / mpp), metadata=_ome_metadata(slide, mpp, params, device),
                                  **tiff_args)
                        for i, (lw, lh) in enumerate(dims[1:]):
                            ds = 2 ** (i + 1)
                            tif.write(pyramid.tiles(i), shape=(lh, lw, 3), dtype=np.uint8, subfiletype=1,
                                      resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), **tiff_args)
                finally:
                    pyramid.close()
                _chain_subifds(tmp)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = " (disk full?)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise GpupathError(f"{out_path}: cannot write the OME-TIFF: {why}{hint}; nothing written") from exc
    return ConvertResult(path=out_path, level_dimensions=tuple(dims), mpp=mpp, seconds=time.perf_counter() - t0,
                         stain=params.stain if normalise is not None else "none",
                         warnings=tuple(w for w in (device_note, warning) if w), device=device)


# ---------------------------------------------------------------------------------------- many slides
@dataclass(frozen=True, slots=True)
class ConvertOutcome:
    """One slide of :func:`convert_slides`: its result, or the one-line reason it failed."""

    source: Path
    out: Path
    result: ConvertResult | None = None
    error: str = ""


def _convert_task(src: str, out: str, params: ConvertParams) -> ConvertOutcome:
    """One slide, start to end (a Dask task on a worker, or a call in this process)."""
    try:
        return ConvertOutcome(Path(src), Path(out), result=convert_slide(src, out, params))
    except (GpupathError, ValueError, OSError) as exc:
        return ConvertOutcome(Path(src), Path(out), error=str(exc).splitlines()[0] if str(exc) else repr(exc))


def output_name(src: str | os.PathLike[str]) -> str:
    """``<name>.ome.tif`` for a slide file: every suffix dropped (``a.ome.tif`` -> ``a.ome.tif``)."""
    return Path(src).name.split(".")[0] + ".ome.tif"


def convert_slides(inputs: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                   params: ConvertParams | None = None, *, store: str | os.PathLike[str] | None = None,
                   workers: int | None = None, scheduler: str | None = None,
                   on_slide: Callable[[ConvertOutcome], None] | None = None) -> list[ConvertOutcome]:
    """Convert many slides to ``out_dir/<name>.ome.tif``, one Dask task per slide, as ``run`` batches.

    Parameters
    ----------
    inputs : slide files and folders of slides (expanded as :func:`gpupath.batch.expand_inputs`).
    out_dir : output folder (created).
    params : as :func:`convert_slide`.
    store : a store folder whose every slide is converted too.
    workers : 0 converts in this process, one slide after another; otherwise the size of a
        ``distributed.LocalCluster`` (default about one worker per two cores).
    scheduler : ``tcp://host:port`` of an existing Dask cluster instead of a local one.
    on_slide : called with each outcome as it completes.

    Returns
    -------
    list of ConvertOutcome, in input order; failures carry their reason and never stop the others.

    Raises
    ------
    ConfigError
        Two inputs would write the same output name, or the store is not a folder.
    """
    from gpupath.batch import default_workers, expand_inputs  # noqa: PLC0415

    params = params or ConvertParams()
    paths = expand_inputs([Path(p) for p in inputs], store=store)
    out = Path(out_dir)
    names = [output_name(p) for p in paths]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"{out}: several inputs would be written as {', '.join(clash)}; convert them separately")
    jobs = [(str(p), str(out / n)) for p, n in zip(paths, names)]
    outcomes: list[ConvertOutcome | None] = [None] * len(jobs)
    n_workers = default_workers(len(jobs)) if workers is None else workers
    if scheduler is None and (n_workers == 0 or len(jobs) <= 1):
        for i, (src, dst) in enumerate(jobs):
            outcomes[i] = _convert_task(src, dst, params)
            if on_slide is not None:
                on_slide(outcomes[i])  # type: ignore[arg-type]
        return outcomes  # type: ignore[return-value]
    from distributed import Client, LocalCluster, as_completed  # noqa: PLC0415

    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            try:
                client = stack.enter_context(Client(scheduler, timeout="20s"))
            except OSError as exc:
                raise ConfigError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                                       dashboard_address=None, silence_logs=40))
            client = stack.enter_context(Client(cluster))
        token = uuid.uuid4().hex[:8]
        futures = {client.submit(_convert_task, src, dst, params, key=f"gpupath-convert-{token}-{i}", pure=False): i
                   for i, (src, dst) in enumerate(jobs)}
        for fut in as_completed(list(futures)):
            i = futures[fut]
            try:
                outcome = fut.result()
            except Exception as exc:  # noqa: BLE001  KilledWorker (the slide killed its workers) or a lost cluster
                outcome = ConvertOutcome(Path(jobs[i][0]), Path(jobs[i][1]), error=f"{type(exc).__name__}: {exc}")
            outcomes[i] = outcome
            if on_slide is not None:
                on_slide(outcome)
    return outcomes  # type: ignore[return-value]
