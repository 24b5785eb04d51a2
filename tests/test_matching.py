"""HoVer-Net pairing and the pooled detection / class-aware scores, against brute force and hand counts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gpupath.detect.matching import MatchCounts, pair_points


def brute_force_pairs(truth: np.ndarray, found: np.ndarray, max_px: float) -> int:
    """Pairs within max_px of the assignment with the least total distance, by trying every assignment."""
    n, m = len(truth), len(found)
    small, big = (truth, found) if n <= m else (found, truth)
    best_cost, best_pairs = np.inf, 0
    for perm in itertools.permutations(range(len(big)), len(small)):
        d = np.hypot(*(small - big[list(perm)]).T)
        if d.sum() < best_cost - 1e-12:
            best_cost, best_pairs = d.sum(), int((d <= max_px).sum())
    return best_pairs


@pytest.mark.parametrize("seed", range(12))
def test_pairing_is_the_minimum_cost_assignment_cut_at_the_radius(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0, 20, (int(rng.integers(1, 6)), 2))
    found = rng.uniform(0, 20, (int(rng.integers(1, 7)), 2))
    ti, fi = pair_points(truth, found, 6.0)
    assert len(ti) == brute_force_pairs(truth, found, 6.0)
    assert len(set(ti)) == len(ti) and len(set(fi)) == len(fi)
    assert (np.hypot(*(truth[ti] - found[fi]).T) <= 6.0).all()


def test_pairing_of_nothing() -> None:
    assert [len(a) for a in pair_points(np.zeros((0, 2)), np.ones((3, 2)), 3.0)] == [0, 0]
    assert [len(a) for a in pair_points(np.ones((3, 2)), np.zeros((0, 2)), 3.0)] == [0, 0]


def test_scores_count_by_hand() -> None:
    # truths: A(0,0) class 0, B(10,0) class 1, C(20,0) class 1, D(40,0) class 2
    # found:  a(1,0) class 0 -> A agrees; b(10,1) class 0 -> B, labels differ; c(30,0) class 1 unpaired
    c = MatchCounts(3)
    c.add(np.array([[0, 0], [10, 0], [20, 0], [40, 0]]), np.array([0, 1, 1, 2]),
          np.array([[1, 0], [10, 1], [30, 0]]), np.array([0, 0, 1]), max_px=3.0)
    s = c.scores(("x", "y", "z"))
    assert (s["paired"], s["truths"], s["found"]) == (2, 4, 3)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    x, y, z = (s["per_class"][k] for k in "xyz")
    assert (x["tp"], x["fp"], x["fn"]) == (1, 1, 0) and x["f1"] == pytest.approx(2 / 3)
    assert (y["tp"], y["fp"], y["fn"]) == (0, 1, 2) and y["f1"] == 0.0
    assert (z["tp"], z["fp"], z["fn"]) == (0, 0, 1) and z["f1"] == 0.0
    assert s["class_macro_f1"] == pytest.approx((2 / 3) / 3)


def test_pooling_sums_counts_over_images() -> None:
    c = MatchCounts(1)
    c.add(np.array([[0, 0]]), np.array([0]), np.array([[0, 1]]), np.array([0]), max_px=3.0)
    c.add(np.array([[0, 0], [9, 9]]), np.array([0, 0]), np.zeros((0, 2)), np.zeros(0, np.int64), max_px=3.0)
    s = c.scores(("n",))
    assert (s["paired"], s["truths"], s["found"]) == (1, 3, 1)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(1 / 3)
