"""Train the shipped nuclei detector (``nuclei_v1``) on the CPU and export it.

    python -m gpupath.detect.train --work /tmp/nuclei-train --out gpupath/detect/models

(the shipped model: ``--steps 5000 --batch 16 --seed 0``, the defaults; ``--eval-only``
re-measures the card's figures for the weights already in ``--out``.)

Needs the ``train`` extra (torch, onnx). Deterministic for a given seed on one machine (torch
CPU kernels, seeded generators); about ten minutes on two cores.

Training data, all read the way the pipeline reads tiles (``open_slide`` -> tissue mask ->
256-px tiles at 0.5 µm/px, JPEG-decoded and resized by the pipeline's own code):

- **generated H&E slides** (``gpupath.synthetic``) with known nuclei: 12 slides, seeds
  1000-1011, level-0 0.25 or 0.5 µm/px, nucleus radii 2.5-5.5 µm, 1500-5000 nuclei/mm²,
  JPEG quality 70-95, RGB- or YCbCr-coded. Labels: the generator's nucleus table (exact).
- **real H&E** tiles of ``cmu-1-small-region.svs`` (OpenSlide's CMU-1, skin), left two thirds
  only (the right third is held out). Labels: *consensus pseudo-labels* — the classic detector
  (LoG on the hematoxylin channel, recall/precision >= 0.99 on generated slides) run on the
  Macenko- and on the Vahadane-normalised tile; a nucleus is a positive where both find it
  (within 4 px) with score >= 0.6, and cells near a detection that only one of them finds are
  left out of the loss (neither positive nor negative). No human annotation was available; the
  card says so, and the real-slide figure it reports is agreement with the classic detector.

Tiles are Macenko-normalised to :data:`gpupath.stain.REFERENCE` as the pipeline does by
default, and a third of the time left unnormalised; augmentation: flips, 90° rotations,
per-channel optical-density jitter (scale ±10 %, shift ±0.03), 128-px crops on the 4-px grid.

Loss (CenterNet, Zhou et al. 2019): penalty-reduced focal loss on the heatmap (alpha 2,
beta 4) with Gaussian targets (sigma = max(0.6, radius / 12) cells), L1 on radius / 8 and on
the in-cell offset at centre cells.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("gpupath.detect.train")

TILE_PX = 256
CROP_PX = 128
TARGET_MPP = 0.5
MATCH_PX = 4.0
TRAIN_SEEDS = tuple(range(1000, 1012))
EVAL_SEEDS = (2000, 2001, 2002)      # never trained on: the card's figures come from these


@dataclass(slots=True)
class TileSet:
    """Tiles and per-cell targets (cells of STRIDE_PX tile px)."""

    tiles: np.ndarray      # (N, 256, 256, 3) uint8
    heat: np.ndarray       # (N, 64, 64) float32 Gaussian target, 1 at centre cells
    radius: np.ndarray     # (N, 64, 64) float32 radius px at centre cells
    offset: np.ndarray     # (N, 2, 64, 64) float32 (x, y) in-cell offset at centre cells
    ignore: np.ndarray     # (N, 64, 64) bool: cells left out of the heatmap loss


def synthetic_spec(seed: int):  # noqa: ANN201  (SyntheticSpec; import kept lazy)
    from gpupath.synthetic import SyntheticSpec  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    mpp = float(rng.choice([0.25, 0.5]))
    lo = float(rng.uniform(2.5, 3.5))
    hi = float(rng.uniform(lo + 0.8, 5.5))
    size = 4096 if mpp == 0.25 else 2048
    # the generator fits about 68,000 / hi² nuclei per mm² with centres 3 radii apart
    return SyntheticSpec(width_px=size, height_px=size, mpp=mpp, seed=seed, nucleus_radius_um=(lo, hi),
                         nuclei_per_mm2=min(float(rng.uniform(1500, 5000)), 0.85 * 68_000 / hi**2), tissue_fraction=float(rng.uniform(0.4, 0.7)),
                         jpeg_quality=int(rng.integers(70, 96)), jpeg_ycbcr=bool(rng.integers(0, 2)))


def read_slide_tiles(path: Path, *, normalise: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Tiles (N, 256, 256, 3) of a slide as the pipeline reads them, their level-0 origins (N, 2)
    (exact floats) and level-0 px per tile px."""
    from gpupath import stain  # noqa: PLC0415
    from gpupath.pipeline import RunParams, read_grid_tiles  # noqa: PLC0415
    from gpupath.slide import open_slide  # noqa: PLC0415
    from gpupath.tiling import TileSpec, tile_grid  # noqa: PLC0415
    from gpupath.tissue import compute_tissue  # noqa: PLC0415

    params = RunParams(tile=TileSpec(tile_px=TILE_PX, target_mpp=TARGET_MPP), stain="none")
    with open_slide(path) as slide:
        mpp = slide.require_mpp()
        grid = tile_grid(level_dimensions=slide.level_dimensions, level_downsamples=slide.level_downsamples,
                         mpp=mpp, mask=compute_tissue(slide, mpp=mpp), spec=params.tile)
        tiles = read_grid_tiles(slide, grid, np.arange(len(grid)), params).pixels
    if normalise:
        tiles = stain.apply_macenko(tiles, stain.fit_macenko(tiles))
    origins = np.c_[grid.x_lvl * grid.downsample, grid.y_lvl * grid.downsample].astype(np.float64)
    return tiles, origins, grid.l0_per_tile_px, mpp


def cell_targets(cx_px: np.ndarray, cy_px: np.ndarray, radius_px: np.ndarray, *, stride_px: int = 4,
                 tile_px: int = TILE_PX) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heat (g, g), radius (g, g) and offset (2, g, g) targets of nuclei centred at tile px (cx, cy)."""
    g = tile_px // stride_px
    heat = np.zeros((g, g), np.float32)
    rad = np.zeros((g, g), np.float32)
    off = np.zeros((2, g, g), np.float32)
    centres = (np.arange(g) + 0.5)
    for x, y, r in zip(cx_px / stride_px, cy_px / stride_px, radius_px):
        sigma = max(0.6, r / stride_px / 3)
        gy = np.exp(-((centres - y) ** 2) / (2 * sigma**2))
        gx = np.exp(-((centres - x) ** 2) / (2 * sigma**2))
        np.maximum(heat, np.outer(gy, gx).astype(np.float32), out=heat)
        c, rr = int(math.floor(x)), int(math.floor(y))
        if 0 <= c < g and 0 <= rr < g:
            heat[rr, c] = 1.0
            rad[rr, c] = r
            off[:, rr, c] = (x - c, y - rr)
    return heat, rad, off


def synthetic_tileset(work: Path, seeds: tuple[int, ...], *, normalise_every: int = 3) -> TileSet:
    """Generated slides (written once under ``work``) -> tiles with exact targets."""
    from gpupath.synthetic import read_nuclei, write_synthetic_slide  # noqa: PLC0415

    parts = []
    for i, seed in enumerate(seeds):
        path = work / f"synthetic-{seed}.svs"
        if not path.exists():
            write_synthetic_slide(path, synthetic_spec(seed))
        tiles, origins, l0_per_px, _ = read_slide_tiles(path, normalise=(i % normalise_every) != 0)
        nuc = read_nuclei(path)
        parts.append(_targets_from_truth(tiles, origins, l0_per_px, nuc["x_px"], nuc["y_px"], nuc["radius_px"]))
        log.info("slide %s: %d tiles", path.name, len(tiles))
    return _concat(parts)


def _targets_from_truth(tiles: np.ndarray, origins: np.ndarray, l0_per_px: float, x_l0: np.ndarray,
                        y_l0: np.ndarray, r_l0: np.ndarray, ignore_xy: tuple[np.ndarray, np.ndarray] | None = None
                        ) -> TileSet:
    n, g = len(tiles), TILE_PX // 4
    heat, rad, off, ign = (np.zeros((n, g, g), np.float32), np.zeros((n, g, g), np.float32),
                           np.zeros((n, 2, g, g), np.float32), np.zeros((n, g, g), bool))
    for t, (ox, oy) in enumerate(origins):
        cx, cy = (x_l0 - ox) / l0_per_px, (y_l0 - oy) / l0_per_px
        inside = (cx >= -8) & (cx < TILE_PX + 8) & (cy >= -8) & (cy < TILE_PX + 8)
        h, r, o = cell_targets(cx[inside], cy[inside], r_l0[inside] / l0_per_px)
        heat[t], rad[t], off[t] = h, r, o
        if ignore_xy is not None:
            ix, iy = (ignore_xy[0] - ox) / l0_per_px / 4, (ignore_xy[1] - oy) / l0_per_px / 4
            for x, y in zip(ix, iy):
                c0, r0 = int(math.floor(x)), int(math.floor(y))
                ign[t, max(r0 - 2, 0):max(r0 + 3, 0), max(c0 - 2, 0):max(c0 + 3, 0)] = True
    return TileSet(tiles, heat, rad, off, ign & (heat < 1))


def _concat(parts: list[TileSet]) -> TileSet:
    return TileSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in TileSet.__slots__))


def real_tileset(path: Path, *, train_fraction: float = 2 / 3, held_out: bool = False) -> TileSet:
    """Consensus pseudo-labels on a real H&E slide (see the module docstring)."""
    from scipy.spatial import cKDTree  # noqa: PLC0415

    from gpupath import stain, vahadane  # noqa: PLC0415
    from gpupath.detect.classic import detect_nuclei  # noqa: PLC0415

    raw, origins, l0_per_px, mpp = read_slide_tiles(path, normalise=False)
    from gpupath.slide import open_slide  # noqa: PLC0415

    with open_slide(path) as slide:
        width = slide.dimensions[0]
    split = width * train_fraction
    keep = origins[:, 0] >= split if held_out else origins[:, 0] + TILE_PX * l0_per_px <= split
    raw, origins = raw[keep], origins[keep]
    found = []
    for fit, apply, target in ((stain.fit_macenko, stain.apply_macenko, stain.REFERENCE),
                               (vahadane.fit_vahadane, vahadane.apply_vahadane, vahadane.VAHADANE_REFERENCE)):
        tiles = apply(raw, fit(raw), target=target)
        d = detect_nuclei(tiles, mpp=TARGET_MPP, stain_matrix_od=target.stain_matrix_od)
        x = origins[d.tile_index, 0] + d.cx_px * l0_per_px
        y = origins[d.tile_index, 1] + d.cy_px * l0_per_px
        found.append((x, y, d.radius_px * l0_per_px, d.score))
    (xa, ya, ra, sa), (xb, yb, _, sb) = found
    dist, idx = cKDTree(np.c_[xb, yb]).query(np.c_[xa, ya], distance_upper_bound=MATCH_PX * l0_per_px)
    both = np.isfinite(dist)
    sure = both & (sa >= 0.6) & (sb[np.minimum(idx, len(sb) - 1)] >= 0.6)
    only_b = np.ones(len(xb), bool)
    only_b[idx[both]] = False
    unsure_x = np.r_[xa[~sure], xb[only_b]]
    unsure_y = np.r_[ya[~sure], yb[only_b]]
    normalised = stain.apply_macenko(raw, stain.fit_macenko(raw))
    log.info("real %s: %d tiles, %d consensus nuclei, %d uncertain", path.name, len(raw), sure.sum(), len(unsure_x))
    return _targets_from_truth(normalised, origins, l0_per_px, xa[sure], ya[sure], ra[sure],
                               ignore_xy=(unsure_x, unsure_y))


def _augment(batch: dict, rng: np.random.Generator):  # noqa: ANN202
    import torch  # noqa: PLC0415

    tiles, heat, rad, off, ign = batch["tiles"], batch["heat"], batch["radius"], batch["offset"], batch["ignore"]
    # crop on the 4-px grid
    c0, r0 = (int(rng.integers(0, (TILE_PX - CROP_PX) // 4 + 1)) for _ in range(2))
    g = CROP_PX // 4
    tiles = tiles[:, 4 * r0:4 * r0 + CROP_PX, 4 * c0:4 * c0 + CROP_PX]
    heat, rad, ign = (a[:, r0:r0 + g, c0:c0 + g] for a in (heat, rad, ign))
    off = off[:, :, r0:r0 + g, c0:c0 + g]
    # optical-density jitter, per tile and channel
    n = len(tiles)
    od = -np.log(np.maximum(tiles.astype(np.float32), 1.0) / 255.0)
    od = od * rng.uniform(0.9, 1.1, (n, 1, 1, 3)).astype(np.float32) + rng.uniform(-0.03, 0.03, (n, 1, 1, 3)).astype(
        np.float32)
    tiles = np.clip(255.0 * np.exp(-np.maximum(od, 0)), 0, 255)
    x = torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)))
    heat, rad, ign = (torch.from_numpy(np.ascontiguousarray(a)) for a in (heat, rad, ign))
    off = torch.from_numpy(np.ascontiguousarray(off))
    if rng.random() < 0.5:  # x flip: offset_x -> 1 - offset_x at centre cells
        x, heat, rad, ign, off = (t.flip(-1) for t in (x, heat, rad, ign, off))
        off = torch.stack([torch.where(rad > 0, 1 - off[:, 0], off[:, 0]), off[:, 1]], 1)
    if rng.random() < 0.5:  # y flip
        x, heat, rad, ign, off = (t.flip(-2) for t in (x, heat, rad, ign, off))
        off = torch.stack([off[:, 0], torch.where(rad > 0, 1 - off[:, 1], off[:, 1])], 1)
    if rng.random() < 0.5:  # transpose: x <-> y
        x, heat, rad, ign, off = (t.transpose(-1, -2) for t in (x, heat, rad, ign, off))
        off = off[:, [1, 0]]
    return x, heat, rad, off, ign


def normalise_input(x, mean: tuple, std: tuple):  # noqa: ANN001, ANN201
    import torch  # noqa: PLC0415

    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x / 255.0 - m) / s


MEAN = (0.75, 0.6, 0.75)
STD = (0.2, 0.2, 0.15)


def train(data: TileSet, *, steps: int, batch: int, seed: int, lr: float = 2e-3):  # noqa: ANN201
    import torch  # noqa: PLC0415

    from gpupath.detect.net import RADIUS_SCALE_PX, NucleiNet  # noqa: PLC0415

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = NucleiNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    t0 = time.perf_counter()
    for step in range(steps):
        pick = rng.integers(0, len(data.tiles), batch)
        x, heat, rad, off, ign = _augment({f: getattr(data, f)[pick] for f in TileSet.__slots__}, rng)
        logit, size_raw, off_raw = net.forward_logits(normalise_input(x, MEAN, STD))
        logit, size_raw = logit[:, 0], size_raw[:, 0]
        p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
        pos = heat >= 1.0
        neg_w = (1 - heat) ** 4 * (~ign)
        focal = -(torch.log(p) * (1 - p) ** 2 * pos + torch.log(1 - p) * p**2 * neg_w * ~pos).sum()
        n_pos = pos.sum().clamp(min=1)
        size_pred = RADIUS_SCALE_PX * torch.exp(size_raw.clamp(-3, 3))
        l_size = (torch.abs(size_pred - rad) / RADIUS_SCALE_PX * pos).sum() / n_pos
        l_off = (torch.abs(torch.sigmoid(off_raw) - off) * pos[:, None]).sum() / n_pos
        loss = focal / n_pos + l_size + l_off
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f (focal %.4f size %.4f offset %.4f) %.0f s", step, steps, float(loss.detach()),
                     float(focal.detach() / n_pos), float(l_size.detach()), float(l_off.detach()), time.perf_counter() - t0)
    return net.eval()


CARD_TEMPLATE = """\
# gpupath model card: the shipped nuclei detector. Written by `python -m gpupath.detect.train`.
format: gpupath-model-card/1
name: nuclei_v1
version: 1
description: >-
  Nuclei in H&E tiles at 0.5 µm/px (20x). Compact centre-heatmap CNN (CenterNet-style, {params} parameters,
  no batch norm): six 3x3 convolutions (two stride 2, one dilated), 1x1 heads for a centre heatmap, the
  radius and the in-cell centre offset on a 4-px grid. Boxes are the circle's bounding square.
license: Apache-2.0
model: nuclei_v1.onnx
sha256: {onnx_sha}
weights: nuclei_v1.npz
weights_sha256: {npz_sha}
classes: [nucleus]
dedup_distance_um: 2.5
input:
  name: tiles
  layout: NCHW
  channels: RGB
  dtype: float32
  mpp: 0.5                 # tiles within ±10 % of this; --target-mpp 0.5 (the default)
  size_px: null            # any size, multiple of 4; trained on 128-px crops of 256-px tiles
  multiple_of: 4
  scale: 255.0
  mean: [{mean}]
  std: [{std}]
output:
  decoder: heatmap
  heatmap: heatmap         # (N, 1, H/4, W/4) sigmoid
  size: size               # (N, 1, H/4, W/4) radius, input px
  size_kind: radius
  offset: offset           # (N, 2, H/4, W/4) centre (x, y) within the cell, in cells
  stride_px: 4
  peak_window_px: 3
  threshold: {threshold}
training:
  script: python -m gpupath.detect.train --work <dir> --steps {steps} --batch {batch} --seed {seed}
  steps: {steps}
  batch: {batch}
  seed: {seed}
  tiles: {tiles}
  input_normalisation: >-
    The pipeline's tiles: Macenko-normalised to gpupath.stain.REFERENCE (the default --stain macenko);
    a third of the training tiles were left unnormalised, so --stain none and vahadane also work.
  data: >-
    (1) {n_syn} generated H&E slides (gpupath.synthetic, seeds {syn_seeds}), read as the pipeline reads them:
    256-px tiles at 0.5 µm/px from 0.25 or 0.5 µm/px level-0 JPEG pyramids; labels are the generator's exact
    nucleus table. {real_data}
  augmentation: flips, 90-degree rotations, per-channel optical-density jitter (x0.9-1.1, +-0.03), 128-px crops.
  loss: CenterNet penalty-reduced focal loss (alpha 2, beta 4) + L1 radius / 8 + L1 offset.
metrics:
  match: one-to-one, centres within 4 level-0 px, full pipeline (tissue, 256-px tiles, 32-px overlap, Macenko)
  generated_slides_not_trained_on:
{metrics}
  real_held_out_agreement_with_classic: >-
    {real}
"""


REAL_DATA = """(2) Real H&E: the left two thirds of cmu-1-small-region.svs (OpenSlide CMU-1, skin);
    labels are consensus pseudo-labels: nuclei found by the classic LoG detector on both the Macenko- and
    the Vahadane-normalised tile (within 4 px, score >= 0.6); cells near a nucleus found by only one were left
    out of the loss. No human annotation was available."""
NO_REAL_DATA = "No real tiles (the real slide was absent)."


def write_card(out: Path, *, net: Any, steps: int, batch: int, seed: int, tiles: int, threshold: float,
               metrics: str, real: str, real_data: str) -> Path:
    from gpupath.detect.card import file_sha256  # noqa: PLC0415

    text = CARD_TEMPLATE.format(
        params=sum(p.numel() for p in net.parameters()), onnx_sha=file_sha256(out / "nuclei_v1.onnx"),
        npz_sha=file_sha256(out / "nuclei_v1.npz"), mean=", ".join(map(str, MEAN)), std=", ".join(map(str, STD)),
        threshold=threshold, steps=steps, batch=batch, seed=seed, tiles=tiles, n_syn=len(TRAIN_SEEDS),
        syn_seeds=f"{TRAIN_SEEDS[0]}-{TRAIN_SEEDS[-1]}", metrics=metrics, real=real, real_data=real_data)
    path = out / "nuclei_v1.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def one_to_one(truth: np.ndarray, found: np.ndarray, max_px: float) -> int:
    """Matched pairs of a greedy closest-first one-to-one matching within ``max_px``."""
    from gpupath.detect.boxes import match_one_to_one  # noqa: PLC0415

    return len(match_one_to_one(truth, found, max_px)[0])


def evaluate_synthetic(card: Path, work: Path, seeds: tuple[int, ...], *, engine: str = "onnxruntime"
                       ) -> list[tuple[int, float, float, int]]:
    """(seed, recall, precision, n_true) of the full pipeline on generated slides."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    from gpupath.pipeline import RunParams, process_slide  # noqa: PLC0415
    from gpupath.synthetic import read_nuclei, write_synthetic_slide  # noqa: PLC0415
    from gpupath.tiling import TileSpec  # noqa: PLC0415

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
        m = one_to_one(truth, np.c_[cx, cy], MATCH_PX * 1.0)
        rows.append((seed, m / max(len(truth), 1), m / max(len(cx), 1), len(truth)))
    return rows


def real_agreement(card: Path, path: Path) -> str:
    """Agreement of the model with the consensus pseudo-labels on the held-out right third of a real slide."""
    from gpupath.detect.detector import make_detector  # noqa: PLC0415

    held = real_tileset(path, held_out=True)
    det, _ = make_detector("onnxruntime", model_card=card)
    found = det.detect(held.tiles, mpp=TARGET_MPP, stain_matrix_od=np.eye(3)[:, :2])
    fx, fy = (found.x0 + found.x1) / 2, (found.y0 + found.y1) / 2
    n_true = n_found = matched = 0
    for t in range(len(held.tiles)):
        rr, cc = np.nonzero(held.heat[t] >= 1.0)
        truth = np.c_[(cc + held.offset[t, 0, rr, cc]) * 4, (rr + held.offset[t, 1, rr, cc]) * 4]
        mine = found.tile_index == t
        pts = np.c_[fx[mine], fy[mine]]
        cell_r = np.clip((pts[:, 1] // 4).astype(int), 0, held.ignore.shape[1] - 1)
        cell_c = np.clip((pts[:, 0] // 4).astype(int), 0, held.ignore.shape[2] - 1)
        pts = pts[~held.ignore[t, cell_r, cell_c]]  # uncertain places count neither way
        n_true, n_found = n_true + len(truth), n_found + len(pts)
        matched += one_to_one(truth, pts, MATCH_PX)
    return (f"recall {matched / max(n_true, 1):.3f}, precision {matched / max(n_found, 1):.3f} against "
            f"{n_true} consensus nuclei on {len(held.tiles)} held-out tiles (right third of {path.name}); "
            "agreement with the classic detector, not accuracy against human labels")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for generated training slides (reused)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the model files go (default WORK/model; the shipped model is replaced only when "
                         "--out names gpupath/detect/models; --eval-only defaults to the shipped model)")
    ap.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[3] / "shared/data/cmu-1-small-region.svs")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.4, help="heatmap peak threshold written to the card")
    ap.add_argument("--eval-only", action="store_true", help="re-measure the card in --out (no training)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    from gpupath.detect.net import export_onnx, save_weights  # noqa: PLC0415

    if args.out is None:  # never overwrite the installed, shipped model by default
        args.out = Path(__file__).parent / "models" if args.eval_only else args.work / "model"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.eval_only:  # re-measure (and rewrite) the card of the weights in --out
        from gpupath.detect.net import load_weights  # noqa: PLC0415

        from gpupath.detect.card import load_card  # noqa: PLC0415

        net = load_weights(args.out / "nuclei_v1.npz")
        trained = load_card(args.out / "nuclei_v1.yaml").extra["training"]  # what the weights were trained with
        args.steps, args.batch, args.seed = int(trained["steps"]), int(trained["batch"]), int(trained["seed"])
        tiles, used_real = int(trained["tiles"]), "cmu-1-small-region" in str(trained.get("data", ""))
    else:
        used_real = args.real.is_file()
        with threadpool_limits(limits=1, user_api="blas"):
            parts = [synthetic_tileset(args.work, TRAIN_SEEDS)]
            if used_real:
                real = real_tileset(args.real)
                parts.append(_concat([real] * 2))  # real tiles are few: seen twice as often
            data = _concat(parts)
        tiles = len(data.tiles)
        log.info("training on %d tiles", tiles)
        net = train(data, steps=args.steps, batch=args.batch, seed=args.seed)
        save_weights(net, args.out / "nuclei_v1.npz")
    export_onnx(net, args.out / "nuclei_v1.onnx")
    card_args = dict(net=net, steps=args.steps, batch=args.batch, seed=args.seed, tiles=tiles,
                     threshold=args.threshold, real_data=REAL_DATA if used_real else NO_REAL_DATA)
    card = write_card(args.out, metrics="    pending: evaluation", real="pending", **card_args)
    with threadpool_limits(limits=1, user_api="blas"):
        rows = evaluate_synthetic(card, args.work, EVAL_SEEDS)
        real = real_agreement(card, args.real) if args.real.is_file() else "not measured (slide absent)"
    metrics = "\n".join(f"    - {{seed: {s}, recall: {r:.3f}, precision: {p:.3f}, nuclei: {n}}}" for s, r, p, n in rows)
    log.info("held-out generated slides:\n%s\nreal held-out: %s", metrics, real)
    write_card(args.out, metrics=metrics, real=real, **card_args)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
