"""gpupath against a hand-written CPU baseline on one slide: per stage and end to end, same run.

:func:`run_bench` plans one tile grid, then runs each side in a child process of its own (its
``ru_maxrss`` is that side's peak RSS):

* **ours**: :func:`gpupath.pipeline.process_slide` (engine ``onnxruntime`` on the CPU, the best
  engine with ``device="cuda"``); stage seconds from ``SlideResult.timings``.
* **baseline** (:func:`run_baseline`): what a lab writes by hand. OpenSlide ``read_region`` per
  tile (RGBA over white, PIL bilinear resize), torchstain's NumPy Macenko, ONNX Runtime on the CPU
  with the same shipped model, NumPy preprocessing, a scipy maximum-filter peak decoder, overlaps
  resolved by trimming each tile's margins plus greedy NMS, pyarrow Parquet; all inline.
* **TIAToolbox** (optional, a venv of its own): its Otsu tissue mask, sliding-window tiles at the
  same µm/px and Macenko normaliser, a peer for those stages (:func:`run_tiatoolbox`).

Both sides process the grid gpupath lays out (the baseline gets its level-0 tile origins), so
detections are comparable; the baseline's own tissue stage (Otsu on the grey level of a ~8 µm/px
thumbnail) is timed and its tile count reported. Both fit stains once per slide on the same 32
most tissue-rich tiles; the baseline renders tiles with torchstain's formula (``Io exp(-HERef C)``,
truncated): torchstain's ``normalize()`` re-fits every tile, which gives other pixels and so other
detections. Detections are matched one to one (centres within ``tol_px`` level-0 px).

Units: seconds, tiles/s, megapixels/s (MP = tiles x tile_px², at the target resolution), MiB.
Speed-up = baseline s / ours s. Ours' stages overlap (tiles are read in a background thread), so
they do not add up to its end-to-end time. Figures belong to the machine recorded with them.
``python -m gpupath.bench --side ours|baseline|tiatoolbox --job JOB --result OUT`` is one child;
``gpupath bench SLIDE`` is the front end. Only the standard library and NumPy are imported at the
top, so the TIAToolbox venv (without gpupath) runs this file by path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["STAGES", "run_bench", "run_baseline", "run_ours", "run_tiatoolbox", "plan_job", "match_detections",
           "machine_info", "markdown_report", "text_report", "results_stem", "machine_tag", "write_results"]

STAGES = ("setup", "open", "tissue", "read", "normalise", "detect", "write")
STAGE_NOTES = {"setup": "model / session load", "open": "ours: sha256 of the file + open",
               "tissue": "ours: mask + grid; baseline: thumbnail Otsu", "read": "ours: background thread",
               "normalise": "fit on 32 tiles + apply", "detect": "preprocess + model + decode + overlap dedup",
               "write": "Parquet"}
IO = 240.0   # Macenko's transmitted light (torchstain's default Io)


def _lap(seconds: dict[str, float], stage: str, since: float) -> float:
    now = time.perf_counter()
    seconds[stage] = seconds.get(stage, 0.0) + now - since
    return now


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --------------------------------------------------------------------------- plan (parent)


def plan_job(slide: str | Path, work: Path, *, device: str = "cpu", engine: str = "onnxruntime", tile_px: int = 256,
             overlap_px: int = 32, target_mpp: float = 0.5, min_tissue: float = 0.05, batch_size: int = 32,
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


# --------------------------------------------------------------------------- ours (child)


class _DevicePeak:
    """Peak device memory in use (every allocator: CuPy, torch, TensorRT, DALI), sampled every 20 ms;
    :meth:`stop` gives the peak in MiB above what was in use when sampling started."""

    def __init__(self) -> None:
        import cupy  # noqa: PLC0415

        self._used, self._stop = lambda: (lambda f, t: t - f)(*cupy.cuda.runtime.memGetInfo()), threading.Event()
        self.base = self.peak = self._used()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._used())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return (self.peak - self.base) / 2**20


def run_ours(job: dict[str, Any]) -> dict[str, Any]:
    """gpupath's pipeline on the job's slide; stage seconds, counts, peak memory."""
    from gpupath.pipeline import RunParams, process_slide
    from gpupath.tiling import TileSpec

    p = job["params"]
    params = RunParams(tile=TileSpec(tile_px=p["tile_px"], overlap_px=p["overlap_px"], target_mpp=p["target_mpp"],
                                     min_tissue=p["min_tissue"]), stain="macenko", device=p["device"],
                       engine=p["engine"], batch_size=p["batch_size"], mpp_override=job["mpp_override"],
                       **({"reports": False} if "reports" in RunParams.__dataclass_fields__ else {}))  # Parquet only
    device_peak = _DevicePeak() if p["device"] == "cuda" else None
    t0 = time.perf_counter()
    detector, notes = params.make_detector()
    setup_s = time.perf_counter() - t0
    res = process_slide(job["slide"], Path(job["work"]) / "ours", params, detector=detector, resume=False)
    total_s = time.perf_counter() - t0
    if res.status != "ok":
        raise RuntimeError(f"ours failed on {job['slide']}: {res.error}")
    tm = res.timings
    stages = {"setup": setup_s, "open": tm.get("sha256", 0.0) + tm.get("open", 0.0), "tissue": tm.get("tissue", 0.0),
              "read": tm.get("read", 0.0), "normalise": tm.get("stain_fit", 0.0) + tm.get("normalize", 0.0),
              "detect": tm.get("detect", 0.0) + tm.get("dedup", 0.0), "write": tm.get("write", 0.0)}
    out: dict[str, Any] = {"stages": stages, "end_to_end_s": total_s, "n_tiles": res.n_tiles,
                           "n_detections": res.n_detections, "peak_rss_mib": _peak_rss_mib(),
                           "engine": detector.engine, "notes": notes, "raw_timings": tm,
                           "detections": str(Path(job["work"]) / "ours" / "detections"),
                           "tiles": str(Path(job["work"]) / "ours" / "tiles")}
    if device_peak is not None:
        out["peak_device_mib"] = device_peak.stop()
    return out


# --------------------------------------------------------------------------- baseline (child)


def run_baseline(slide_path: str | Path, tile_grid: dict[str, Any], *, model: dict[str, Any], out_path: str | Path,
                 batch_size: int = 32, min_tissue: float = 0.05, mpp: float | None = None) -> dict[str, Any]:
    """The hand-written CPU pipeline on ``tile_grid``'s tiles (see the module notes).

    Parameters
    ----------
    slide_path : slide OpenSlide opens.
    tile_grid : ``plan_job(...)["grid"]``: level, downsample, read_px, tile_px, level-0 ``x``, ``y``
        of each tile, grid ``col``/``row``, ``sample`` (indices of the stain-fit tiles).
    model : ``plan_job(...)["model"]``: ONNX path, input name, normalisation, heatmap decoder facts.
    out_path : Parquet file written (x0_px, y0_px, x1_px, y1_px level-0 half-open, score, label).
    batch_size : tiles per ONNX Runtime call.
    min_tissue : tissue fraction for the baseline's own tile count (reported only).
    mpp : level-0 µm/px when the slide has none in its metadata.

    Returns
    -------
    dict of stage seconds, end-to-end seconds, counts and peak RSS (MiB).
    """
    import onnxruntime as ort
    import openslide
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torchstain
    from PIL import Image
    from scipy import ndimage
    from scipy.spatial import cKDTree

    g = tile_grid
    sec: dict[str, float] = {}
    t_start = t = time.perf_counter()
    session = ort.InferenceSession(model["path"], providers=["CPUExecutionProvider"])
    t = _lap(sec, "setup", t)

    slide = openslide.OpenSlide(str(slide_path))
    mpp = mpp or float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    w0, h0 = slide.dimensions
    t = _lap(sec, "open", t)

    # tissue as labs do it: Otsu on the grey level of a ~8 µm/px thumbnail (counted, not used: same tiles)
    thumb = np.asarray(slide.get_thumbnail((max(1, round(w0 * mpp / 8)), max(1, round(h0 * mpp / 8)))).convert("L"))
    hist = np.bincount(thumb.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    w_lo, m_lo = np.cumsum(hist), np.cumsum(hist * levels)
    w_hi, m_hi = w_lo[-1] - w_lo, m_lo[-1] - m_lo
    between = np.where((w_lo > 0) & (w_hi > 0), (m_lo * w_hi - m_hi * w_lo) ** 2 / np.maximum(w_lo * w_hi, 1), 0)
    tissue = thumb <= int(np.argmax(between))
    ds_thumb = w0 / thumb.shape[1]
    stride_l0, size_l0 = g["stride_lvl_px"] * g["downsample"], g["read_px"] * g["downsample"]
    cum = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    cols, rows = np.meshgrid(np.arange(g["n_cols"]), np.arange(g["n_rows"]))
    c0 = np.clip((cols * stride_l0 / ds_thumb).astype(int), 0, tissue.shape[1])
    c1 = np.clip(np.ceil((cols * stride_l0 + size_l0) / ds_thumb).astype(int), 0, tissue.shape[1])
    r0 = np.clip((rows * stride_l0 / ds_thumb).astype(int), 0, tissue.shape[0])
    r1 = np.clip(np.ceil((rows * stride_l0 + size_l0) / ds_thumb).astype(int), 0, tissue.shape[0])
    frac = (cum[r1, c1] - cum[r0, c1] - cum[r1, c0] + cum[r0, c0]) / np.maximum((r1 - r0) * (c1 - c0), 1)
    own_tiles = frac >= min_tissue
    both = int(own_tiles[np.asarray(g["row"]), np.asarray(g["col"])].sum())
    t = _lap(sec, "tissue", t)

    def read(i: int) -> np.ndarray:
        rgba = np.asarray(slide.read_region((g["x"][i], g["y"][i]), g["level"], (g["read_px"], g["read_px"])))
        alpha = rgba[..., 3:4].astype(np.float32) / 255  # outside the slide: transparent -> white glass
        rgb = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        if g["read_px"] != g["tile_px"]:
            rgb = np.asarray(Image.fromarray(rgb).resize((g["tile_px"], g["tile_px"]), Image.BILINEAR))
        return rgb

    # stain: torchstain fitted on the slide's 32 most tissue-rich tiles, its formula applied per tile
    t_norm = time.perf_counter()
    macenko = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    he_ref, maxc_ref = macenko.HERef.copy(), macenko.maxCRef.copy()   # Macenko's reference: the target
    macenko.fit(np.stack([read(i) for i in g["sample"]]), Io=IO, alpha=1, beta=0.15)  # the slide's stains
    he_slide, maxc_slide = macenko.HERef, macenko.maxCRef
    sec["normalise"] = time.perf_counter() - t_norm

    def normalise(rgb: np.ndarray) -> np.ndarray:  # torchstain's normalize() with the slide's fit
        od = -np.log((rgb.reshape(-1, 3).astype(float) + 1) / IO)
        conc = np.linalg.lstsq(he_slide, od.T, rcond=None)[0] / (maxc_slide / maxc_ref)[:, None]
        out = IO * np.exp(-he_ref.dot(conc))
        out[out > 255] = 255
        return out.T.reshape(rgb.shape).astype(np.uint8)

    mean, std = np.asarray(model["mean"], np.float32), np.asarray(model["std"], np.float32)
    k, stride, thr = model["peak_window_px"], model["stride_px"], model["threshold"]
    l0_per_px = g["read_px"] * g["downsample"] / g["tile_px"]
    xs, ys = np.asarray(g["x"], np.float64), np.asarray(g["y"], np.float64)
    found: list[np.ndarray] = []
    for start in range(0, len(xs), batch_size):
        t = time.perf_counter()
        index = range(start, min(start + batch_size, len(xs)))
        tiles = np.stack([read(i) for i in index])
        t = _lap(sec, "read", t)
        tiles = np.stack([normalise(tile) for tile in tiles])
        t = _lap(sec, "normalise", t)
        x = np.ascontiguousarray(((tiles.astype(np.float32) / model["scale"] - mean) / std).transpose(0, 3, 1, 2))
        heat, size, offset = session.run([model["heatmap"], model["size"], model["offset"]], {model["input"]: x})
        peaks = (heat == ndimage.maximum_filter(heat, size=(1, 1, k, k), mode="constant", cval=-1.0)) & (heat >= thr)
        n, _, r, c = np.nonzero(peaks)
        cx = (c + offset[n, 0, r, c]) * stride * l0_per_px + xs[start + n]   # level-0 px
        cy = (r + offset[n, 1, r, c]) * stride * l0_per_px + ys[start + n]
        found.append(np.stack([cx, cy, size[n, 0, r, c] * l0_per_px, heat[n, 0, r, c], start + n], axis=1))
        _lap(sec, "detect", t)
    t = time.perf_counter()
    det = np.concatenate(found) if found else np.zeros((0, 5))
    det = det[(det[:, 0] >= 0) & (det[:, 0] < w0) & (det[:, 1] >= 0) & (det[:, 1] < h0)]
    # one object per nucleus across overlaps: each tile keeps the centres in its core (half the overlap
    # trimmed on inner edges; kept too where the neighbour owning them was not read), then greedy NMS,
    # best score first, of centres closer than the dedup distance
    half = (g["read_px"] - g["stride_lvl_px"]) * g["downsample"] / 2
    tile_col, tile_row = np.asarray(g["col"])[det[:, 4].astype(int)], np.asarray(g["row"])[det[:, 4].astype(int)]
    own_col = np.clip((det[:, 0] - half) // stride_l0, 0, g["n_cols"] - 1).astype(int)
    own_row = np.clip((det[:, 1] - half) // stride_l0, 0, g["n_rows"] - 1).astype(int)
    read_tiles = np.zeros((g["n_rows"], g["n_cols"]), bool)
    read_tiles[np.asarray(g["row"]), np.asarray(g["col"])] = True
    det = det[((own_col == tile_col) & (own_row == tile_row)) | ~read_tiles[own_row, own_col]]
    pairs = cKDTree(det[:, :2]).query_pairs(model["dedup_distance_um"] / mpp, output_type="ndarray")
    neighbours: list[list[int]] = [[] for _ in range(len(det))]
    for i, j in pairs.tolist():
        neighbours[i].append(j)
        neighbours[j].append(i)
    gone = np.zeros(len(det), bool)
    keep = []
    for i in np.argsort(-det[:, 3], kind="stable").tolist():
        if not gone[i]:
            keep.append(i)
            gone[neighbours[i]] = True
    det = det[np.sort(np.asarray(keep, np.int64))]
    t = _lap(sec, "detect", t)

    cx, cy, rad = det[:, 0], det[:, 1], det[:, 2]
    table = pa.table({"x0_px": np.clip(cx - rad, 0, w0).astype(np.float32),
                      "y0_px": np.clip(cy - rad, 0, h0).astype(np.float32),
                      "x1_px": np.clip(cx + rad, 0, w0).astype(np.float32),
                      "y1_px": np.clip(cy + rad, 0, h0).astype(np.float32),
                      "score": det[:, 3].astype(np.float32), "label": np.zeros(len(det), np.int16)})
    pq.write_table(table, str(out_path))
    _lap(sec, "write", t)
    slide.close()
    return {"stages": {s: sec.get(s, 0.0) for s in STAGES}, "end_to_end_s": time.perf_counter() - t_start,
            "n_tiles": len(xs), "n_detections": len(det), "peak_rss_mib": _peak_rss_mib(), "engine": "onnxruntime",
            "own_tissue_tiles": int(own_tiles.sum()), "own_tissue_tiles_in_our_grid": both,
            "detections": str(out_path)}


# --------------------------------------------------------------------------- TIAToolbox peer (child, its venv)


def run_tiatoolbox(job: dict[str, Any]) -> dict[str, Any]:
    """TIAToolbox's tissue mask, sliding-window tiles at the job's µm/px and Macenko normaliser."""
    import tiatoolbox
    from tiatoolbox.tools.patchextraction import SlidingWindowPatchExtractor
    from tiatoolbox.tools.stainnorm import MacenkoNormalizer
    from tiatoolbox.wsicore.wsireader import WSIReader

    p, sec = job["params"], {}
    t_start = t = time.perf_counter()
    reader = WSIReader.open(job["slide"], mpp=job["mpp_override"])
    t = _lap(sec, "open", t)
    mask = reader.tissue_mask(method="otsu", resolution=8.0, units="mpp")
    stride = p["tile_px"] - p["overlap_px"]
    patches = SlidingWindowPatchExtractor(reader, patch_size=(p["tile_px"],) * 2, input_mask=mask,
                                          resolution=p["target_mpp"], units="mpp", stride=(stride, stride),
                                          min_mask_ratio=p["min_tissue"], pad_constant_values=255)
    _lap(sec, "tissue", t)  # the mask, and the tile list it filters
    norm, target, n_tiles = MacenkoNormalizer(), [], 0
    for i in range(len(patches)):
        t = time.perf_counter()
        tile = np.asarray(patches[i])[..., :3]
        t = _lap(sec, "read", t)
        n_tiles += 1
        if len(target) < 32:  # a lab's target: the first 32 patches; normalisation starts once fitted
            target.append(tile)
            if len(target) == 32 or i == len(patches) - 1:
                norm.fit(np.concatenate(target))
                for tgt in target:
                    norm.transform(tgt)
        else:
            norm.transform(tile)
        _lap(sec, "normalise", t)
    return {"stages": {s: sec.get(s, 0.0) for s in ("open", "tissue", "read", "normalise")},
            "end_to_end_s": time.perf_counter() - t_start, "n_tiles": n_tiles, "peak_rss_mib": _peak_rss_mib(),
            "version": tiatoolbox.__version__}


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


# --------------------------------------------------------------------------- machine, orchestration, reports


def machine_info(tiatoolbox_version: str | None = None) -> dict[str, Any]:
    """CPU model, cores, memory, GPU name (or None), versions, UTC date, load average."""
    cpu = platform.processor() or platform.machine()
    mem_gib = None
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
        mem_kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal"))
        mem_gib = round(mem_kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):  # not Linux: keep what platform says
        pass
    gpu = None
    try:
        from gpupath._xp import gpu_available  # noqa: PLC0415

        if gpu_available():
            import cupy  # noqa: PLC0415

            name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
            gpu = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001  no CuPy / driver: a CPU machine
        gpu = None
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    versions = {d: version(d) for d in ("gpupath", "numpy", "scipy", "onnxruntime", "openslide-python", "openslide-bin",
                                        "torchstain", "pyarrow", "Pillow", "cucim-cu13", "cupy-cuda13x",
                                        "tensorrt-cu13", "nvidia-dali-cuda130")}
    versions.update(python=platform.python_version(), tiatoolbox=tiatoolbox_version)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gib": mem_gib, "gpu": gpu, "os": platform.platform(),
            "hostname": platform.node(), "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "loadavg_1m": os.getloadavg()[0], "versions": versions,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_"))}}


def _child(side: str, job_path: Path, python: str, cwd: Path) -> dict[str, Any]:
    result = job_path.with_name(f"{side}.json")
    if python == sys.executable:
        cmd = [python, "-m", "gpupath.bench", "--side", side, "--job", str(job_path), "--result", str(result)]
    else:  # another venv without gpupath: run this file by path (stdlib + NumPy at import); absolute, not
        # resolved: a venv's python is a symlink that must keep its venv path
        cmd = [os.path.abspath(python), "-c", "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
               "run_name='__main__')", str(Path(__file__).resolve()), "--side", side, "--job", str(job_path),
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
        raise ConfigError("the baseline's Macenko is torchstain's: pip install 'gpupath[bench]' (torchstain 1.4.1; also in the test extra)")
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
            rows.append({"stage": stage, "ours_s": o, "baseline_s": b, "speedup": b / o if o > 0 else None,
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
                "peak_rss_mib": {"ours": ours["peak_rss_mib"], "baseline": base["peak_rss_mib"],
                                 "ratio": ours["peak_rss_mib"] / base["peak_rss_mib"]},
                "agreement": agreement, "tiatoolbox": tia}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _slug(text: str, words: int) -> str:
    keep = [w for w in "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
            if w not in ("r", "tm", "cpu", "processor", "nvidia", "core", "with", "radeon", "graphics")]
    return "-".join(keep[:words]) or "unknown"


def machine_tag(machine: dict[str, Any]) -> str:
    """``<date>-<cores>c-<cpu>[-<gpu>]`` of :func:`machine_info`, e.g. ``2026-11-25-2c-amd-epyc``."""
    gpu = f"-{_slug(machine['gpu'], 2)}" if machine["gpu"] else ""
    return f"{machine['date_utc'][:10]}-{machine['cores']}c-{_slug(machine['cpu'], 2)}{gpu}"


def results_stem(result: dict[str, Any]) -> str:
    """``<date>-<cores>c-<cpu>[-<gpu>]-<slide>``: the name of a run's files under bench/results/."""
    return f"{machine_tag(result['machine'])}-{_slug(Path(result['job']['slide']).stem, 6)}"


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table_lines(result: dict[str, Any]) -> list[list[str]]:
    head = ["stage", "ours s", "baseline s", "speed-up", "ours tiles/s", "base tiles/s", "ours MP/s", "base MP/s", "what"]
    lines = [head]
    for r in result["rows"]:
        lines.append([r["stage"].replace("_", " "), _fmt(r["ours_s"], 3), _fmt(r["baseline_s"], 3),
                      _fmt(r["speedup"]) + ("x" if r["speedup"] else ""), _fmt(r["ours_tiles_per_s"], 1),
                      _fmt(r["baseline_tiles_per_s"], 1), _fmt(r["ours_mp_per_s"], 1),
                      _fmt(r["baseline_mp_per_s"], 1), r["note"]])
    return lines


def _summary_lines(result: dict[str, Any]) -> list[str]:
    m, a, rss, job = result["machine"], result["agreement"], result["peak_rss_mib"], result["job"]
    tia = result["tiatoolbox"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
             f"{m['date_utc']}; load average at start {m['loadavg_1m']:.2f}",
             f"slide: {Path(job['slide']).name} ({job['width_px']}x{job['height_px']} px, {job['mpp']:.4g} µm/px, "
             f"{_fmt(job['tissue_mm2'])} mm² tissue); {result['n_tiles']} tiles of {job['grid']['tile_px']} px at "
             f"{job['grid']['tile_mpp']:.4g} µm/px; device {job['params']['device']}, ours engine "
             f"{result['ours']['engine']}",
             f"peak RSS: ours {rss['ours']:.0f} MiB, baseline {rss['baseline']:.0f} MiB (ours/baseline {rss['ratio']:.2f})"
             + (f"; peak device memory (ours) {result['ours']['peak_device_mib']:.0f} MiB"
                if "peak_device_mib" in result["ours"] else ""),
             f"agreement: ours {a['ours']} vs baseline {a['baseline']} detections ({a['count_diff_pct']:.2f} % apart), "
             f"{a['matched']} matched within {a['tol_px']:g} px ({a['matched_of_baseline']:.2%} of the baseline's); "
             f"matched boxes differ by <= {a['box_diff_max_px']:.2f} px (p99 {a['box_diff_p99_px']:.2f}); "
             f"same tiles: {a['same_tiles']}",
             f"baseline's own tissue mask (thumbnail Otsu) keeps {result['baseline']['own_tissue_tiles']} tiles, "
             f"{result['baseline']['own_tissue_tiles_in_our_grid']} of them in ours"]
    if "not_run" in tia:
        lines.append(f"TIAToolbox: not run ({tia['not_run']})")
    else:
        st = tia["stages"]
        lines.append(f"TIAToolbox {tia['version']} (peer for tissue, tiling and Macenko, which re-fits every tile; "
                     f"{tia['n_tiles']} tiles): "
                     + ", ".join(f"{s} {v:.3f} s" for s, v in st.items())
                     + f", end to end {tia['end_to_end_s']:.3f} s ({tia['tiles_per_s']['end_to_end']:.1f} tiles/s),"
                       f" peak RSS {tia['peak_rss_mib']:.0f} MiB")
    return lines


def text_report(result: dict[str, Any]) -> str:
    """The per-stage table (fixed-width text) and the summary lines."""
    lines = _table_lines(result)
    widths = [max(len(row[c]) for row in lines) for c in range(len(lines[0]))]
    text = ["  ".join(cell.ljust(w) if c in (0, 8) else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
            for row in lines]
    return "\n".join(text + [""] + _summary_lines(result))


def markdown_report(result: dict[str, Any]) -> str:
    """The same as :func:`text_report` as Markdown (a table and a list)."""
    lines = _table_lines(result)
    md = [f"# gpupath bench: {Path(result['job']['slide']).name}", "",
          "| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    md += ["| " + " | ".join(row) + " |" for row in lines[1:]]
    md += ["", *[f"- {line}" for line in _summary_lines(result)], "",
           "Speed-up = baseline s / ours s. MP = tiles x tile px², at the target resolution. Stages of ours overlap "
           "(tiles are read in a background thread), so they do not add up to the end-to-end time. Versions: "
           + ", ".join(f"{k} {v}" for k, v in result["machine"]["versions"].items() if v) + ".",
           "Figures from this machine only; compare none with figures from another machine.", ""]
    return "\n".join(md)


def write_results(result: dict[str, Any], json_path: str | Path) -> tuple[Path, Path]:
    """``json_path`` (the result) and the Markdown report beside it (same stem, ``.md``)."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    md = path.with_suffix(".md")
    md.write_text(markdown_report(result))
    return path, md


def main(argv: list[str] | None = None) -> int:
    """One child: ``--side ours|baseline|tiatoolbox --job JOB.json --result OUT.json``."""
    ap = argparse.ArgumentParser(description="one side of gpupath bench (run by gpupath bench, not by hand)")
    ap.add_argument("--side", choices=("ours", "baseline", "tiatoolbox"), required=True)
    ap.add_argument("--job", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    args = ap.parse_args(argv)
    job = json.loads(args.job.read_text())
    if args.side == "ours":
        out = run_ours(job)
    elif args.side == "baseline":
        out = run_baseline(job["slide"], job["grid"], model=job["model"], out_path=Path(job["work"]) / "baseline.parquet",
                           batch_size=job["params"]["batch_size"], min_tissue=job["params"]["min_tissue"],
                           mpp=job["mpp_override"])
    else:
        out = run_tiatoolbox(job)
    args.result.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
