"""Write a run's report files: per slide an overlay, a summary and an HTML report; an index per run.

Layout in the run folder ``out`` (all written under a temporary name and renamed when complete)::

    overlays/<slide_id>.png     thumbnail (<= max_px a side) with detections, tissue outline, scale bar,
                                class legend (or, when too dense, a density heatmap and its colour bar)
    summaries/<slide_id>.json   counts per label, density per mm² of tissue, tissue mm², tiles, s per stage
    reports/<slide_id>.html     self-contained report (overlay embedded)
    index.html                  run overview: every slide of run.json, failures with their reasons

Inputs are the run's own files (``run.json``, the slide's detections partition) and the slide file
for the thumbnail, tissue outline and metadata; when the slide cannot be opened any more the overlay
is drawn on a blank canvas and the report says so. Host only; a slide costs one overview read at
the thumbnail's resolution and one at the tissue mask's (~8 µm/px), unless the caller passes the
open slide's tissue mask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gpupath.errors import ConfigError, GpupathError, unexpected
from gpupath.report.geojson import write_geojson
from gpupath.report.html import index_html, slide_report_html
from gpupath.report.colours import label_colours
from gpupath.report.overlay import (
    blank_thumbnail,
    length_label,
    png_bytes,
    render_overlay,
    slide_thumbnail,
)
from gpupath.report.summary import (
    label_counts,
    read_detections,
    read_run,
    read_summary,
    slide_metadata,
    slide_summary,
    summary_path,
)
from gpupath.files import atomic_path, write_json_atomic
from gpupath.results import slide_part_paths
from gpupath.slide import Slide, open_slide
from gpupath.tissue import TissueMask, compute_tissue

__all__ = ["write_slide_outputs", "build_index", "build_reports", "report_paths", "MAX_PX", "INDEX_THUMB_PX"]

log = logging.getLogger("gpupath.report")

MAX_PX = 1024          # longest side of an overlay, px
INDEX_THUMB_PX = 160   # longest side of an index thumbnail, px


def report_paths(out: Path, slide_id: str) -> dict[str, Path]:
    """Where one slide's report files go: ``overlay``, ``summary``, ``report``."""
    out = Path(out)
    return {"overlay": out / "overlays" / f"{slide_id}.png", "summary": summary_path(out, slide_id),
            "report": out / "reports" / f"{slide_id}.html"}


def write_slide_outputs(out: Path, result: Mapping[str, Any], *, params: Mapping[str, Any],
                        environment: Mapping[str, Any], slide: Slide | None = None,
                        tissue: TissueMask | None = None, max_px: int = MAX_PX,
                        run: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write a processed slide's overlay, summary and HTML report into the run folder ``out``.

    Parameters
    ----------
    out : the run folder (holds ``detections/slide_id=<id>/part-0.parquet``).
    result : the slide's SlideResult as a dict (``dataclasses.asdict`` or run.json's entry);
        ``status`` must be ``ok``.
    params : the run's parameters (``RunParams.to_dict()``).
    environment : the run's environment (versions, device, ``detector``: model, engine, sha256, classes).
    slide : the slide, already open (default: opened here from ``result["path"]``).
    tissue : its tissue mask as the pipeline computed it (default: computed here, on the CPU).
    max_px : longest side of the overlay, px.
    run : the run record, for the report's header (optional).

    Returns
    -------
    dict ``overlay``, ``summary``, ``report`` -> the paths written.

    Raises
    ------
    ValueError
        ``result`` is not a processed slide (no slide id, status not ok, no size).
    """
    slide_id = str(result.get("slide_id") or "")
    if not slide_id or result.get("status") != "ok":
        raise ValueError(f"{result.get('path')}: only processed slides get reports (status "
                         f"{result.get('status')!r}, slide_id {slide_id!r})")
    w0, h0 = result.get("width_px"), result.get("height_px")
    if not (isinstance(w0, int) and isinstance(h0, int) and w0 > 0 and h0 > 0):
        raise ValueError(f"{result.get('path')}: no level-0 size in its result (width_px={w0}, height_px={h0})")
    out = Path(out)
    paths = report_paths(out, slide_id)
    mpp = result.get("mpp")
    label_names = list((environment.get("detector") or {}).get("classes") or [])
    detections = read_detections(out, slide_id)
    counts, label_index = label_counts(detections, label_names)  # counts: the detector's classes, then any other
    boxes = np.stack([detections.column(c).to_numpy() for c in ("x0_px", "y0_px", "x1_px", "y1_px")], axis=1) \
        if detections.num_rows else np.zeros((0, 4))
    notes: list[str] = []
    if not slide_part_paths(out, slide_id)["detections"].is_file():
        notes.append("no detections partition in the run folder (deleted, or not written yet)")
    thumb, mask, metadata, note = _slide_pictures(result, slide=slide, tissue=tissue, max_px=max_px,
                                                  mpp=mpp, size=(w0, h0))
    if note:
        notes.append(note)
        if metadata is None:  # the slide is gone: keep what an earlier report recorded of its metadata
            metadata = (read_summary(out, slide_id) or {}).get("slide_metadata")
    overlay = render_overlay(thumb, level0_size=(w0, h0), mpp=mpp, boxes_l0=boxes, labels=label_index,
                             tissue=mask, label_names=list(counts),
                             note="slide file not readable: detections on a blank canvas" if note else "")
    png = png_bytes(overlay.image)
    overlay_info = {
        "path": f"overlays/{slide_id}.png", "mode": overlay.mode, "width_px": overlay.image.width,
        "height_px": overlay.image.height, "downsample": overlay.downsample,
        "scale_bar_um": overlay.scale_bar_um,
        "scale_bar_label": None if overlay.scale_bar_um is None else length_label(overlay.scale_bar_um),
        "heatmap_cell_px": overlay.heatmap_cell_px or None,
        "heatmap_max_per_mm2": overlay.heatmap_max_per_mm2, "note": note,
        "tissue_outline": overlay.tissue_outline,
        "legend": overlay.legend_box is not None,   # the class legend is drawn in the image (top right)
        "class_colours": {name: list(rgb) for name, rgb in label_colours(list(counts)).items()},
    }
    summary = slide_summary(result, detections, label_names=label_names, metadata=metadata,
                            overlay=overlay_info, notes=notes)
    with atomic_path(paths["overlay"]) as tmp:
        tmp.write_bytes(png)
    write_json_atomic(summary, paths["summary"])
    page = slide_report_html(summary, overlay_png=png, params=params, environment=environment, run=run)
    with atomic_path(paths["report"]) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return paths


def _slide_pictures(result: Mapping[str, Any], *, slide: Slide | None, tissue: TissueMask | None, max_px: int,
                    mpp: float | None, size: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, str] | None, str]:
    """(thumbnail, tissue mask, metadata, note): from the slide, or a blank canvas and why."""
    if slide is not None:
        return _from_slide(slide, tissue, max_px, mpp) + ("",)
    path = str(result.get("path", ""))
    try:
        # any backend that reads it (the thumbnail is for display); mpp as the run used it (maybe an override)
        with open_slide(path, mpp=mpp) as opened:
            if tuple(opened.dimensions) != tuple(size):
                raise ConfigError(f"{path}: now {opened.dimensions[0]} x {opened.dimensions[1]} px, the run read "
                                  f"{size[0]} x {size[1]} px (another file at that path)")
            return _from_slide(opened, tissue, max_px, mpp) + ("",)
    except (GpupathError, OSError, ValueError) as exc:
        note = f"slide file not readable now ({exc}); overlay drawn on a blank canvas"
        log.warning("%s", note)
        return blank_thumbnail(*size, max_px=max_px), None, None, note


def _from_slide(slide: Slide, tissue: TissueMask | None, max_px: int,
                mpp: float | None) -> tuple[np.ndarray, np.ndarray | None, dict[str, str]]:
    thumb = slide_thumbnail(slide, max_px=max_px)
    if tissue is None:
        tissue = compute_tissue(slide, mpp=mpp, device="cpu")
    return thumb, tissue.mask, slide_metadata(slide.properties)


def build_index(out: Path, *, report_errors: Mapping[str, str] | None = None) -> Path:
    """(Re)write ``out/index.html`` from run.json and the summaries and overlays present.

    ``report_errors``: slide path -> why its report could not be made (shown in the index).

    Raises
    ------
    ConfigError
        ``out`` holds no readable run.json.
    """
    out = Path(out)
    run = read_run(out)
    errors = dict(report_errors or {})
    rows = []
    for result in run["slides"]:
        slide_id = str(result.get("slide_id") or "")
        ok = result.get("status") == "ok" and slide_id
        paths = report_paths(out, slide_id) if ok else {}
        summary = read_summary(out, slide_id) if ok else None
        thumb = None
        if ok and paths["overlay"].is_file():
            try:
                with Image.open(paths["overlay"]) as img:
                    thumb = png_bytes(img, max_px=INDEX_THUMB_PX, fmt="JPEG")
            except OSError as exc:  # a damaged overlay costs the thumbnail, not the index
                log.warning("%s: unreadable overlay (%s)", paths["overlay"], exc)
        rows.append({"result": result, "summary": summary, "thumb_jpeg": thumb,
                     "report_href": f"reports/{slide_id}.html" if ok and paths["report"].is_file() else None,
                     "report_error": errors.get(str(result.get("path", "")), "")})
    page = index_html(run, rows, title=f"gpupath run {out.resolve().name}")
    final = out / "index.html"
    with atomic_path(final) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return final


def _selected(result: Mapping[str, Any], selectors: Sequence[str]) -> bool:
    path = str(result.get("path", ""))
    slide_id = str(result.get("slide_id") or "")
    return any(s and (s == path or s == Path(path).name or (slide_id and slide_id.startswith(s)))
               for s in selectors)


def build_reports(out: Path, *, slides: Sequence[str] | None = None, max_px: int = MAX_PX,
                  on_error: Callable[[str, str], None] | None = None) -> list[Path]:
    """(Re)build the reports of a run folder from its own files, then its index.

    Parameters
    ----------
    out : the run folder (holds run.json).
    slides : only these slides (slide id or a prefix of it, path, or file name); default all.
        The index always lists every slide of run.json.
    max_px : longest side of the overlays, px.
    on_error : called as ``on_error(slide path, reason)`` for each processed slide whose report
        could not be made (the others go on; the index names the reason).

    Returns
    -------
    The files written: per slide overlay, summary and report, then index.html last.

    Raises
    ------
    ConfigError
        No readable run.json in ``out``, or a selector matches no slide of the run.
    """
    out = Path(out)
    run = read_run(out)
    chosen = run["slides"]
    if slides is not None:
        unknown = [s for s in slides if not any(_selected(r, [s]) for r in chosen)]
        if unknown:
            raise ConfigError(f"{out}/run.json: no slide matches {', '.join(map(repr, unknown))} "
                              "(give a slide id or its prefix, a path or a file name)")
        chosen = [r for r in chosen if _selected(r, slides)]
    written: list[Path] = []
    errors: dict[str, str] = {}
    for result in chosen:
        if result.get("status") != "ok":
            continue  # failed slides appear in the index only, with their error
        try:
            written += write_slide_outputs(out, result, params=run.get("params") or {},
                                           environment=run.get("environment") or {}, max_px=max_px,
                                           run=run).values()
            written.append(write_geojson(out, str(result["slide_id"])))
        except Exception as exc:  # noqa: BLE001  one bad slide costs its report, not the others
            unexpected(log, f"{result.get('path')}: report", exc)
            reason = str(exc) if isinstance(exc, GpupathError) else f"{type(exc).__name__}: {exc}"
            errors[str(result.get("path", ""))] = reason
            log.warning("%s: report not made: %s", result.get("path"), reason)
            if on_error is not None:
                on_error(str(result.get("path", "")), reason)
    written.append(build_index(out, report_errors=errors))
    return written
