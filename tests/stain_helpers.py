"""Synthetic stained images with known stains, shared by the Macenko and Vahadane tests."""

from __future__ import annotations

import numpy as np

CMU_SMALL = "cmu-1-small-region.svs"
# level-0 (x, y) of 256 x 256 px tiles of cmu-1-small-region.svs, 31 % .. 76 % tissue
CMU_TILES_XY = [(1000, 600), (1200, 1200), (900, 2000), (1300, 2600), (800, 300), (1500, 1800), (1600, 1000)]
TILE_PX = 256

# known stains (unit OD vectors, R G B): set A near Ruifrok's H&E, set B a bluer H / pinker E
STAINS_A = np.array([[0.650, 0.268], [0.704, 0.570], [0.286, 0.776]])
STAINS_B = np.array([[0.550, 0.150], [0.780, 0.800], [0.300, 0.580]])
STAINS_A /= np.linalg.norm(STAINS_A, axis=0)
STAINS_B /= np.linalg.norm(STAINS_B, axis=0)


def beer_lambert(stains: np.ndarray, conc: np.ndarray, io: float = 240.0) -> np.ndarray:
    """uint8 RGB of concentrations (..., 2) under stains (3, 2): the inverse of OD = -ln((I+1)/io)."""
    return np.clip(np.rint(io * np.exp(-conc @ stains.T) - 1), 0, 255).astype(np.uint8)


def synthetic_conc(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """(*shape, 2) sparse concentrations: 20 % faint background, 25 % pure H, 25 % pure E, 30 % mixed."""
    kind = rng.choice(4, size=shape, p=[0.20, 0.25, 0.25, 0.30])
    conc = np.empty((*shape, 2))
    conc[..., 0] = np.where(kind == 1, rng.uniform(0.5, 1.5, shape), rng.uniform(0.3, 1.2, shape))
    conc[..., 1] = np.where(kind == 2, rng.uniform(0.6, 1.5, shape), rng.uniform(0.3, 1.2, shape))
    conc[kind == 1, 1] = 0.0
    conc[kind == 2, 0] = 0.0
    conc[kind == 0] = rng.uniform(0.0, 0.05, (int((kind == 0).sum()), 2))
    return conc
