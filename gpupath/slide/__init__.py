"""Slide reading: `open_slide` -> `Slide` over cuCIM, OpenSlide or tifffile (see `_slide`)."""

from gpupath.slide._meta import ome_annotations, ome_mpp, tiff_truncation
from gpupath.slide._slide import MPP_PLAUSIBLE_MAX, BackendName, Slide, TileBatch, check_slide_file, open_slide

__all__ = ["open_slide", "check_slide_file", "Slide", "TileBatch", "BackendName", "MPP_PLAUSIBLE_MAX",
           "ome_mpp", "ome_annotations", "tiff_truncation"]
