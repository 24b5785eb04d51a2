"""``gpupath bench`` in the parent process: plan the job, run each side as a child, compare them.

:func:`plan_job` lays out the tile grid and model facts both sides use; :func:`run_bench` runs the
baseline, ours and (optionally) TIAToolbox each in a child process of its own (see `_sides`),
derives rates and speed-ups per stage and matches the detections (:func:`match_detections`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gpupath.bench import _sides
from gpupath.bench._report import machine_info
from gpupath.bench._sides import STAGES
from gpupath.tiling import DEFAULT_TARGET_MPP

STAGE_NOTES = {"setup": "model / session load", "open": "ours: sha256 of the file + open",
               "tissue": "ours: mask + grid; baseline: thumbnail Otsu", "read": "decode + resize",
               "normalise": "fit on 32 tiles + apply", "detect": "preprocess + model + decode + overlap dedup",
               "write": "Parquet"}


# --------------------------------------------------------------------------- plan (parent)


def plan_job(slide: str | Path, work: Path, *, device: str = "cpu", engine: str = "onnxruntime", tile_px: int = 256,
             overlap_px: int = 32, target_mpp: float = DEFAULT_TARGET_MPP, min_tissue: float = 0.05, batch_size: int = 32,
             mpp: float | None = None) -> dict[str, Any]:
    """The tile grid and model facts both sides use, as a JSON-able dict (host, gpupath's own stages)."""
    from gpupath.detect.card import HeatmapOutput, shipped_card
    from gpupath.pipeline import STAIN_SAMPLE_TILES
    from gpupath.slide import open_slide
    from gpupath.tiling import TileSpec, tile_grid
    from gpupath.tissue import compute_tissue

    spec = TileSpec(tile_px=tile_px, overlap_px=overlap_px, target_mpp=target_mpp, min_tissue=min_tissue)
    with open_slide(slide, mpp=mpp) as s:
        slide_mpp = s.require_mpp()
        tissue = compute_tissue(s, mpp=slide_mpp)
        grid = tile_grid(level_dimensions=s.level_dimensions, level_downsamples=s.level_downsamples, mpp=slide_mpp,
                         mask=tissue, spec=spec)
        dims = s.dimensions
    if len(grid) == 0:
        raise ValueError(f"{slide}: no tile holds >= {min_tissue:.0%} tissue; nothing to benchmark")
    sample = np.sort(np.argsort(-grid.tissue_fraction, kind="stable")[:STAIN_SAMPLE_TILES])  # as the pipeline
    card = shipped_card()
    out = card.output
    assert isinstance(out, HeatmapOutput) and card.input.layout == "NCHW" and card.input.channels == "RGB"
    return {
        "slide": str(Path(slide).resolve()), "work": str(work), "width_px": dims[0], "height_px": dims[1],
        "mpp": slide_mpp, "mpp_override": mpp, "tissue_mm2": tissue.area_mm2,
        "params": {"device": device, "engine": engine, "tile_px": tile_px, "overlap_px": overlap_px,
                   "target_mpp": target_mpp, "min_tissue": min_tissue, "batch_size": batch_size, "stain": "macenko"},
        "grid": {"level": grid.level, "downsample": grid.downsample, "read_px": grid.read_px, "tile_px": grid.tile_px,
                 "tile_mpp": grid.tile_mpp, "stride_lvl_px": grid.stride_lvl_px, "n_cols": grid.n_cols,
                 "n_rows": grid.n_rows, "x": grid.x.tolist(), "y": grid.y.tolist(), "col": grid.col.tolist(),
                 "row": grid.row.tolist(), "sample": sample.tolist()},
        "model": {"name": card.name, "path": str(card.model_path), "sha256": card.model_sha256,
                  "input": card.input.name, "scale": card.input.scale, "mean": list(card.input.mean),
                  "std": list(card.input.std), "heatmap": out.heatmap, "size": out.size, "offset": out.offset,
                  "stride_px": out.stride_px, "peak_window_px": out.peak_window_px, "threshold": out.threshold,
                  "dedup_distance_um": float(card.extra.get("dedup_distance_um", 2.5))},
    }




# --------------------------------------------------------------------------- agreement


def match_detections(ours: dict[str, np.ndarray], base: dict[str, np.ndarray], *, tol_px: float = 2.0) -> dict[str, Any]:
    """One-to-one matching of boxes (level-0 px) by centre distance <= ``tol_px``, closest pairs first.

    ``ours``/``base`` hold x0_px, y0_px, x1_px, y1_px arrays. Returns counts, count difference in %
    of the baseline, matched fraction of each side, and the largest box-coordinate difference of
    the matched pairs (max over x0, y0, x1, y1), overall and at the 99th percentile.
    """
    from gpupath.detect.boxes import match_one_to_one

    def centres(d: dict[str, np.ndarray]) -> np.ndarray:
        return np.c_[(d["x0_px"] + d["x1_px"]) / 2, (d["y0_px"] + d["y1_px"]) / 2].astype(np.float64)

    a, b = centres(ours), centres(base)
    ia_, ib_ = match_one_to_one(a, b, tol_px)
    diff = np.zeros(0)
    if len(ia_):
        diff = np.max([np.abs(np.asarray(ours[c], np.float64)[ia_] - np.asarray(base[c], np.float64)[ib_])
                       for c in ("x0_px", "y0_px", "x1_px", "y1_px")], axis=0)
    return {"ours": len(a), "baseline": len(b), "matched": len(ia_),
            "count_diff_pct": 100.0 * abs(len(a) - len(b)) / max(len(b), 1),
            "matched_of_ours": len(ia_) / max(len(a), 1), "matched_of_baseline": len(ia_) / max(len(b), 1),
            "tol_px": tol_px, "box_diff_max_px": float(diff.max()) if diff.size else 0.0,
            "box_diff_p99_px": float(np.percentile(diff, 99)) if diff.size else 0.0,
            "boxes_within_tol": float((diff <= tol_px).mean()) if diff.size else 1.0}


# --------------------------------------------------------------------------- which stage bounds the run

LOOP_STAGES = ("read", "normalize", "detect")  # the pipeline's timing keys inside the tile loop


def loop_bound(ours: dict[str, Any]) -> dict[str, Any]:
    """Which stage bounds our tile loop, from its CPU seconds: with CPU workers every worker runs every
    stage in turn, so the loop lasts about the stages' CPU seconds over the cores that run them, and
    the stage with the largest share of those seconds bounds it. Without CPU timings (prefetch
    schedule), the stage with the most wall seconds."""
    tm, loop = ours["raw_timings"], ours["tile_loop"]
    cpu = {k: tm.get(f"{k}_cpu") for k in LOOP_STAGES}
    if all(v is not None for v in cpu.values()) and loop["wall_s"]:
        total = sum(cpu.values())
        stage = max(cpu, key=lambda k: cpu[k])
        cores = loop["workers"] * loop["threads_each"]
        return {"stage": stage, "share": cpu[stage] / total, "stage_cpu_s": cpu, "loop_wall_s": loop["wall_s"],
                "loop_cpu_s": loop["cpu_s"], "busy": loop["cpu_s"] / (loop["wall_s"] * cores), "cores": cores,
                "workers": loop["workers"], "threads_each": loop["threads_each"], "by": "cpu"}
    wall = {k: tm.get(k, 0.0) for k in LOOP_STAGES}
    stage = max(wall, key=lambda k: wall[k])
    return {"stage": stage, "share": wall[stage] / max(sum(wall.values()), 1e-12), "stage_wall_s": wall,
            "loop_wall_s": loop["wall_s"], "by": "wall"}


# --------------------------------------------------------------------------- orchestration


def _child(side: str, job_path: Path, python: str, cwd: Path) -> dict[str, Any]:
    result = job_path.with_name(f"{side}.json")
    if python == sys.executable:
        cmd = [python, "-m", "gpupath.bench", "--side", side, "--job", str(job_path), "--result", str(result)]
    else:  # another venv without gpupath: run _sides.py by path (stdlib + NumPy at import); absolute, not
        # resolved: a venv's python is a symlink that must keep its venv path
        cmd = [os.path.abspath(python), "-c", "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
               "run_name='__main__')", str(Path(_sides.__file__).resolve()), "--side", side, "--job", str(job_path),
               "--result", str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{side} side failed (exit {proc.returncode}): {tail}")
    return json.loads(result.read_text())


def _rates(side: dict[str, Any], tile_px: int) -> None:
    mp = side["n_tiles"] * tile_px * tile_px / 1e6
    side["tiles_per_s"] = {s: side["n_tiles"] / v if v > 0 else None for s, v in side["stages"].items()}
    side["mp_per_s"] = {s: mp / v if v > 0 else None for s, v in side["stages"].items()}
    side["tiles_per_s"]["end_to_end"] = side["n_tiles"] / side["end_to_end_s"]
    side["mp_per_s"]["end_to_end"] = mp / side["end_to_end_s"]


def run_bench(slide: str | Path, *, device: str = "cpu", work: str | Path | None = None,
              tiatoolbox_python: str | None = None, tol_px: float = 2.0, **grid_options: Any) -> dict[str, Any]:
    """Ours, the baseline and (with ``tiatoolbox_python``) TIAToolbox on one slide; one result dict.

    ``grid_options``: tile_px, overlap_px, target_mpp, min_tissue, batch_size, mpp (see :func:`plan_job`).
    The slide file is read once first (sha256) so that no side pays for a cold page cache alone.
    """
    import importlib.util

    import pyarrow.parquet as pq

    from gpupath.errors import ConfigError
    from gpupath.ingest import sha256_file

    if importlib.util.find_spec("torchstain") is None:
        raise ConfigError("the baseline's Macenko is torchstain's: pip install 'gpupath[bench]' "
                          "(torchstain 1.4.1; also in the test extra)")
    tmp = None if work is not None else tempfile.TemporaryDirectory(prefix="gpupath-bench-")
    work_dir = Path(work if work is not None else tmp.name)  # type: ignore[union-attr]
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        sha = sha256_file(slide)
        job = plan_job(slide, work_dir, device=device, engine="onnxruntime" if device == "cpu" else "auto",
                       **grid_options)
        job_path = work_dir / "job.json"
        job_path.write_text(json.dumps(job))
        base = _child("baseline", job_path, sys.executable, work_dir)
        ours = _child("ours", job_path, sys.executable, work_dir)
        tile_px = job["grid"]["tile_px"]
        for side in (base, ours):
            _rates(side, tile_px)
        got = pq.read_table(ours.pop("detections")).to_pydict()
        want = pq.read_table(base.pop("detections")).to_pydict()
        tiles = pq.read_table(ours.pop("tiles")).to_pydict()
        same_tiles = sorted(zip(tiles["x_px"], tiles["y_px"])) == sorted(zip(job["grid"]["x"], job["grid"]["y"]))
        agreement = match_detections({k: np.asarray(v) for k, v in got.items() if k.endswith("_px")},
                                     {k: np.asarray(v) for k, v in want.items() if k.endswith("_px")}, tol_px=tol_px)
        agreement["same_tiles"] = same_tiles
        rows = []
        for stage in (*STAGES, "end_to_end"):
            o = ours["end_to_end_s"] if stage == "end_to_end" else ours["stages"][stage]
            b = base["end_to_end_s"] if stage == "end_to_end" else base["stages"][stage]
            o_cpu = ours["end_to_end_cpu_s"] if stage == "end_to_end" else ours["cpu_stages"][stage]
            b_cpu = base["end_to_end_cpu_s"] if stage == "end_to_end" else base["cpu_stages"][stage]
            rows.append({"stage": stage, "ours_s": o, "baseline_s": b, "speedup": b / o if o > 0 else None,
                         "ours_cpu_s": o_cpu, "baseline_cpu_s": b_cpu,
                         "ours_tiles_per_s": ours["tiles_per_s"][stage], "baseline_tiles_per_s": base["tiles_per_s"][stage],
                         "ours_mp_per_s": ours["mp_per_s"][stage], "baseline_mp_per_s": base["mp_per_s"][stage],
                         "note": STAGE_NOTES.get(stage, "")})
        tia: dict[str, Any]
        if tiatoolbox_python is None:
            tia = {"not_run": "no TIAToolbox venv given (--tiatoolbox-python)"}
        else:
            try:
                tia = _child("tiatoolbox", job_path, tiatoolbox_python, work_dir)
                _rates(tia, tile_px)
            except (RuntimeError, OSError) as exc:
                tia = {"not_run": str(exc)}
        job_public = {k: v for k, v in job.items() if k not in ("grid", "work")}
        job_public["grid"] = {k: v for k, v in job["grid"].items() if k not in ("x", "y", "col", "row", "sample")}
        return {"format": "gpupath-bench/1", "machine": machine_info(tia.get("version")), "slide_sha256": sha,
                "job": job_public, "n_tiles": len(job["grid"]["x"]), "rows": rows, "ours": ours, "baseline": base,
                "bound": loop_bound(ours),
                "peak_rss_mib": {"ours": ours["peak_rss_mib"], "baseline": base["peak_rss_mib"],
                                 "ratio": ours["peak_rss_mib"] / base["peak_rss_mib"]},
                "agreement": agreement, "tiatoolbox": tia}
    finally:
        if tmp is not None:
            tmp.cleanup()

