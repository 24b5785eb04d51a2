"""Detections against human centroids: one-to-one pairing and detection / class scores.

Pairing is HoVer-Net's (``compute_stats.py``, ``pair_coordinates``; CellViT uses the same): the
Hungarian assignment (``scipy.optimize.linear_sum_assignment``) over the full truth x detection
distance matrix, then pairs farther apart than the radius are dropped. The radius is physical:
3 µm (12 px at 40x, 6 px at 20x) as both papers, and 6 µm as a looser second figure.

Scores, pooled over images (counts summed, then the ratio):

- detection: precision = paired / detections, recall = paired / truths, F1 = 2PR / (P + R);
- per class (class-aware): a pair counts as a true positive of class k only when both labels are k;
  FP_k = detections labelled k - TP_k, FN_k = truths labelled k - TP_k,
  F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k); the macro F1 is their mean over the classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["pair_points", "MatchCounts"]


def pair_points(truth_xy: np.ndarray, found_xy: np.ndarray, max_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (truth, found) of HoVer-Net's pairs within ``max_px``.

    Parameters
    ----------
    truth_xy : (N, 2) px.
    found_xy : (M, 2) px, same frame.
    max_px : pairing radius, px.

    Returns
    -------
    Two (K,) int64 arrays.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    truth_xy = np.asarray(truth_xy, np.float64).reshape(-1, 2)
    found_xy = np.asarray(found_xy, np.float64).reshape(-1, 2)
    if not len(truth_xy) or not len(found_xy):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    dist = cdist(truth_xy, found_xy)
    ti, fi = linear_sum_assignment(dist)
    keep = dist[ti, fi] <= max_px
    return ti[keep].astype(np.int64), fi[keep].astype(np.int64)


@dataclass(slots=True)
class MatchCounts:
    """Counts over images; add images with :meth:`add`, read scores with :meth:`scores`."""

    n_classes: int
    paired: int = 0
    truths: int = 0
    found: int = 0
    tp_class: np.ndarray = field(default=None)  # type: ignore[assignment]
    truth_class: np.ndarray = field(default=None)  # type: ignore[assignment]
    found_class: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("tp_class", "truth_class", "found_class"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.n_classes, np.int64))

    def add(self, truth_xy: np.ndarray, truth_label: np.ndarray, found_xy: np.ndarray, found_label: np.ndarray,
            *, max_px: float) -> None:
        ti, fi = pair_points(truth_xy, found_xy, max_px)
        truth_label = np.asarray(truth_label, np.int64)
        found_label = np.asarray(found_label, np.int64)
        self.paired += len(ti)
        self.truths += len(truth_label)
        self.found += len(found_label)
        k = self.n_classes
        agree = truth_label[ti] == found_label[fi]
        self.tp_class += np.bincount(truth_label[ti][agree], minlength=k)[:k]
        self.truth_class += np.bincount(truth_label[(truth_label >= 0) & (truth_label < k)], minlength=k)[:k]
        self.found_class += np.bincount(found_label[(found_label >= 0) & (found_label < k)], minlength=k)[:k]

    def scores(self, class_names: tuple[str, ...] | list[str]) -> dict:
        """Pooled detection P / R / F1, per-class F1 and the macro F1 (the module docstring's rules)."""
        p = self.paired / self.found if self.found else 0.0
        r = self.paired / self.truths if self.truths else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_class = {}
        for i, name in enumerate(class_names):
            tp, fp, fn = int(self.tp_class[i]), int(self.found_class[i] - self.tp_class[i]), \
                int(self.truth_class[i] - self.tp_class[i])
            per_class[name] = {"f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0, "tp": tp, "fp": fp,
                               "fn": fn, "truths": int(self.truth_class[i]), "found": int(self.found_class[i])}
        macro = float(np.mean([c["f1"] for c in per_class.values()])) if per_class else 0.0
        return {"precision": p, "recall": r, "f1": f1, "paired": self.paired, "truths": self.truths,
                "found": self.found, "per_class": per_class, "class_macro_f1": macro}
