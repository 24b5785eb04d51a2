"""Choose the scikit-image LoG baseline's threshold on the training split (never the validation split).

    python bench/eval_log_baseline.py [DATASET_DIR ...]

For each candidate threshold, :func:`gpupath.evaluate.skimage_log_points` runs on every training
image of each dataset (default: BRCA-M2C and CoNSeP in ../shared/data/nuclei-train); detections are
paired with the human centroids within 3 µm (HoVer-Net's pairing) and the pooled F1 per dataset is
printed, with the threshold of the best mean F1. ``gpupath.evaluate.SKIMAGE_THRESHOLD`` holds it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpupath.detect.annotations import read_dataset, read_image
from gpupath.detect.matching import MatchCounts
from gpupath.train import DEFAULT_DATA
from gpupath.evaluate import skimage_log_points

THRESHOLDS = (0.05, 0.075, 0.1, 0.15, 0.2, 0.3)


def main() -> int:
    folders = [Path(a) for a in sys.argv[1:]] or list(DEFAULT_DATA)
    f1 = {t: [] for t in THRESHOLDS}
    for folder in folders:
        images = read_dataset(folder, split="train")
        pixels = [read_image(im) for im in images]
        for t in THRESHOLDS:
            counts = MatchCounts(1)
            for im, rgb in zip(images, pixels, strict=True):
                found = skimage_log_points(rgb, im.mpp, threshold=t)
                counts.add(np.c_[im.x_px, im.y_px], np.zeros(len(im), np.int64), found,
                           np.zeros(len(found), np.int64), max_px=3.0 / im.mpp)
            s = counts.scores(())
            f1[t].append(s["f1"])
            print(f"{folder.name:10s} threshold {t:<6} P {s['precision']:.3f} R {s['recall']:.3f} F1 {s['f1']:.3f}")
    best = max(THRESHOLDS, key=lambda t: np.mean(f1[t]))
    print(f"best mean F1 over {len(folders)} datasets' training splits: threshold {best} ({np.mean(f1[best]):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
