"""Slide metadata read from TIFF tags with tifffile, in OpenSlide's vocabulary.

The cuCIM and tifffile backends have no OpenSlide to ask, so this module derives what
OpenSlide would report (vendor, ``openslide.*`` and ``aperio.*`` properties, pyramid pages,
associated images) from the TIFF structure itself. It also decides whether cuCIM can be
trusted with a file *before* cuCIM touches it: cuCIM's TIFF reader crashes the process on some
compressions (e.g. Deflate), so eligibility is checked here, in Python, from the tags.
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import tifffile

from gpupath.errors import SlideReadError

__all__ = ["TiffLayout", "read_tiff_layout", "cucim_refusal", "tiff_truncation", "tiff_structure_problem",
           "tiff_pages", "ome_mpp", "ome_annotations", "MAX_TIFF_DIRECTORIES"]

MAX_TIFF_DIRECTORIES = 10_000  # image directories a slide may chain (real ones hold < 20; NDPI / OME a few hundred)

# cuCIM's cuslide plugin decodes tiled JPEG pyramids (Aperio SVS, generic tiled TIFF).
# Anything else is left to OpenSlide or tifffile.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_CUCIM_COMPRESSIONS = {7}  # JPEG (new-style, with JPEGTables)
_TIFF_HEADS = {b"II*\x00": ("<", "I", "H", 12), b"MM\x00*": (">", "I", "H", 12),  # byte order, offset, count,
               b"II+\x00": ("<", "Q", "Q", 20), b"MM\x00+": (">", "Q", "Q", 20)}  # IFD entry bytes (BigTIFF)
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


@dataclass(frozen=True, slots=True)
class TiffLayout:
    """What a TIFF slide holds, independent of the reader that decodes it.

    ``level_pages`` are page indices of the pyramid, largest first; ``associated`` maps
    OpenSlide's associated-image names to page indices.
    """

    vendor: str
    level_pages: tuple[int, ...]
    level_dims: tuple[tuple[int, int], ...]   # (width, height) px per level
    tile_dims: tuple[tuple[int, int], ...]    # (tile width, tile height) px per level
    compressions: tuple[int, ...]
    properties: dict[str, str] = field(default_factory=dict)
    associated: dict[str, int] = field(default_factory=dict)
    mpp: tuple[float, float] | None = None   # (x, y) level-0 µm/px
    is_ndpi: bool = False
    is_ome: bool = False
    data_end_bytes: int = 0    # end of the last pixel-data segment of the pyramid
    file_bytes: int = 0

    @property
    def truncated(self) -> bool:
        """True when pixel data is declared beyond the end of the file."""
        return self.data_end_bytes > self.file_bytes


def _aperio_properties(description: str) -> dict[str, str]:
    props: dict[str, str] = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            props[f"aperio.{key.strip()}"] = value.strip()
    return props


def ome_mpp(xml: str) -> tuple[float, float] | None:
    """(x, y) µm/px from the first OME Pixels element's PhysicalSizeX/Y."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for elem in root.iter():
        if elem.tag.endswith("}Pixels") or elem.tag == "Pixels":
            sizes = []
            for axis in ("X", "Y"):
                size = elem.get(f"PhysicalSize{axis}")
                if size is None:
                    return None
                sizes.append(float(size) * _OME_UNIT_UM.get(elem.get(f"PhysicalSize{axis}Unit", "µm"), 1.0))
            return sizes[0], sizes[1]
    return None


def ome_annotations(xml: str) -> dict[str, str]:
    """Key -> value of every MapAnnotation ``<M K="...">`` entry of an OME-XML string ({} if unparsable)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    return {m.get("K", ""): (m.text or "").strip() for m in root.iter()
            if m.tag.rsplit("}", 1)[-1] == "M" and m.get("K")}


def _ome_objective_power(xml: str) -> str | None:
    """Objective magnification of an OME-XML: an Objective's NominalMagnification, else the
    ``openslide.objective-power`` / ``aperio.AppMag`` that ``gpupath convert`` keeps in a MapAnnotation."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    objective = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Objective"
                      and e.get("NominalMagnification")), None)
    notes = ome_annotations(xml)
    power = (objective.get("NominalMagnification") if objective is not None
             else notes.get("openslide.objective-power") or notes.get("aperio.AppMag"))
    try:
        return f"{float(power):g}" if power else None
    except ValueError:
        return None


def _resolution_mpp(page: tifffile.TiffPage) -> tuple[tuple[float, float] | None, dict[str, str]]:
    """(x, y) µm/px from X/YResolution and ResolutionUnit, as OpenSlide's generic-tiff reader computes it."""
    tags = page.tags
    props: dict[str, str] = {}
    unit_tag = tags.get("ResolutionUnit")
    res = [tags.get("XResolution"), tags.get("YResolution")]
    if unit_tag is None or res[0] is None or res[1] is None:
        return None, props
    unit = int(unit_tag.value)
    props["tiff.ResolutionUnit"] = {1: "none", 2: "inch", 3: "centimeter"}.get(unit, str(unit))
    mpp = []
    for axis, tag in zip("XY", res):
        num, den = tag.value
        props[f"tiff.{axis}Resolution"] = repr(num / den) if den else "0"
        if unit not in (2, 3) or num == 0:
            return None, props
        mpp.append((25400.0 if unit == 2 else 10000.0) * den / num)
    return (mpp[0], mpp[1]), props


def _open_tiff(path: Path) -> tuple[tifffile.TiffFile, list[tifffile.TiffPage]]:
    """Open a file that starts like a TIFF and list its pages (closed again when that fails).

    Raises
    ------
    SlideReadError
        The directories cannot be parsed, or there is none.
    """
    problem = tiff_structure_problem(path)
    if problem is not None:
        raise SlideReadError(f"{path}: {problem}")
    tf = None
    try:
        tf = tifffile.TiffFile(path)
        pages = tiff_pages(tf)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
        if tf is not None:
            tf.close()
        raise SlideReadError(f"{path}: TIFF header but unreadable TIFF structure (truncated or corrupt?): {exc}") from exc
    if not pages:
        with tf:
            raise SlideReadError(f"{path}: TIFF header but no readable image directory (truncated or corrupt file?)")
    return tf, pages


def _first_page_properties(first: tifffile.TiffPage) -> dict[str, str]:
    """``tiff.*`` properties from the first page's text tags (description, make, model, software, date)."""
    props: dict[str, str] = {}
    for name in ("ImageDescription", "Make", "Model", "Software", "DateTime"):
        tag = first.tags.get(name)
        if tag is not None and isinstance(tag.value, str):
            props[f"tiff.{name}"] = tag.value
    return props


def _aperio_associated(pages: list[tifffile.TiffPage]) -> dict[str, int]:
    """Aperio's associated images: each untiled page after the first, named by the first word of its
    description's second line (``label`` or ``macro``), else ``thumbnail``; the first page of a name wins."""
    associated: dict[str, int] = {}
    for p in pages[1:]:
        if p.is_tiled:
            continue
        lines = (p.description or "").splitlines()
        kind = lines[1].split()[0] if len(lines) > 1 and lines[1] else ""
        name = kind if kind in ("label", "macro") else "thumbnail"
        associated.setdefault(name, p.index)
    return associated


def _vendor_layout(tf: tifffile.TiffFile, pages: list[tifffile.TiffPage], props: dict[str, str]
                   ) -> tuple[str, list[int], dict[str, int], tuple[float, float] | None]:
    """Vendor, pyramid page indices, associated images and level-0 mpp, by the file's flavour (Aperio,
    OME-TIFF, else generic tiled or plain TIFF); vendor properties are added to ``props``."""
    first = pages[0]
    desc = first.description or ""
    associated: dict[str, int] = {}
    mpp: tuple[float, float] | None = None
    if tf.is_svs or desc.startswith("Aperio"):
        vendor = "aperio"
        level_pages = [p.index for p in pages if p.is_tiled]
        associated = _aperio_associated(pages)
        props.update(_aperio_properties(desc))
        if "aperio.MPP" in props:
            mpp = (float(props["aperio.MPP"]), float(props["aperio.MPP"]))  # Aperio states one value
        if "aperio.AppMag" in props:
            props["openslide.objective-power"] = props["aperio.AppMag"]
    elif tf.is_ome:
        vendor = "ome-tiff"
        series = tf.series[0]
        level_pages = [lvl.keyframe.index for lvl in series.levels]
        mpp = ome_mpp(tf.ome_metadata or "")
        if power := _ome_objective_power(tf.ome_metadata or ""):
            props["openslide.objective-power"] = power
    else:
        vendor = "generic-tiff" if first.is_tiled else "tiff"
        level_pages = [p.index for p in pages if p.is_tiled] or [0]
        mpp, res_props = _resolution_mpp(first)
        props.update(res_props)
    return vendor, level_pages, associated, mpp


def read_tiff_layout(path: Path) -> TiffLayout | None:
    """Describe a TIFF slide, or return None when the file is not a TIFF.

    Raises
    ------
    SlideReadError
        The file starts like a TIFF but its directories cannot be parsed (e.g. truncated).
    """
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic not in _TIFF_MAGIC:
        return None
    tf, pages = _open_tiff(path)
    with tf:
        props = _first_page_properties(pages[0])
        vendor, level_pages, associated, mpp = _vendor_layout(tf, pages, props)
        pyramid = sorted((pages[i] for i in level_pages), key=lambda p: -p.imagewidth)
        level_dims = tuple((int(p.imagewidth), int(p.imagelength)) for p in pyramid)
        for (w, h), p in zip(level_dims, pyramid, strict=True):
            if w <= 0 or h <= 0:
                raise SlideReadError(f"{path}: corrupt: image directory {p.index} is {w} x {h} px (ImageWidth or "
                                     "ImageLength 0): no image to read")
        tile_dims = tuple(
            (int(p.tilewidth or p.imagewidth), int(p.tilelength or p.rowsperstrip or p.imagelength))
            for p in pyramid
        )
        data_end = max(
            (int(o) + int(n) for p in pyramid for o, n in zip(p.dataoffsets, p.databytecounts)), default=0
        )
        return TiffLayout(
            vendor=vendor,
            level_pages=tuple(p.index for p in pyramid),
            level_dims=level_dims,
            tile_dims=tile_dims,
            compressions=tuple(int(p.compression) for p in pyramid),
            properties=props,
            associated=associated,
            mpp=mpp,
            is_ndpi=bool(tf.is_ndpi),
            is_ome=bool(tf.is_ome),
            data_end_bytes=data_end,
            file_bytes=path.stat().st_size,
        )


def cucim_refusal(layout: TiffLayout | None) -> str | None:
    """Why cuCIM must not open ``path`` (None when it may).

    cuCIM reads tiled JPEG TIFF pyramids; on other compressions its TIFF reader can crash
    the whole process, so this check runs first and in Python.
    """
    if layout is None:
        return "not a TIFF"
    if layout.is_ndpi:
        return "NDPI (cuCIM has no NDPI reader)"
    if layout.truncated:
        return f"truncated file: tile data runs to byte {layout.data_end_bytes}, file has {layout.file_bytes}"
    bad = sorted(set(layout.compressions) - _CUCIM_COMPRESSIONS)
    if bad:
        return f"TIFF compression {bad} (cuCIM reads tiled JPEG only)"
    if any(tw == w and th == h and w > 4096 for (tw, th), (w, h) in zip(layout.tile_dims, layout.level_dims)):
        return "stripped (untiled) pyramid level"
    return None


def tiff_structure_problem(path: Path) -> str | None:
    """What is wrong with a TIFF-family file's chain of image directories, or None (also for a file that
    is not a TIFF): the one bounded walk every reader and ingest rely on before tifffile lists pages.

    The chain is followed from the header, each directory's entry count and next-directory offset
    read directly: a directory that runs past the end of the file ("truncated: ..."), a next offset
    that points back to a directory already seen ("corrupt: ... loops back ..."; tifffile's lazy page
    iteration would follow such a loop for ever), or more than MAX_TIFF_DIRECTORIES directories. A
    classic TIFF over 4 GiB (NDPI wraps its 32-bit offsets) is left to tifffile.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head[:4] not in _TIFF_HEADS:
            return None
        bo, off_fmt, cnt_fmt, entry_bytes = _TIFF_HEADS[head[:4]]
        if off_fmt == "I" and size >= 1 << 32:
            return None  # >4 GiB classic TIFF (NDPI): 32-bit offsets wrap
        off_size, cnt_size = struct.calcsize(off_fmt), struct.calcsize(cnt_fmt)
        if len(head) < (8 if off_fmt == "I" else 16):
            return f"truncated: the TIFF header is {len(head)} bytes"
        (offset,) = struct.unpack_from(bo + off_fmt, head, 4 if off_fmt == "I" else 8)
        if offset == 0:
            return "corrupt: the TIFF header points to no image directory"
        seen: dict[int, int] = {}
        previous = 0
        while offset:
            if offset in seen:
                return (f"corrupt: the TIFF directory chain loops back (directory at byte {previous} points to "
                        f"directory {seen[offset]}, at byte {offset})")
            if len(seen) >= MAX_TIFF_DIRECTORIES:
                return f"corrupt: more than {MAX_TIFF_DIRECTORIES} TIFF image directories"
            seen[offset] = len(seen)
            fh.seek(offset)
            raw = fh.read(cnt_size)
            count = struct.unpack(bo + cnt_fmt, raw)[0] if len(raw) == cnt_size else 0
            end = offset + cnt_size + count * entry_bytes + off_size
            if end > size:
                return f"truncated: TIFF directory at byte {offset} runs past the end of the file ({size} bytes)"
            fh.seek(end - off_size)
            previous, (offset,) = offset, struct.unpack(bo + off_fmt, fh.read(off_size))
    return None


def tiff_pages(tf: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """Every page of an open file. ``len`` first: tifffile's counting walk stops at a circular reference,
    where iterating the lazy page list without it re-reads the looped directory for ever."""
    n = min(len(tf.pages), MAX_TIFF_DIRECTORIES)
    return [tf.pages[i] for i in range(n)]


def tiff_truncation(path: Path) -> str | None:
    """Why a TIFF-family file (svs, ndpi, tif, ...) is cut short or its structure corrupt, or None: the
    chain of image directories must be sound (:func:`tiff_structure_problem`) and every page's pixel
    data must end inside the file."""
    with open(path, "rb") as fh:
        if fh.read(4) not in _TIFF_HEADS:
            return None  # not a TIFF: nothing of this kind to check
    problem = tiff_structure_problem(path)
    if problem is not None:
        return problem
    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tf:
            data_end = max((int(o) + int(n) for p in tiff_pages(tf) for o, n in zip(p.dataoffsets, p.databytecounts)),
                           default=0)
    except Exception as exc:  # noqa: BLE001  (any parse failure is a reason to refuse the copy)
        return f"unreadable TIFF structure: {exc}"
    if data_end > size:
        return f"truncated: pixel data runs to byte {data_end}, file has {size} bytes"
    return None
