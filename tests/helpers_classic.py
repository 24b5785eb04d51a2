"""Known-answer H&E tiles shared by the classic detector's tests (tests/test_classic.py) and the
nuclei-kernel tests (tests/kernels/test_nuclei_kernels.py)."""

from __future__ import annotations

import numpy as np

from gpupath.detect.classic import RUIFROK_HE_OD

MPP = 0.5  # µm per tile px


def he_tile(discs: list[tuple[float, float, float]], rng: np.random.Generator, size_px: int = 128) -> np.ndarray:
    """Beer-Lambert H&E tile: faint eosin background, hematoxylin discs (x, y, radius px; pixel c spans [c, c+1))."""
    yy, xx = np.mgrid[:size_px, :size_px] + 0.5
    c_h = np.full((size_px, size_px), 0.05)
    for x, y, r in discs:
        c_h += 1.1 * np.clip(r + 0.5 - np.hypot(xx - x, yy - y), 0, 1)  # anti-aliased disc
    c_e = 0.35 + 0.03 * rng.standard_normal((size_px, size_px))
    od = c_h[..., None] * RUIFROK_HE_OD[:, 0] + c_e[..., None] * RUIFROK_HE_OD[:, 1]
    return np.clip(np.rint(240 * np.exp(-od)), 0, 255).astype(np.uint8)


DISCS = [(30.3, 40.7, 7.0), (90.0, 30.0, 9.0), (64.5, 100.2, 6.0)]
