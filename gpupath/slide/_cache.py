"""A bounded cache of decoded file tiles, so neighbouring windows decode each file tile once.

Tiles of the pipeline rarely sit on the file's own tile grid: a 512-px window at a 448-px stride
over a file of 256-px JPEG tiles touches 9 file tiles, and neighbouring windows touch the same
ones again, so a reader that decodes each window on its own decodes every file tile about twice
(measured on a generated 20k x 20k slide: 8042 file-tile decodes for 3758 distinct tiles). The
cache decodes each missing file tile once, in aligned horizontal runs (one reader call per run of
neighbouring missing tiles: about 200 MP/s on one core with cuCIM, where one call per tile gives
170), and assembles windows from the decoded tiles.

Pixels are the reader's own: a run is read with the same ``read_rgb`` a window read uses, on the
same file-tile boundaries, and JPEG tiles decode independently of each other, so an assembled
window equals the window read directly (tested bit for bit on real scans).

Memory: least recently used tiles go first once ``max_bytes`` is held. Windows read row by row
reuse the tiles of the row before, so the default holds three rows of file tiles across the
level (at least 16 MiB, at most 256 MiB): 44 MiB on a 20k-px-wide slide of 256-px tiles (measured
there: 3758 decodes for 3758 distinct file tiles; 2 rows: 3791).

Coordinates are pixels of the level read, (x, y) = (column, row), as in the readers.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np

from gpupath.slide._backends import Reader

__all__ = ["FileTileCache", "cache_bytes_for", "MAX_CACHED_TILE_PX"]

MAX_CACHED_TILE_PX = 1024          # file tiles larger than this (stripped TIFFs) are not cached
_MIN_BYTES, _MAX_BYTES = 16 << 20, 256 << 20
_ROWS_KEPT = 3                     # file-tile rows across the widest cached level the default budget holds


def cache_bytes_for(level_dims: tuple[tuple[int, int], ...], tile_dims: tuple[tuple[int, int], ...]) -> int:
    """Default budget: ``_ROWS_KEPT`` rows of RGB file tiles across the widest level, clamped to [16, 256] MiB."""
    widest = max((-(-w // tw) * tw * th * 3 for (w, _), (tw, th) in zip(level_dims, tile_dims, strict=True)),
                 default=0)
    return int(min(max(widest * _ROWS_KEPT, _MIN_BYTES), _MAX_BYTES))


class FileTileCache:
    """Decoded file tiles of one open reader, least recently used first out.

    Parameters
    ----------
    reader : the slide's reader; its ``read_rgb`` decodes aligned runs of file tiles and its
        ``tile_dims`` give the grid.
    max_bytes : most bytes of decoded pixels held (default :func:`cache_bytes_for`).

    Thread-safe: one lock around lookups, decodes and eviction (reads of one slide are serial).
    """

    def __init__(self, reader: Reader, max_bytes: int | None = None) -> None:
        self.reader = reader
        self.max_bytes = cache_bytes_for(reader.level_dims, reader.tile_dims) if max_bytes is None else int(max_bytes)
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
        self._tiles: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.decoded = 0         # file tiles decoded so far
        self.decoded_px = 0      # their pixels
        self.decode_cpu_s = 0.0  # CPU seconds of the decoding threads inside the reader's calls
        self.hits = 0            # distinct file tiles of a request already held

    def covers(self, level: int) -> bool:
        """Whether ``level`` is cached: tiled finely enough (stripped or single-tile levels are not) and, with
        cuCIM, at a whole-number downsample. cuCIM takes level-0 origins and maps them to level px in
        float32; at a fractional downsample it can land one px left of a file-tile boundary (measured: a
        strip read at a boundary of a level at downsample 2.9955 came back shifted by one px), so runs
        there are not the file tiles they are keyed as. Those levels are read window by window."""
        tw, th = self.reader.tile_dims[level]
        lw, lh = self.reader.level_dims[level]
        if self.reader.name == "cucim" and not float(self.reader.level0_downsamples[level]).is_integer():
            return False
        return 0 < tw <= MAX_CACHED_TILE_PX and 0 < th <= MAX_CACHED_TILE_PX and (tw, th) != (lw, lh)

    def fill(self, level: int, rects: list[tuple[int, int, int, int]], outs: list[np.ndarray]) -> None:
        """Write into each ``outs[i]`` ((h, w, 3) uint8, a view is fine) the RGB pixels of ``rects[i]`` =
        ``(x, y, w, h)``, a rectangle inside ``level`` (level px), as ``read_rgb`` would give them. The
        file tiles missing for all rectangles are decoded first, in runs across the whole request, so
        a batch of neighbouring windows makes few, long reader calls."""
        tw, th = self.reader.tile_dims[level]
        spans = [(range(x // tw, (x + w - 1) // tw + 1), range(y // th, (y + h - 1) // th + 1)) for x, y, w, h in rects]
        with self._lock:
            self._decode_missing(level, spans)
            for rect, (cols, rows), out in zip(rects, spans, outs, strict=True):
                self._assemble(level, rect, cols, rows, out)
            self._evict()

    def _assemble(self, level: int, rect: tuple[int, int, int, int], cols: range, rows: range, out: np.ndarray) -> None:
        x_lvl, y_lvl, w, h = rect
        if out.shape != (h, w, 3):
            raise ValueError(f"out is {out.shape}, the rectangle {rect} needs ({h}, {w}, 3)")
        tw, th = self.reader.tile_dims[level]
        for ty in rows:
            for tx in cols:
                tile = self._tiles[(level, tx, ty)]
                self._tiles.move_to_end((level, tx, ty))
                c0, c1 = max(x_lvl, tx * tw), min(x_lvl + w, tx * tw + tile.shape[1])
                r0, r1 = max(y_lvl, ty * th), min(y_lvl + h, ty * th + tile.shape[0])
                out[r0 - y_lvl:r1 - y_lvl, c0 - x_lvl:c1 - x_lvl] = tile[r0 - ty * th:r1 - ty * th,
                                                                       c0 - tx * tw:c1 - tx * tw]

    def _decode_missing(self, level: int, spans: list[tuple[range, range]]) -> None:
        """Decode the file tiles under ``spans`` not held yet: one reader call per horizontal run."""
        tw, th = self.reader.tile_dims[level]
        lw, lh = self.reader.level_dims[level]
        wanted: dict[int, set[int]] = {}
        for cols, rows in spans:
            for ty in rows:
                wanted.setdefault(ty, set()).update(cols)
        for ty in sorted(wanted):
            missing = sorted(tx for tx in wanted[ty] if (level, tx, ty) not in self._tiles)
            self.hits += len(wanted[ty]) - len(missing)
            for run in _runs(missing):
                x0, y0 = run[0] * tw, ty * th
                cpu = time.thread_time()  # the readers decode a call on the calling thread (cuCIM, tifffile)
                strip = self.reader.read_rgb(level, x0, y0, min(len(run) * tw, lw - x0), min(th, lh - y0), device="cpu")
                self.decode_cpu_s += time.thread_time() - cpu
                self.decoded_px += strip.shape[0] * strip.shape[1]
                for k, tx in enumerate(run):
                    tile = np.ascontiguousarray(strip[:, k * tw:(k + 1) * tw, :3])  # own the memory: the strip goes
                    self._tiles[(level, tx, ty)] = tile
                    self._bytes += tile.nbytes
                self.decoded += len(run)

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and len(self._tiles) > 1:
            _, tile = self._tiles.popitem(last=False)
            self._bytes -= tile.nbytes

    def stats(self) -> dict[str, float]:
        """Counters so far: file tiles ``decoded`` (``decoded_px`` pixels, in ``decode_cpu_s`` CPU seconds),
        ``hits`` (tiles a request found held), ``held_bytes`` and ``max_bytes``."""
        with self._lock:
            return {"decoded": self.decoded, "decoded_px": self.decoded_px, "decode_cpu_s": self.decode_cpu_s,
                    "hits": self.hits, "held_bytes": self._bytes, "max_bytes": self.max_bytes}

    def clear(self) -> None:
        """Drop every tile."""
        with self._lock:
            self._tiles.clear()
            self._bytes = 0


def _runs(cols: list[int]) -> list[list[int]]:
    """Split sorted column indices into runs of consecutive ones: [1, 2, 3, 7, 8] -> [[1, 2, 3], [7, 8]]."""
    runs: list[list[int]] = []
    for c in cols:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs
