"""Generated H&E slides with exact nuclei: the auxiliary training source and the pipeline check.

Slides come from :mod:`gpupath.synthetic` (level-0 0.25 or 0.5 µm/px, nucleus radii 2.5-5.5 µm,
1500-5000 nuclei/mm², JPEG quality 70-95, RGB- or YCbCr-coded), read the way the pipeline reads
them (``open_slide`` -> tissue mask -> 256-px tiles at 0.5 µm/px).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpupath.synthetic import SyntheticSpec
from gpupath.tiling import DEFAULT_TARGET_MPP

TILE_PX = 256
TARGET_MPP = DEFAULT_TARGET_MPP
MATCH_PX = 4.0
TRAIN_SEEDS = tuple(range(1000, 1008))
EVAL_SEEDS = (2000, 2001, 2002)      # never trained on: the card's generated-slide figures come from these


def synthetic_spec(seed: int) -> SyntheticSpec:
    rng = np.random.default_rng(seed)
    mpp = float(rng.choice([0.25, 0.5]))
    lo = float(rng.uniform(2.5, 3.5))
    hi = float(rng.uniform(lo + 0.8, 5.5))
    size = 4096 if mpp == 0.25 else 2048
    # the generator fits about 68,000 / hi² nuclei per mm² with centres 3 radii apart
    return SyntheticSpec(width_px=size, height_px=size, mpp=mpp, seed=seed, nucleus_radius_um=(lo, hi),
                         nuclei_per_mm2=min(float(rng.uniform(1500, 5000)), 0.85 * 68_000 / hi**2),
                         tissue_fraction=float(rng.uniform(0.4, 0.7)),
                         jpeg_quality=int(rng.integers(70, 96)), jpeg_ycbcr=bool(rng.integers(0, 2)))


def read_slide_tiles(path: Path, *, normalise: bool) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Tiles (N, 256, 256, 3) of a slide as the pipeline reads them, their level-0 origins (N, 2)
    (exact floats), level-0 px per tile px and the slide's mpp."""
    from gpupath import stain
    from gpupath.pipeline import RunParams
    from gpupath.tile_loop import read_grid_tiles
    from gpupath.slide import open_slide
    from gpupath.tiling import TileSpec, tile_grid
    from gpupath.tissue import compute_tissue

    params = RunParams(tile=TileSpec(tile_px=TILE_PX, target_mpp=TARGET_MPP), stain="none")
    with open_slide(path) as slide:
        mpp = slide.require_mpp()
        grid = tile_grid(level_dimensions=slide.level_dimensions, level_downsamples=slide.level_downsamples,
                         mpp=mpp, mask=compute_tissue(slide, mpp=mpp), spec=params.tile)
        tiles = read_grid_tiles(slide, grid, np.arange(len(grid))).pixels
    if normalise:
        tiles = stain.apply_macenko(tiles, stain.fit_macenko(tiles))
    origins = np.c_[grid.x_lvl * grid.downsample, grid.y_lvl * grid.downsample].astype(np.float64)
    return tiles, origins, grid.l0_per_tile_px, mpp


def slide_tiles_with_truth(work: Path, seed: int) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
    """Tiles (N, 256, 256, 3) of a generated slide and per tile its nuclei (x, y, radius) in tile px
    (half-open)."""
    from gpupath.synthetic import read_nuclei, write_synthetic_slide

    path = work / f"synthetic-{seed}.svs"
    if not path.exists():
        write_synthetic_slide(path, synthetic_spec(seed))
    tiles, origins, l0_per_px, _ = read_slide_tiles(path, normalise=False)
    nuc = read_nuclei(path)
    truth = []
    for ox, oy in origins:
        cx, cy = (nuc["x_px"] - ox) / l0_per_px, (nuc["y_px"] - oy) / l0_per_px
        inside = (cx >= -8) & (cx < TILE_PX + 8) & (cy >= -8) & (cy < TILE_PX + 8)
        truth.append((cx[inside], cy[inside], nuc["radius_px"][inside] / l0_per_px))
    return tiles, truth


def evaluate_synthetic(card: Path, work: Path, seeds: tuple[int, ...], *, engine: str = "onnxruntime"
                       ) -> list[tuple[int, float, float, int]]:
    """(seed, recall, precision, n_true) of the full pipeline on generated slides (centres within 4 px)."""
    import pyarrow.parquet as pq

    from gpupath.detect.boxes import match_one_to_one
    from gpupath.pipeline import RunParams, process_slide
    from gpupath.synthetic import read_nuclei, write_synthetic_slide
    from gpupath.tiling import TileSpec

    rows = []
    for seed in seeds:
        path = work / f"eval-{seed}.svs"
        if not path.exists():
            write_synthetic_slide(path, synthetic_spec(seed))
        out = work / f"eval-out-{seed}"
        res = process_slide(path, out, RunParams(tile=TileSpec(overlap_px=32), engine=engine, model_card=str(card)))
        if res.status != "ok":
            raise RuntimeError(res.error)
        t = pq.read_table(out / "detections" / f"slide_id={res.slide_id}" / "part-0.parquet")
        cx = (t.column("x0_px").to_numpy() + t.column("x1_px").to_numpy()) / 2
        cy = (t.column("y0_px").to_numpy() + t.column("y1_px").to_numpy()) / 2
        nuc = read_nuclei(path)
        truth = np.c_[nuc["x_px"], nuc["y_px"]]
        m = len(match_one_to_one(truth, np.c_[cx, cy], MATCH_PX)[0])
        rows.append((seed, m / max(len(truth), 1), m / max(len(cx), 1), len(truth)))
    return rows
