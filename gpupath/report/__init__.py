"""Reports of a run: overlay images, per-slide summaries, self-contained HTML pages (see `build`)."""

from gpupath.report.build import (
    MAX_PX,
    build_index,
    build_reports,
    report_paths,
    write_slide_outputs,
)
from gpupath.report.html import index_html, slide_report_html
from gpupath.report.overlay import Overlay, render_overlay, slide_thumbnail
from gpupath.report.summary import label_counts, read_run, slide_summary

__all__ = [
    "MAX_PX",
    "build_index",
    "build_reports",
    "report_paths",
    "write_slide_outputs",
    "index_html",
    "slide_report_html",
    "Overlay",
    "render_overlay",
    "slide_thumbnail",
    "label_counts",
    "read_run",
    "slide_summary",
]
