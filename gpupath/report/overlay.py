"""Thumbnail overlays: a slide's detections, tissue outline and a scale bar on one small RGB image.

Takes a thumbnail (``(H, W, 3) uint8`` on the host, covering the whole level-0 extent
``[0, width_px) x [0, height_px)``), detection boxes in level-0 px (``x0, y0, x1, y1``,
half-open) with integer labels, and optionally a tissue mask (any resolution, also covering the
whole slide). Returns an :class:`Overlay` (a PIL RGB image and how it was drawn). Host only
(NumPy, SciPy, Pillow): a report is drawn once per slide, on at most ``max_px`` x ``max_px`` pixels.

Colours: label index ``i`` (the position of its class in the detector's class list) is drawn in
``label_colour(i)``; :func:`label_colours` maps class names to those colours, and the HTML
report, the GeoJSON export and the viewer use the same map. Given the class names, an overlay
whose detections are drawn one by one carries a legend in its top-right corner: a swatch, the
class name and its count per class, every class of the detector included (0 when absent).

Drawing rule: detections are drawn one by one (box outlines, or dots where a box is under
``MIN_BOX_PX`` overlay px) while their mean spacing over the tissue stays at or above
``sqrt(DENSE_PX2)`` overlay px; denser than that, single marks would merge into a solid
blot, so a density heatmap (detections per mm² on ``HEATMAP_CELL_PX``-px cells, colour map with
alpha, legend in the top-right corner) replaces them; cells are
sized for about ``HEATMAP_PER_CELL`` detections each on the tissue (``HEATMAP_CELL_PX`` to
``HEATMAP_MAX_CELL_PX`` px), so the map shows density, not counting noise.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.ndimage
from PIL import Image, ImageDraw, ImageFont

from gpupath.report.colours import LABEL_COLOURS, label_colour
from gpupath.slide import Slide
from gpupath.tissue import read_overview

__all__ = ["Overlay", "render_overlay", "slide_thumbnail", "blank_thumbnail", "nice_length_um",
           "colour_map", "length_label", "png_bytes", "TISSUE_COLOUR", "DENSE_PX2", "HEATMAP_CELL_PX", "HEATMAP_MAX_CELL_PX",
           "HEATMAP_PER_CELL", "MIN_BOX_PX"]

DENSE_PX2 = 25.0          # overlay px² of tissue per detection below which a heatmap is drawn (spacing < 5 px)
HEATMAP_CELL_PX = 8       # smallest heatmap cell side, overlay px
HEATMAP_MAX_CELL_PX = 64  # largest
HEATMAP_PER_CELL = 10     # cells are sized for about this many detections each (less Poisson noise)
HEATMAP_ALPHA = 0.65      # opacity of non-empty heatmap cells
MIN_BOX_PX = 3.0          # boxes smaller than this (overlay px) are drawn as dots
TISSUE_COLOUR = (20, 60, 230)
SCALE_BAR_COLOUR = (0, 0, 0)
# anchor colours of the heatmap colour map, low to high (viridis: perceptually ordered, ends in a
# saturated yellow that still shows on white glass)
_CMAP_ANCHORS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
                          (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], np.float64)

OverlayMode = Literal["boxes", "dots", "heatmap", "none"]


@dataclass(frozen=True, slots=True)
class Overlay:
    """An overlay image and how it was drawn.

    Overlay px (c, r) covers level-0 ``[c / scale_x, (c + 1) / scale_x) x [r / scale_y, (r + 1) / scale_y)``.
    """

    image: Image.Image                  # RGB, (width, height) = thumbnail size
    scale_x: float                      # overlay px per level-0 px, x
    scale_y: float                      # overlay px per level-0 px, y
    mode: OverlayMode                   # how detections were drawn
    n_drawn: int                        # detections drawn (all of them, in every mode)
    scale_bar_um: float | None          # length the scale bar stands for (None: mpp unknown, no bar)
    scale_bar_px: int                   # its length, overlay px (0: no bar)
    scale_bar_xy: tuple[int, int]       # overlay px of the bar's left end, top row (x, y)
    heatmap_max_per_mm2: float | None   # density at the top of the colour map (heatmap mode)
    heatmap_cell_px: int                # heatmap cell side, overlay px (0: no heatmap)
    tissue_outline: bool                # a tissue outline was drawn
    legend_box: tuple[int, int, int, int] | None = None  # class legend, overlay px (x0, y0, x1, y1), inclusive
    legend_labels: tuple[str, ...] = ()  # the classes it names, top to bottom (colour: label_colour(row))

    @property
    def downsample(self) -> float:
        """Level-0 px per overlay px (x)."""
        return 1.0 / self.scale_x


def slide_thumbnail(slide: Slide, *, max_px: int = 1024) -> np.ndarray:
    """RGB thumbnail of a whole slide fitting in ``max_px`` x ``max_px``, read in bounded blocks.

    Returns
    -------
    (H, W, 3) uint8 on the host; covers the level-0 extent ``slide.dimensions``.
    """
    if max_px < 16:
        raise ValueError(f"max_px must be >= 16, got {max_px}")
    w0, h0 = slide.dimensions
    tw, th = _fit(w0, h0, max_px)
    overview, _ = read_overview(slide, max(1.0, max(w0, h0) / max_px), device="cpu")
    img = Image.fromarray(np.asarray(overview))
    if img.size != (tw, th):
        img = img.resize((tw, th), Image.Resampling.LANCZOS)
    return np.asarray(img.convert("RGB"))


def blank_thumbnail(width_px: int, height_px: int, *, max_px: int = 1024) -> np.ndarray:
    """A light grey canvas of a slide's thumbnail size (when the slide file cannot be read)."""
    tw, th = _fit(width_px, height_px, max_px)
    return np.full((th, tw, 3), 232, np.uint8)


def _fit(w0: int, h0: int, max_px: int) -> tuple[int, int]:
    if w0 < 1 or h0 < 1:
        raise ValueError(f"slide size must be positive, got {w0} x {h0} px")
    scale = min(1.0, max_px / max(w0, h0))
    return max(1, round(w0 * scale)), max(1, round(h0 * scale))


def nice_length_um(max_um: float) -> float:
    """The largest 1, 2 or 5 x 10^k µm not above ``max_um`` (a scale bar length)."""
    if not (max_um > 0 and math.isfinite(max_um)):
        raise ValueError(f"max_um must be positive and finite, got {max_um}")
    exp = math.floor(math.log10(max_um))
    for mant in (5.0, 2.0, 1.0):
        if mant * 10.0**exp <= max_um * (1 + 1e-9):
            return mant * 10.0**exp
    return 10.0**exp  # not reached: 1 x 10^floor(log10) <= max_um


def length_label(um: float) -> str:
    """A scale bar's label: ``500 µm``, ``2 mm``."""
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


@functools.lru_cache(maxsize=16)
def _font(size_px: int) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, bool]:
    """(font, whether it has µ and ²): DejaVu Sans where installed, else Pillow's bundled font (ASCII only)."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size_px), True
    except OSError:  # no DejaVu on this machine: Pillow's own font, labels spelled in ASCII
        return ImageFont.load_default(size=size_px), False


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, *, size_px: int,
               fill: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Draw ``text`` with its bounding box's top-left at ``xy``; return that box (x0, y0, x1, y1)."""
    font, unicode_ok = _font(size_px)
    if not unicode_ok:
        text = text.replace("µ", "u").replace("²", "2")
    bx0, by0, bx1, by1 = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - bx0, xy[1] - by0), text, fill=fill, font=font)
    return int(xy[0]), int(xy[1]), int(xy[0] + bx1 - bx0), int(xy[1] + by1 - by0)


def _text_size(draw: ImageDraw.ImageDraw, text: str, *, size_px: int) -> tuple[int, int]:
    font, unicode_ok = _font(size_px)
    if not unicode_ok:
        text = text.replace("µ", "u").replace("²", "2")
    bx0, by0, bx1, by1 = draw.textbbox((0, 0), text, font=font)
    return bx1 - bx0, by1 - by0


def colour_map(values: np.ndarray) -> np.ndarray:
    """RGB uint8 of values in [0, 1] (clipped) on the heatmap colour map; shape ``values.shape + (3,)``."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0) * (len(_CMAP_ANCHORS) - 1)
    lo = np.minimum(np.floor(v).astype(np.int64), len(_CMAP_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return np.rint(_CMAP_ANCHORS[lo] * (1 - t) + _CMAP_ANCHORS[lo + 1] * t).astype(np.uint8)


def render_overlay(thumbnail: np.ndarray, *, level0_size: tuple[int, int], mpp: float | None,
                   boxes_l0: np.ndarray, labels: np.ndarray | None = None, tissue: np.ndarray | None = None,
                   label_names: Sequence[str] | None = None, dense_px2: float = DENSE_PX2, note: str = "") -> Overlay:
    """Draw detections, the tissue outline and a scale bar on a slide thumbnail.

    Parameters
    ----------
    thumbnail : (H, W, 3) uint8, the whole slide (level-0 extent ``level0_size``).
    level0_size : (width, height) of level 0, px.
    mpp : level-0 µm/px (None: no scale bar, heatmap in detections per cell).
    boxes_l0 : (N, 4) float, level-0 ``x0, y0, x1, y1`` (half-open).
    labels : (N,) int label indices (colours: :func:`label_colour`); None: all label 0.
    tissue : (rows, cols) bool tissue mask over the whole slide, any resolution; None: no outline,
        and the dense test uses the whole thumbnail's area.
    label_names : class name of each label index (every label of ``labels`` must have one); given,
        detections drawn one by one get a class legend (swatch, name, count) in the top-right
        corner. None: no legend.
    dense_px2 : overlay px² of tissue per detection under which a heatmap is drawn.
    note : a line written across the top of the image (e.g. why it is blank).

    Returns
    -------
    Overlay
    """
    rgb = np.ascontiguousarray(thumbnail)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"thumbnail must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    boxes = np.asarray(boxes_l0, np.float64).reshape(-1, 4)
    labels = np.zeros(len(boxes), np.int64) if labels is None else np.asarray(labels, np.int64)
    if labels.shape != (len(boxes),):
        raise ValueError(f"labels must be ({len(boxes)},), got {labels.shape}")
    names = None if label_names is None else [str(n) for n in label_names]
    if names is not None and len(labels) and not (0 <= labels.min() and labels.max() < len(names)):
        raise ValueError(f"labels must index label_names ({len(names)} names), got labels "
                         f"{labels.min()}..{labels.max()}")
    w0, h0 = level0_size
    th, tw = rgb.shape[:2]
    sx, sy = tw / w0, th / h0
    img = Image.fromarray(rgb, "RGB")
    tissue_small = None if tissue is None else _resize_mask(np.asarray(tissue, bool), (tw, th))
    area_px2 = float(tissue_small.sum()) if tissue_small is not None and tissue_small.any() else float(tw * th)
    mode: OverlayMode = "none"
    heat_max, cell_px = None, 0
    if len(boxes) and len(boxes) * dense_px2 > area_px2:
        mode = "heatmap"
        cell_px = int(np.clip(math.ceil(math.sqrt(HEATMAP_PER_CELL * area_px2 / len(boxes))), HEATMAP_CELL_PX,
                              HEATMAP_MAX_CELL_PX))
        img, heat_max = _draw_heatmap(img, boxes, sx, sy, mpp, cell_px)
    elif len(boxes):
        mode = _draw_marks(img, boxes, labels, sx, sy)
    if tissue_small is not None:
        _draw_outline(img, tissue_small)
    draw = ImageDraw.Draw(img)
    band_px = 0
    if note:  # a white band across the top
        size = max(10, min(16, tw // 40))
        band_px = _text_size(draw, note, size_px=size)[1] + 8
        draw.rectangle((0, 0, tw, band_px), fill=(255, 255, 255))
        _draw_text(draw, (4, 4), note, size_px=size, fill=(160, 0, 0))
    bar_um, bar_px, bar_xy = _draw_scale_bar(draw, tw, th, mpp / sx if mpp else None)
    legend_box = None
    if heat_max is not None:
        _draw_legend(draw, tw, band_px, heat_max, per_mm2=mpp is not None)
    elif names and mode != "none":  # marks in class colours: say which colour is which class
        counts = np.bincount(labels, minlength=len(names))
        legend_box = _draw_class_legend(draw, tw, th, band_px, [(n, int(c)) for n, c in zip(names, counts)])
    return Overlay(image=img, scale_x=sx, scale_y=sy, mode=mode, n_drawn=len(boxes), scale_bar_um=bar_um,
                   scale_bar_px=bar_px, scale_bar_xy=bar_xy, heatmap_max_per_mm2=heat_max,
                   heatmap_cell_px=cell_px, tissue_outline=tissue_small is not None, legend_box=legend_box,
                   legend_labels=tuple(names) if legend_box is not None and names else ())


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool (rows, cols) mask to (width, height)."""
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"tissue mask must be a non-empty (rows, cols) array, got shape {mask.shape}")
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127


def _draw_marks(img: Image.Image, boxes: np.ndarray, labels: np.ndarray, sx: float, sy: float) -> OverlayMode:
    """Box outlines (or dots where boxes are tiny) in each label's colour."""
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = boxes[:, 0] * sx, boxes[:, 1] * sy, boxes[:, 2] * sx, boxes[:, 3] * sy
    big = np.minimum(x1 - x0, y1 - y0) >= MIN_BOX_PX
    for i in np.flatnonzero(big):
        draw.rectangle((x0[i], y0[i], x1[i] - 1, y1[i] - 1), outline=label_colour(labels[i]))
    arr = np.array(img)
    small = np.flatnonzero(~big)
    if len(small):  # 2 x 2 px dots centred on the box, vectorised
        cx = np.clip(np.floor((x0[small] + x1[small]) / 2).astype(np.int64), 0, arr.shape[1] - 1)
        cy = np.clip(np.floor((y0[small] + y1[small]) / 2).astype(np.int64), 0, arr.shape[0] - 1)
        colours = np.array(LABEL_COLOURS, np.uint8)[labels[small] % len(LABEL_COLOURS)]
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            arr[np.minimum(cy + dy, arr.shape[0] - 1), np.minimum(cx + dx, arr.shape[1] - 1)] = colours
    img.paste(Image.fromarray(arr, "RGB"))
    return "boxes" if big.sum() >= len(boxes) / 2 else "dots"


def _draw_heatmap(img: Image.Image, boxes: np.ndarray, sx: float, sy: float, mpp: float | None,
                  cell: int) -> tuple[Image.Image, float]:
    """Detections per mm² (per cell without mpp) on ``cell``-px cells, alpha-blended."""
    tw, th = img.size
    n_cols, n_rows = math.ceil(tw / cell), math.ceil(th / cell)
    cx = np.clip(((boxes[:, 0] + boxes[:, 2]) / 2 * sx // cell).astype(np.int64), 0, n_cols - 1)
    cy = np.clip(((boxes[:, 1] + boxes[:, 3]) / 2 * sy // cell).astype(np.int64), 0, n_rows - 1)
    counts = np.bincount(cy * n_cols + cx, minlength=n_rows * n_cols).reshape(n_rows, n_cols).astype(np.float64)
    cell_mm2 = (cell / sx * mpp / 1000) * (cell / sy * mpp / 1000) if mpp else 1.0
    density = counts / cell_mm2
    top = float(np.percentile(density[counts > 0], 99))  # robust top: a few crowded edge cells do not wash it out
    top = top if top > 0 else 1.0
    colours = colour_map(density / top)
    alpha = np.where(counts > 0, round(255 * HEATMAP_ALPHA), 0).astype(np.uint8)
    layer = np.concatenate([colours, alpha[..., None]], axis=-1)
    layer = np.repeat(np.repeat(layer, cell, axis=0), cell, axis=1)[:th, :tw]
    out = Image.alpha_composite(img.convert("RGBA"), Image.fromarray(layer, "RGBA")).convert("RGB")
    return out, top


def _draw_outline(img: Image.Image, mask: np.ndarray) -> None:
    """Boundary pixels of the tissue mask (2 px thick on thumbnails over 512 px)."""
    edge = mask & ~scipy.ndimage.binary_erosion(mask, border_value=0)
    if max(mask.shape) > 512:
        edge = scipy.ndimage.binary_dilation(edge) & mask
    arr = np.array(img)
    arr[edge] = TISSUE_COLOUR
    img.paste(Image.fromarray(arr, "RGB"))


def _draw_scale_bar(draw: ImageDraw.ImageDraw, tw: int, th: int,
                    um_per_px: float | None) -> tuple[float | None, int, tuple[int, int]]:
    """A black bar about a fifth of the width, labelled in µm or mm, on a white box at the bottom left."""
    if not um_per_px or tw < 32 or th < 24:
        return None, 0, (0, 0)
    length_um = nice_length_um(tw / 5 * um_per_px)
    bar_px = max(1, round(length_um / um_per_px))
    size = max(9, min(16, tw // 40))
    label = length_label(length_um)
    text_w, text_h = _text_size(draw, label, size_px=size)
    bar_h = max(3, th // 150)
    pad = max(3, tw // 150)
    x = 2 * pad
    y = th - 2 * pad - bar_h
    text_top = y - pad - text_h
    draw.rectangle((x - pad, text_top - pad, x + max(bar_px, text_w) + pad - 1, th - pad), fill=(255, 255, 255))
    draw.rectangle((x, y, x + bar_px - 1, y + bar_h - 1), fill=SCALE_BAR_COLOUR)
    _draw_text(draw, (x, text_top), label, size_px=size, fill=SCALE_BAR_COLOUR)
    return length_um, bar_px, (x, y)


def _draw_legend(draw: ImageDraw.ImageDraw, tw: int, y_top: int, top: float, *, per_mm2: bool) -> None:
    """Colour bar of the heatmap in the top-right corner (below ``y_top``): 0 .. top per mm² (or per cell)."""
    size = max(9, min(14, tw // 50))
    bar_w, bar_h, pad = max(40, tw // 6), max(6, tw // 100), 4
    label = f"0 - {top:,.0f} / mm²" if per_mm2 else f"0 - {top:,.0f} / cell"
    text_w, text_h = _text_size(draw, label, size_px=size)
    x1 = tw - 2 * pad
    x0 = x1 - bar_w
    y0 = y_top + 2 * pad
    draw.rectangle((min(x0, x1 - text_w) - pad, y0 - pad, tw - pad, y0 + bar_h + 2 * pad + text_h),
                   fill=(255, 255, 255))
    ramp = colour_map(np.linspace(0, 1, bar_w))
    for i, c in enumerate(ramp):
        draw.line((x0 + i, y0, x0 + i, y0 + bar_h - 1), fill=tuple(int(v) for v in c))
    _draw_text(draw, (x1 - text_w, y0 + bar_h + pad), label, size_px=size, fill=(0, 0, 0))


def _draw_class_legend(draw: ImageDraw.ImageDraw, tw: int, th: int, y_top: int,
                       entries: list[tuple[str, int]]) -> tuple[int, int, int, int] | None:
    """Class legend in the top-right corner (below ``y_top``): one row per class, a swatch in its label
    colour, its name and count, on a white box; returns the box (inclusive px) or None where it does
    not fit in half the image."""
    size = max(9, min(14, tw // 50))
    pad = 4
    texts = [f"{name} ({count:,})" for name, count in entries]
    text_h = max(_text_size(draw, "Ag", size_px=size)[1], size)
    text_w = max(_text_size(draw, t, size_px=size)[0] for t in texts)
    swatch = text_h
    box_w = 3 * pad + swatch + text_w
    box_h = pad + len(texts) * (text_h + pad)
    x1, y0 = tw - pad - 1, y_top + pad
    x0, y1 = x1 - box_w, y0 + box_h
    if box_w > tw // 2 or y1 > y_top + (th - y_top) // 2:
        return None  # a legend covering half the slide hides more than it explains; the report lists the classes
    draw.rectangle((x0, y0, x1, y1), fill=(255, 255, 255), outline=(90, 90, 90))
    for row, text in enumerate(texts):
        ry = y0 + pad + row * (text_h + pad)
        draw.rectangle((x0 + pad, ry, x0 + pad + swatch - 1, ry + swatch - 1), fill=label_colour(row))
        _draw_text(draw, (x0 + 2 * pad + swatch, ry), text, size_px=size, fill=(0, 0, 0))
    return x0, y0, x1, y1


def png_bytes(image: Image.Image, *, max_px: int | None = None, fmt: str = "PNG") -> bytes:
    """Encode an image (optionally shrunk to fit ``max_px``) as PNG or JPEG bytes."""
    if max_px is not None and max(image.size) > max_px:
        image = image.copy()
        image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt, **({} if fmt == "PNG" else {"quality": 80}))
    return buf.getvalue()
