"""Slide reading: `open_slide` -> `Slide` over cuCIM, OpenSlide or tifffile (see `_slide`)."""

from gpupath.slide._meta import ome_annotations, ome_mpp, tiff_pages, tiff_truncation
from gpupath.slide._slide import (
    MPP_PLAUSIBLE_MAX,
    MPP_PLAUSIBLE_MIN,
    BackendName,
    Slide,
    TileBatch,
    check_slide_file,
    describe_slide,
    mpp_plausible,
    open_slide,
)

__all__ = ["open_slide", "check_slide_file", "Slide", "TileBatch", "BackendName", "MPP_PLAUSIBLE_MAX",
           "ome_mpp", "ome_annotations", "tiff_truncation", "tiff_pages", "MPP_PLAUSIBLE_MIN", "mpp_plausible",
           "describe_slide"]
