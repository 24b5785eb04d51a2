"""Readers of a run's outputs and of a generated slide's truth, shared by the tests that run the pipeline end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from gpupath.detect.boxes import match_one_to_one
from gpupath.synthetic import read_nuclei


def detections_of(out: Path, slide_id: str) -> dict[str, np.ndarray]:
    """Boxes, scores and box centres of one slide's detections partition under the run folder ``out``."""
    table = pq.read_table(out / "detections" / f"slide_id={slide_id}" / "part-0.parquet")
    cols = {name: table.column(name).to_numpy() for name in ("x0_px", "y0_px", "x1_px", "y1_px", "score")}
    cols["cx"] = (cols["x0_px"] + cols["x1_px"]) / 2
    cols["cy"] = (cols["y0_px"] + cols["y1_px"]) / 2
    return cols


MATCH_PX = 4.0  # a detection matches a true nucleus when their centres are within 4 level-0 px


def one_to_one(truth: np.ndarray, found: np.ndarray, max_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy closest-first matching; returns (truth index, found index) pairs within ``max_px``."""
    return match_one_to_one(truth, found, max_px)


def truth_centres(slide: Path) -> np.ndarray:
    nuclei = read_nuclei(slide)
    return np.c_[nuclei["x_px"], nuclei["y_px"]]
