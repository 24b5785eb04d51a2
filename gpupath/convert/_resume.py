"""What makes two conversions the same, and whether an existing OME-TIFF already is the one asked for.

Every OME-TIFF that :func:`gpupath.convert.convert_slide` writes carries, in its OME-XML
MapAnnotation, the source file's sha256 and a *conversion key*: the sha256 of the source's bytes,
of every setting that changes the written pixels or layout (tile, compression, quality, stain,
mpp) and of gpupath's version. A batch run that finds an output with the key it would write keeps
it (``gpupath convert ... --out-dir`` resumes; ``--redo`` converts again). Outputs are written under
a temporary name and renamed, so one that exists under its own name is complete.
Host only; reads the output's OME-XML and level shapes, never its pixels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gpupath._version import __version__
from gpupath.convert._tiles import ConvertParams, ConvertResult
from gpupath.slide import ome_annotations, ome_mpp

__all__ = ["convert_key", "converted_before", "KEY_NAME", "SOURCE_SHA_NAME"]

KEY_NAME = "gpupath.convert_key"          # MapAnnotation keys written with every conversion
SOURCE_SHA_NAME = "gpupath.source_sha256"


def convert_key(source_sha256: str, params: ConvertParams) -> str:
    """sha256 (hex) of what decides a conversion's output: source bytes, settings, gpupath version.

    Where it runs (``device``), how many threads and which reader decodes the source are left out,
    as ``run`` leaves them out of its results key: they change speed, not what is written (JPEG
    encoders on the GPU and the CPU differ within JPEG tolerance).
    """
    what = {"source_sha256": source_sha256, "tile_px": params.tile_px, "compression": params.compression,
            "quality": params.quality, "stain": params.stain, "mpp": params.mpp, "gpupath": __version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def converted_before(out: str | Path, key: str) -> ConvertResult | None:
    """What ``out`` holds when it is a complete conversion with ``key`` (None otherwise: absent,
    unreadable, not ours, or converted from other bytes or with other settings)."""
    import tifffile

    path = Path(out)
    if not path.is_file():
        return None
    try:
        with tifffile.TiffFile(path) as tf:
            xml = tf.ome_metadata or ""
            notes, mpp_xy = ome_annotations(xml), ome_mpp(xml)
            if notes.get(KEY_NAME) != key or mpp_xy is None:
                return None
            levels = [(int(lv.shape[1]), int(lv.shape[0])) for lv in tf.series[0].levels]
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return None  # damaged or foreign: converted again
    return ConvertResult(path=path, level_dimensions=tuple(levels), mpp=mpp_xy[0], seconds=0.0,
                         stain=notes.get("gpupath.stain", "none"), device=notes.get("gpupath.device", "cpu"))
