"""The card's heatmap threshold, chosen on training-split images held out of the loss ("tune" images).

The model runs on each tune image whole (white beyond its edge, as the pipeline's reader pads), in
its three stain renderings; every candidate threshold is scored with the evaluation's pairing
(3 µm) and the one with the best mean detection F1 over datasets and renderings is kept. The
validation split is never read here.
"""

from __future__ import annotations

import hashlib

import numpy as np

from gpupath.detect.card import HeatmapOutput
from gpupath.detect.decoders import decode_heatmap
from gpupath.detect.net import V2_STRIDE_PX as STRIDE_PX
from gpupath.detect.matching import MatchCounts
from gpupath.train._data import MODEL_MPP, RENDERINGS, TrainImage
from gpupath.train._loop import normalise_input

THRESHOLDS = tuple(np.round(np.arange(0.15, 0.71, 0.05), 2))
MATCH_UM = 3.0
PEAK_WINDOW_PX = 3


def is_tune_image(name: str, fraction: float) -> bool:
    """Deterministic hold-out by name: sha256(name) as a number in [0, 1) below ``fraction``."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def heatmap_spec(threshold: float) -> HeatmapOutput:
    return HeatmapOutput(heatmap="heatmap", size="size", offset="offset", class_probs="classes",
                         stride_px=STRIDE_PX, peak_window_px=PEAK_WINDOW_PX, threshold=float(threshold))


def run_whole(net, rgb: np.ndarray) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Outputs of the network on one image, padded white to a multiple of 8 px."""
    import torch

    h, w = rgb.shape[:2]
    ph, pw = -h % 8, -w % 8
    padded = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), constant_values=255).astype(np.float32)
    x = normalise_input(torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)[None])))
    with torch.inference_mode():
        outs = net(x)
    return {name: o.numpy() for name, o in zip(net.output_names, outs, strict=True)}


def choose_threshold(net, images: list[TrainImage], n_classes: int) -> tuple[float, dict[float, float]]:  # noqa: ANN001
    """(best threshold, mean F1 per threshold) over the tune images."""
    outputs = [(im, rendering, run_whole(net, im.pixels[rendering])) for im in images for rendering in RENDERINGS]
    mean_f1 = {}
    for thr in THRESHOLDS:
        per_group: dict[tuple[str, str], MatchCounts] = {}
        for im, rendering, out in outputs:
            found = decode_heatmap(out, heatmap_spec(thr))
            keep = ((found.x0 + found.x1) / 2 < im.pixels["none"].shape[1]) & \
                   ((found.y0 + found.y1) / 2 < im.pixels["none"].shape[0])
            counts = per_group.setdefault((im.source, rendering), MatchCounts(n_classes))
            counts.add(np.c_[im.x_px, im.y_px], im.label,
                       np.c_[((found.x0 + found.x1) / 2)[keep], ((found.y0 + found.y1) / 2)[keep]],
                       found.label[keep], max_px=MATCH_UM / MODEL_MPP)
        mean_f1[float(thr)] = float(np.mean([c.scores(())["f1"] for c in per_group.values()]))
    best = max(mean_f1, key=lambda t: (mean_f1[t], -abs(t - 0.4)))
    return best, mean_f1
