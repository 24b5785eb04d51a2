"""Structural checks of a slide's JPEG tiles before cuCIM decodes them.

cuCIM's JPEG decoder prints libjpeg's complaint about a corrupt tile ("Bogus marker length",
"Premature end of JPEG file") and returns pixels anyway, so a damaged tile in the middle of a
slide would become garbage tiles and wrong detections without an error. OpenSlide and tifffile
raise instead. :class:`TileGuard` reads the compressed bytes of every TIFF tile a cuCIM request
touches (once per tile: verified tiles are remembered) and walks the JPEG marker structure
(ITU-T T.81, Annex B): start-of-image, marker segments whose lengths stay inside the tile, at
least one scan, entropy-coded data that ends at a marker, end-of-image. A tile that fails raises
:class:`~gpupath.errors.SlideReadError` naming the slide, level, tile and problem.

What it cannot see: flipped bits inside the entropy-coded data, which libjpeg decodes to wrong
pixels without a complaint either (no decoder can tell). Host only, about 15 µs per 240 px tile
(NumPy scan of the scan data); pixel coordinates are level pixels (x, y), as in the readers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gpupath.errors import SlideReadError

__all__ = ["jpeg_stream_problem", "TileGuard"]

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_TIFF_JPEG = 7  # TIFF Compression tag: JPEG with JPEGTables (what cuCIM reads)


def jpeg_stream_problem(data: bytes) -> str | None:
    """What is structurally wrong with one JPEG stream (a TIFF tile), or None when nothing is.

    Parameters
    ----------
    data : bytes
        One tile's compressed bytes. Abbreviated streams (tables in the TIFF's JPEGTables tag,
        as in Aperio SVS) are fine: only the structure of what is there is checked.

    Returns
    -------
    str or None
        A short reason with the byte offset ("byte 35: bogus marker length 1 for marker 0xC4"),
        or None.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != _SOI:
        return "no JPEG start-of-image marker"
    arr = np.frombuffer(data, np.uint8)
    pos, scans = 2, 0
    while True:
        if pos >= n:
            return "ends without an end-of-image marker (truncated tile)"
        if data[pos] != 0xFF:
            return f"byte {pos}: expected a marker, found 0x{data[pos]:02X}"
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker are allowed
            pos += 1
        if pos >= n:
            return "ends inside a marker (truncated tile)"
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            return None if scans else "end-of-image before any scan: no image data"
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length field
            continue
        if marker in (0x00, _SOI):
            return f"byte {pos - 1}: marker 0x{marker:02X} where a segment should start"
        if pos + 2 > n:
            return "ends inside a marker length (truncated tile)"
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > n:
            return f"byte {pos}: bogus marker length {length} for marker 0x{marker:02X} ({n} bytes in the tile)"
        pos += length
        if marker == _SOS:
            scans += 1
            # entropy-coded data: 0xFF is followed by 0x00 (a stuffed byte), RSTn or more 0xFF
            # fill; any other byte after 0xFF is the marker that ends the scan
            ff = np.flatnonzero(arr[pos : n - 1] == 0xFF)
            after = arr[pos + ff + 1]
            ends = ff[(after != 0x00) & (after != 0xFF) & ((after < 0xD0) | (after > 0xD7))]
            if ends.size == 0:
                return "scan data runs to the end of the tile without an end-of-image marker (truncated tile)"
            pos += int(ends[0])


class TileGuard:
    """Checks, once each, the JPEG tiles that reads touch (see the module docstring).

    Parameters
    ----------
    path : Path
        The slide file (opened for ``pread`` here, closed by :meth:`close`).
    level_pages : tuple of int
        TIFF page index of each pyramid level, largest first (``TiffLayout.level_pages``).
    """

    def __init__(self, path: Path, level_pages: tuple[int, ...]) -> None:
        import tifffile

        self.path = path
        self._levels: list[tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int, int] | None] = []
        with tifffile.TiffFile(path) as tf:
            for index in level_pages:
                page = tf.pages[index]
                if int(page.compression) != _TIFF_JPEG or not page.is_tiled:
                    self._levels.append(None)  # not a JPEG-tiled level: nothing to check here
                    continue
                offsets = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                tiles_x = -(-int(page.imagewidth) // int(page.tilewidth))
                tiles_y = -(-int(page.imagelength) // int(page.tilelength))
                self._levels.append((offsets, counts, np.zeros(offsets.size, bool), int(page.tilewidth),
                                     int(page.tilelength), tiles_x, tiles_y))
        self._fd = os.open(path, os.O_RDONLY)

    def check(self, level: int, x_lvl: int, y_lvl: int, w: int, h: int) -> None:
        """Raise SlideReadError when a tile under the rectangle (level px, x/y inclusive, w/h wide)
        is corrupt; remember the tiles that pass. Thread-safe (``pread``; a tile checked twice by
        two threads at once is harmless)."""
        info = self._levels[level] if level < len(self._levels) else None
        if info is None or w <= 0 or h <= 0:
            return
        offsets, counts, verified, tw, th, tiles_x, tiles_y = info
        tx0, tx1 = max(x_lvl // tw, 0), min((x_lvl + w - 1) // tw, tiles_x - 1)
        ty0, ty1 = max(y_lvl // th, 0), min((y_lvl + h - 1) // th, tiles_y - 1)
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                index = ty * tiles_x + tx
                if index >= offsets.size or verified[index] or counts[index] == 0:
                    continue  # outside the table, checked before, or a sparse (absent) tile
                data = os.pread(self._fd, int(counts[index]), int(offsets[index]))
                problem = ("file ends inside the tile" if len(data) < counts[index]
                           else jpeg_stream_problem(data))
                if problem:
                    raise SlideReadError(
                        f"{self.path}: corrupt JPEG tile {index} of level {level} (level px x {tx * tw}, "
                        f"y {ty * th}): {problem}; cuCIM would decode it to garbage without an error")
                verified[index] = True

    def close(self) -> None:
        """Close the file; again is a no-op (the descriptor number may belong to another file by then)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
