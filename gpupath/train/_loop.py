"""The training loop of nuclei_v2 (torch, CPU): loss, optimiser, sampling of sources.

Loss (CenterNet, Zhou et al. 2019, with a class head): penalty-reduced focal loss on the centre
heatmap (alpha 2, beta 4; Gaussian targets, sigma = max(0.6, radius / 12) cells), cross-entropy
of the class map at labelled centre cells (sources without classes add nothing), L1 on radius / 8
and on the in-cell offset at centre cells. AdamW with a one-cycle learning rate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpupath.train._augment import CropBatch, make_batch
from gpupath.train._data import TrainImage

log = logging.getLogger("gpupath.train")

MEAN = (0.75, 0.6, 0.75)
STD = (0.2, 0.2, 0.15)


@dataclass(frozen=True, slots=True)
class TrainSettings:
    steps: int = 12_000
    batch: int = 16
    crop_px: int = 160
    lr: float = 3e-3
    seed: int = 0
    synthetic_weight: float = 0.15    # share of crops from generated slides (when there are any)
    log_every: int = 100              # steps per loss-history entry (mean loss over them)


def normalise_input(x: Any, mean: tuple = MEAN, std: tuple = STD) -> Any:
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x / 255.0 - m) / s


def source_weights(images: list[TrainImage], synthetic_weight: float) -> np.ndarray:
    """Sampling probability per image: each human dataset the same share, generated tiles ``synthetic_weight``."""
    sources = [im.source for im in images]
    human = sorted({s for s in sources if s != "synthetic"})
    has_syn = "synthetic" in sources
    share = {s: (1.0 - (synthetic_weight if has_syn and human else 0.0)) / max(len(human), 1) for s in human}
    if has_syn:
        share["synthetic"] = synthetic_weight if human else 1.0
    counts = {s: sources.count(s) for s in share}
    w = np.array([share[s] / counts[s] for s in sources])
    return w / w.sum()


def batch_loss(net: Any, b: CropBatch) -> tuple[Any, dict[str, float]]:
    """(total, parts dict) of one batch."""
    import torch

    from gpupath.detect.net import RADIUS_SCALE_PX

    x = normalise_input(torch.from_numpy(np.ascontiguousarray(b.rgb.transpose(0, 3, 1, 2))))
    heat, lab, rad, off = (torch.from_numpy(a) for a in (b.heat, b.label, b.radius, b.offset))
    logit, cls, size_raw, off_raw = net.forward_logits(x)
    p = torch.sigmoid(logit[:, 0]).clamp(1e-4, 1 - 1e-4)
    pos = heat >= 1.0
    n_pos = pos.sum().clamp(min=1)
    focal = -(torch.log(p) * (1 - p) ** 2 * pos + torch.log(1 - p) * p**2 * (1 - heat) ** 4 * ~pos).sum() / n_pos
    known = lab >= 0
    l_cls = ((torch.nn.functional.cross_entropy(cls, lab.clamp(min=0), reduction="none") * known).sum()
             / known.sum().clamp(min=1))
    size_pred = RADIUS_SCALE_PX * torch.exp(size_raw[:, 0].clamp(-3, 3))
    l_size = (torch.abs(size_pred - rad) / RADIUS_SCALE_PX * pos).sum() / n_pos
    l_off = (torch.abs(torch.sigmoid(off_raw) - off) * pos[:, None]).sum() / n_pos
    total = focal + l_cls + l_size + l_off
    return total, {"focal": float(focal.detach()), "class": float(l_cls.detach()), "size": float(l_size.detach()),
                   "offset": float(l_off.detach())}


def train(images: list[TrainImage], *, n_classes: int, settings: TrainSettings) -> tuple[Any, list[tuple[int, float]]]:
    """A trained :class:`NucleiNetV2` with batch norm folded in (eval mode) and the loss history."""
    import torch

    from gpupath.detect.net import NucleiNetV2, fuse_batch_norm

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    weights = source_weights(images, settings.synthetic_weight)
    net = NucleiNetV2(n_classes, norm=True)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.05)
    net.train()
    t0, history, running = time.perf_counter(), [], []
    for step in range(settings.steps):
        picks = rng.choice(len(images), size=settings.batch, p=weights)
        loss, parts = batch_loss(net, make_batch(images, picks, rng, settings.crop_px))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if step % settings.log_every == 0 or step == settings.steps - 1:
            mean = float(np.mean(running))
            history.append((step, mean))
            running = []
            log.info("step %d/%d loss %.4f (last: %s) %.0f s", step, settings.steps, mean,
                     " ".join(f"{k} {v:.3f}" for k, v in parts.items()), time.perf_counter() - t0)
    return fuse_batch_norm(net.eval()), history
