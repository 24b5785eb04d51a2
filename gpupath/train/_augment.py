"""Training crops: augmentation and CenterNet targets on the 4-px grid.

Per crop: one of the three stain renderings (none / Macenko / Vahadane), a scale of x0.9-1.1,
a window that may reach up to PAD_PX past the image edge (filled white, as the pipeline's reader
fills outside a slide), a 90° rotation and flip, HED jitter (Tellez et al. 2018: per-stain
concentration scale x0.9-1.1 and shift ±0.03 OD, Ruifrok & Johnston's H, E, DAB basis), Gaussian
blur (a quarter of crops, sigma 0.4-1.2 px) and JPEG re-encoding (a third, quality 50-95).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from gpupath.detect.net import V2_STRIDE_PX as STRIDE_PX
from gpupath.train._data import RENDERINGS, TrainImage

PAD_PX = 24
SCALE_RANGE = (0.9, 1.1)
# Ruifrok & Johnston H, E, DAB optical-density vectors (rows), unit length
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
_HED /= np.linalg.norm(_HED, axis=1, keepdims=True)
_HED_INV = np.linalg.inv(_HED)


@dataclass(slots=True)
class CropBatch:
    """Inputs and targets of one step (NumPy, grid g = crop_px / 4)."""

    rgb: np.ndarray       # (B, crop, crop, 3) float32 in [0, 255]
    heat: np.ndarray      # (B, g, g) float32 Gaussian target, 1 at centre cells
    label: np.ndarray     # (B, g, g) int64 class at centre cells, -1 elsewhere / unknown
    radius: np.ndarray    # (B, g, g) float32 px at centre cells
    offset: np.ndarray    # (B, 2, g, g) float32 (x, y) in-cell offset at centre cells


def _window(rgb: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """rgb[y0:y0+side, x0:x0+side], white where it leaves the image."""
    h, w = rgb.shape[:2]
    out = np.full((side, side, 3), 255, np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


def _hed_jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)
    conc = od.reshape(-1, 3) @ _HED_INV
    conc = conc * rng.uniform(0.9, 1.1, 3) + rng.uniform(-0.03, 0.03, 3)
    out = 256.0 * np.exp(-(conc @ _HED)) - 1.0
    return np.clip(out, 0, 255).reshape(rgb.shape).astype(np.uint8)


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def sample_crop(image: TrainImage, rng: np.random.Generator, crop_px: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(crop (crop, crop, 3) uint8, x, y, radius, label) of one augmented crop."""
    from PIL import Image

    rgb = image.pixels[RENDERINGS[int(rng.integers(len(RENDERINGS)))]]
    h, w = rgb.shape[:2]
    scale = float(rng.uniform(*SCALE_RANGE))
    side = max(8, round(crop_px * scale))
    x0 = int(rng.integers(-PAD_PX, max(w - side + PAD_PX, -PAD_PX) + 1))
    y0 = int(rng.integers(-PAD_PX, max(h - side + PAD_PX, -PAD_PX) + 1))
    crop = _window(rgb, x0, y0, side)
    if side != crop_px:
        crop = np.asarray(Image.fromarray(crop).resize((crop_px, crop_px), Image.Resampling.BILINEAR))
    f = crop_px / side
    x, y, r = (image.x_px - x0) * f, (image.y_px - y0) * f, image.radius_px * f
    # rotation by k * 90° (counter-clockwise in the displayed image) and an x flip, points along
    k = int(rng.integers(4))
    for _ in range(k):
        crop = np.rot90(crop)
        x, y = y, crop_px - x
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
        x = crop_px - x
    crop = _hed_jitter(np.ascontiguousarray(crop), rng)
    if rng.random() < 0.25:
        from scipy.ndimage import gaussian_filter

        s = float(rng.uniform(0.4, 1.2))
        crop = np.clip(gaussian_filter(crop.astype(np.float32), (s, s, 0)), 0, 255).astype(np.uint8)
    if rng.random() < 1 / 3:
        crop = _jpeg(crop, int(rng.integers(50, 96)))
    keep = (x >= -8) & (x < crop_px + 8) & (y >= -8) & (y < crop_px + 8)
    return crop, x[keep], y[keep], r[keep], image.label[keep]


def cell_targets(x: np.ndarray, y: np.ndarray, radius: np.ndarray, label: np.ndarray, *, crop_px: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Heat (g, g), label (g, g), radius (g, g) and offset (2, g, g) targets for nuclei at crop px (x, y)."""
    g = crop_px // STRIDE_PX
    heat = np.zeros((g, g), np.float32)
    lab = np.full((g, g), -1, np.int64)
    rad = np.zeros((g, g), np.float32)
    off = np.zeros((2, g, g), np.float32)
    centres = np.arange(g) + 0.5
    for cx, cy, r, c in zip(x / STRIDE_PX, y / STRIDE_PX, radius, label):
        sigma = max(0.6, float(r) / STRIDE_PX / 3)
        gy = np.exp(-((centres - cy) ** 2) / (2 * sigma**2))
        gx = np.exp(-((centres - cx) ** 2) / (2 * sigma**2))
        np.maximum(heat, np.outer(gy, gx).astype(np.float32), out=heat)
        col, row = int(math.floor(cx)), int(math.floor(cy))
        if 0 <= col < g and 0 <= row < g:
            heat[row, col] = 1.0
            lab[row, col] = int(c)
            rad[row, col] = r
            off[:, row, col] = (cx - col, cy - row)
    return heat, lab, rad, off


def make_batch(images: list[TrainImage], picks: np.ndarray, rng: np.random.Generator, crop_px: int) -> CropBatch:
    """Augmented crops of ``images[picks]`` and their targets."""
    parts = []
    for i in picks:
        crop, x, y, r, lab = sample_crop(images[int(i)], rng, crop_px)
        parts.append((crop, *cell_targets(x, y, r, lab, crop_px=crop_px)))
    rgb, heat, lab, rad, off = (np.stack(a) for a in zip(*parts))
    return CropBatch(rgb.astype(np.float32), heat, lab, rad, off)
