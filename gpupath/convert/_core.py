"""Convert one slide: level-0 strips in, reduced levels streamed, tiles written as a BigTIFF OME-TIFF.

:func:`convert_slide` reads level 0 in strips of ``tile_px`` rows (on the host, or on the GPU for
``device="cuda"``), optionally stain-normalises them, builds every reduced level as the rows pass
(:class:`_Pyramid`, encoded tiles kept in temporary files), writes level 0 and the SubIFD pyramid
with tifffile and chains the SubIFDs into the main IFD list.
"""

from __future__ import annotations

import errno
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile

from gpupath._version import __version__
from gpupath._xp import array_module, to_host
from gpupath.convert._device import DeviceJpeg, pick_device
from gpupath.convert._resume import KEY_NAME, SOURCE_SHA_NAME, convert_key
from gpupath.convert._tiles import (ConvertParams, ConvertResult, StainMethod, encoder, halve, tiff_args,
                                    tiles_of_row, pyramid_dimensions)
from gpupath.errors import ConfigError, GpupathError, SlideReadError
from gpupath.files import atomic_path
from gpupath.slide import Slide, open_slide

_STAIN_SAMPLE_TILES = 32          # as gpupath.pipeline: tiles the per-slide stain fit sees
_NORMALISE_COLS_PX = 4096         # strip columns normalised at a time (bounds float temporaries)


class _Level:
    """One reduced level: takes rows from the level above, keeps its encoded tiles in a temp file."""

    def __init__(self, dims: tuple[int, int], tmp: Path, tile_px: int) -> None:
        self.width, self.height = dims
        self.tmp, self.tile_px = tmp, tile_px
        self.fh: BinaryIO = open(tmp, "wb")
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
            self._take(index, halve(rows), last=last)
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
def stain_normaliser(slide: Slide, mpp: float, method: StainMethod) -> tuple[Callable[[np.ndarray], np.ndarray] | None,
                                                                              str]:
    """Fit the slide's stains once (as ``run`` does) and return a strip normaliser, or (None, why not)."""
    if method == "none":
        return None, ""
    from gpupath import stain, vahadane
    from gpupath.tiling import TileSpec, tile_grid
    from gpupath.tissue import compute_tissue

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
def _ome_metadata(slide: Slide, mpp: float, params: ConvertParams, device: str, source_sha256: str) -> dict[str, Any]:
    props = dict(slide.properties)
    description = props.get("tiff.ImageDescription", "")
    annotation = {k: v for k, v in props.items() if k != "tiff.ImageDescription" and not k.startswith("openslide.level[")}
    annotation.update({"gpupath.source": str(slide.path), "gpupath.version": __version__,
                       "gpupath.stain": params.stain, "gpupath.compression": params.compression,
                       "gpupath.quality": str(params.quality), "gpupath.device": device,
                       SOURCE_SHA_NAME: source_sha256, KEY_NAME: convert_key(source_sha256, params)})
    clean = {_printable(str(k)): _printable(str(v)) for k, v in annotation.items()}
    return {"axes": "YXS", "Name": slide.path.name,
            "Description": _printable(description or f"converted from {slide.path.name}"),
            "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm",
            "MapAnnotation": clean}


def _source_sha256(src: str | os.PathLike[str]) -> str:
    from gpupath.files import sha256_file

    try:
        return sha256_file(src)
    except OSError as exc:
        raise SlideReadError(f"{src}: cannot read it: {os.strerror(exc.errno) if exc.errno else exc}") from exc


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


def _checked_args(params: ConvertParams | None, src: str | os.PathLike[str],
                  out: str | os.PathLike[str]) -> tuple[ConvertParams, Path]:
    """``params`` (default :class:`ConvertParams`) and the output path, checked.

    Raises
    ------
    TypeError
        ``params`` is not a ConvertParams.
    ConfigError
        The output is the source slide itself.
    """
    params = params or ConvertParams()
    if not isinstance(params, ConvertParams):
        raise TypeError(f"params={params!r}: expected a ConvertParams")
    out_path = Path(out)
    if out_path.exists() and Path(src).exists() and os.path.samefile(out_path, src):
        raise ConfigError(f"{out_path}: is the source slide itself; converting would overwrite it with a re-encoded "
                          "copy (choose another output name or folder)")
    return params, out_path


def _row_encoder(device: str, params: ConvertParams, pool: ThreadPoolExecutor,
                 encode: Callable[[np.ndarray], bytes]) -> Callable[[Any], list[bytes]]:
    """Tile row -> encoded tiles: nvJPEG on ``cuda`` for JPEG, else ``encode`` over ``pool`` (host
    encoders; a device tile row is copied to the host first)."""
    encode_row: Callable[[Any], list[bytes]]
    if device == "cuda" and params.compression == "jpeg":
        encode_row = DeviceJpeg(params.quality, params.tile_px)
    else:  # host encoders; a device tile row is copied to the host first
        def encode_row(rows: Any) -> list[bytes]:
            return list(pool.map(encode, tiles_of_row(to_host(rows), params.tile_px)))
    return encode_row


def _level0_tiles(slide: Slide, params: ConvertParams, reader: ThreadPoolExecutor, device: str,
                  normalise: Callable[[Any], Any] | None, pyramid: _Pyramid,
                  encode_row: Callable[[Any], list[bytes]], h: int,
                  on_rows: Callable[[int, int], None] | None) -> Iterator[bytes]:
    """Level 0's encoded tiles, strip by strip (stain-normalised when ``normalise`` is given); each strip
    is also pushed into ``pyramid`` for the reduced levels, then ``on_rows(rows_done, h)`` is called."""
    done = 0
    for strip in _strips(slide, params.tile_px, reader, device):
        if normalise is not None:
            strip = normalise(strip)
        done += strip.shape[0]
        pyramid.push(0, strip, last=done >= h)
        yield from encode_row(strip)
        if on_rows is not None:
            on_rows(done, h)


def _write_reduced_levels(tif: tifffile.TiffWriter, pyramid: _Pyramid, dims: list[tuple[int, int]], mpp: float,
                          tiff_kw: dict[str, Any]) -> None:
    """Write levels 1.. as SubIFDs of level 0 (reduced-resolution pages, each at its own µm/px)."""
    for i, (lw, lh) in enumerate(dims[1:]):
        ds = 2 ** (i + 1)
        tif.write(pyramid.tiles(i), shape=(lh, lw, 3), dtype=np.uint8, subfiletype=1,
                  resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), **tiff_kw)


def convert_slide(src: str | os.PathLike[str], out: str | os.PathLike[str], params: ConvertParams | None = None, *,
                  on_rows: Callable[[int, int], None] | None = None,
                  source_sha256: str | None = None) -> ConvertResult:
    """Convert one slide to a tiled pyramidal BigTIFF OME-TIFF.

    Parameters
    ----------
    src : slide file (any format :func:`gpupath.slide.open_slide` reads).
    out : output path, e.g. ``slide.ome.tif``; its folder is created. Written as a temporary file
        beside it and renamed when complete.
    params : tiles, compression, quality, stain normalisation, mpp override.
    on_rows : called as ``on_rows(rows_done, height_px)`` after each level-0 strip (progress).
    source_sha256 : the source file's sha256 when the caller has it (else read here): written to the
        OME-XML with the conversion key (:func:`gpupath.convert.convert_key`) so a batch can skip it later.

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
    params, out_path = _checked_args(params, src, out)
    t0 = time.perf_counter()
    workers = params.workers or _default_workers()
    device, device_note = pick_device(params)  # ConfigError here, before the slide is opened
    sha = source_sha256 or _source_sha256(src)
    with open_slide(src, backend=params.backend, mpp=params.mpp) as slide:
        mpp = slide.require_mpp()
        w, h = slide.dimensions
        dims = pyramid_dimensions(w, h, params.tile_px)
        normalise, warning = stain_normaliser(slide, mpp, params.stain)
        encode, tiff_kw = encoder(params), tiff_args(params)
        try:
            with atomic_path(out_path) as tmp, ThreadPoolExecutor(workers, "gpupath-encode") as pool, \
                    ThreadPoolExecutor(1, "gpupath-read") as reader:
                encode_row = _row_encoder(device, params, pool, encode)
                pyramid = _Pyramid(dims, tmp, params.tile_px, encode_row)
                try:
                    level0 = _level0_tiles(slide, params, reader, device, normalise, pyramid, encode_row, h, on_rows)
                    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
                        tif.write(level0, shape=(h, w, 3), dtype=np.uint8, subifds=len(dims) - 1,
                                  resolution=(1e4 / mpp, 1e4 / mpp), metadata=_ome_metadata(slide, mpp, params, device, sha),
                                  **tiff_kw)
                        _write_reduced_levels(tif, pyramid, dims, mpp, tiff_kw)
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
