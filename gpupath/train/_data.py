"""Training images for the nuclei model: human-annotated datasets and generated slides, as the
pipeline would show them to the detector.

Every image is held at the model's 0.5 µm/px in three renderings, the three ``--stain`` choices:
as scanned (``none``), Macenko-normalised to :data:`gpupath.stain.REFERENCE` and
Vahadane-normalised to :data:`gpupath.vahadane.VAHADANE_REFERENCE`, each fitted on the image
itself (the pipeline fits once per slide). Points are in image px, half-open convention.

Nucleus size. The human labels are points; the radius target at each point is the scale of the
strongest scale-normalised LoG response of the hematoxylin channel at it (Lindeberg: a disc of
radius r peaks at s = r / sqrt(2)), on the Macenko rendering, clipped to 2-9 px (1-4.5 µm). On generated slides the
radius is the generator's; :func:`log_radius_fit` measures how well the LoG rule recovers it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpupath.detect.annotations import AnnotatedImage, read_image

log = logging.getLogger("gpupath.train")

MODEL_MPP = 0.5
RENDERINGS = ("none", "macenko", "vahadane")
# radii searched at labelled points (px at 0.5 µm/px: 0.75 - 5 µm)
LOG_RADII_PX = np.geomspace(1.5, 10.0, 14)
RADIUS_SEARCH_PX = 0
RADIUS_CLIP_PX = (2.0, 9.0)   # 1 - 4.5 µm: outside it the LoG scale is texture, not the nucleus
UNKNOWN_CLASS = -1


@dataclass(slots=True)
class TrainImage:
    """One image (or generated tile) with its renderings and nuclei."""

    source: str                      # dataset name, or "synthetic"
    name: str
    pixels: dict[str, np.ndarray]    # rendering -> (H, W, 3) uint8
    x_px: np.ndarray                 # (N,) float64, half-open image px
    y_px: np.ndarray                 # (N,) float64
    radius_px: np.ndarray            # (N,) float32
    label: np.ndarray                # (N,) int16 class index, UNKNOWN_CLASS where the source has none


def _resample(rgb: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def renderings(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """The three --stain renderings of one image; a failed fit keeps the scanned pixels (as the pipeline does)."""
    from gpupath import stain, vahadane

    out = {"none": rgb}
    for name, fit, apply, target in (("macenko", stain.fit_macenko, stain.apply_macenko, stain.REFERENCE),
                                     ("vahadane", vahadane.fit_vahadane, vahadane.apply_vahadane,
                                      vahadane.VAHADANE_REFERENCE)):
        try:
            out[name] = np.asarray(apply(rgb, fit(rgb), target=target))
        except ValueError as exc:  # too little tissue to fit: the pipeline leaves such tiles as they are
            log.info("%s fit failed (%s): unnormalised pixels used", name, exc)
            out[name] = rgb
    return out


def log_radii(rgb_reference: np.ndarray, x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
    """Radius (px) at each point: the scale s maximising the scale-normalised LoG response
    ``-s^2 LoG_s`` of the hematoxylin channel at the point (its largest value within
    RADIUS_SEARCH_PX, per scale), as r = s * sqrt(2). ``rgb_reference`` is Macenko-normalised to
    gpupath.stain.REFERENCE."""
    from scipy import ndimage

    from gpupath import stain
    from gpupath.detect.classic import hematoxylin_od

    h = hematoxylin_od(rgb_reference, stain_matrix_od=stain.REFERENCE.stain_matrix_od).astype(np.float64)
    rows, cols = h.shape
    r = np.clip(np.floor(y_px).astype(np.int64), 0, rows - 1)
    c = np.clip(np.floor(x_px).astype(np.int64), 0, cols - 1)
    size = 2 * RADIUS_SEARCH_PX + 1
    at_points = np.stack([
        ndimage.maximum_filter(-(s * s) * ndimage.gaussian_laplace(h, s, mode="nearest"), size=size)[r, c]
        for s in LOG_RADII_PX / math.sqrt(2.0)])
    return np.clip(LOG_RADII_PX[np.argmax(at_points, axis=0)], *RADIUS_CLIP_PX).astype(np.float32)


def annotated_train_image(image: AnnotatedImage) -> TrainImage:
    """An annotated image at MODEL_MPP in its three renderings, with LoG radii at its points."""
    rgb = read_image(image)
    factor = image.mpp / MODEL_MPP
    x, y = image.x_px, image.y_px
    if abs(factor - 1.0) > 0.02:  # the pipeline would read this image at 0.5 µm/px: resample as it would
        rgb = _resample(rgb, factor)
        x, y = x * factor, y * factor
    pix = renderings(rgb)
    return TrainImage(image.dataset, image.name, pix, x, y, log_radii(pix["macenko"], x, y), image.label)


def synthetic_train_images(work: Path, seeds: tuple[int, ...]) -> list[TrainImage]:
    """Tiles of generated slides (written once under ``work``), read as the pipeline reads them and
    stain-fitted per slide, with the generator's exact nuclei and radii (no class: the class loss
    skips them)."""
    from gpupath.train._synthetic import slide_tiles_with_truth

    out = []
    for seed in seeds:
        tiles, truth = slide_tiles_with_truth(work, seed)
        pix = renderings(tiles)  # one fit per slide, as the pipeline fits
        for i, (x, y, r) in enumerate(truth):
            out.append(TrainImage("synthetic", f"{seed}-{i}", {k: v[i] for k, v in pix.items()}, x, y,
                                  r.astype(np.float32), np.full(len(x), UNKNOWN_CLASS, np.int16)))
        log.info("generated slide %d: %d tiles", seed, len(tiles))
    return out


def log_radius_fit(images: list[TrainImage]) -> dict[str, float]:
    """How well the LoG rule recovers the true radius on generated tiles: median absolute error (µm),
    median ratio and Pearson correlation over all their nuclei."""
    est, true = [], []
    for im in images:
        inside = ((im.x_px >= 4) & (im.y_px >= 4) & (im.x_px < im.pixels["none"].shape[1] - 4)
                  & (im.y_px < im.pixels["none"].shape[0] - 4))
        est.append(log_radii(im.pixels["macenko"], im.x_px[inside], im.y_px[inside]))
        true.append(im.radius_px[inside])
    e, t = np.concatenate(est).astype(np.float64), np.concatenate(true).astype(np.float64)
    if len(e) < 2:
        return {"nuclei": float(len(e))}
    return {"nuclei": float(len(e)), "median_abs_error_um": float(np.median(np.abs(e - t)) * MODEL_MPP),
            "median_ratio": float(np.median(e / t)), "pearson_r": float(np.corrcoef(e, t)[0, 1])}
