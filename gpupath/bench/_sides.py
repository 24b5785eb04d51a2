"""The three sides of ``gpupath bench``, each run in a child process, and the child's entry point.

* :func:`run_ours`: gpupath's pipeline (stage seconds from ``SlideResult.timings``, peak RSS and,
  on ``cuda``, peak device memory);
* :func:`run_baseline`: the hand-written CPU pipeline (OpenSlide, torchstain's Macenko, ONNX
  Runtime, scipy peak decoder, trim + greedy NMS, pyarrow Parquet);
* :func:`run_tiatoolbox`: TIAToolbox's tissue mask, sliding-window tiles and Macenko normaliser;
* :func:`main`: ``--side ours|baseline|tiatoolbox --job JOB --result OUT`` (one child).

Only the standard library and NumPy are imported at the top (everything else inside the sides),
so the TIAToolbox venv (without gpupath) runs this file by path; ``python -m gpupath.bench`` runs
:func:`main` in gpupath's own venv.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("setup", "open", "tissue", "read", "normalise", "detect", "write")
IO = 240.0   # Macenko's transmitted light (torchstain's default Io)


def _lap(seconds: dict[str, float], stage: str, since: float) -> float:
    now = time.perf_counter()
    seconds[stage] = seconds.get(stage, 0.0) + now - since
    return now


class _Laps:
    """Wall and process-CPU seconds of consecutive stages (the baseline runs them one after the other)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.mark()

    def mark(self) -> None:
        """The next stage starts now."""
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[stage] = self.wall.get(stage, 0.0) + wall - self._wall
        self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def _peak_rss_mib() -> float:
    """This process's peak resident memory, MiB: Linux's VmHWM (reset at exec, unlike ``ru_maxrss``, which a
    child started by fork + exec can inherit from its parent's size), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM")) / 1024.0  # kB
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --------------------------------------------------------------------------- ours (child)


class _DevicePeak:
    """Peak device memory in use (every allocator: CuPy, torch, TensorRT, DALI), sampled every 20 ms;
    :meth:`stop` gives the peak in MiB above what was in use when sampling started."""

    def __init__(self) -> None:
        import cupy

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
    """gpupath's pipeline on the job's slide; stage seconds (wall and CPU), counts, peak memory; then, on
    the CPU, the engine alone on the run's own tiles and the decoder against raw libjpeg-turbo."""
    from gpupath.pipeline import RunParams, process_slide
    from gpupath.tile_loop import REENTRANT_ENGINES, cpu_share
    from gpupath.tiling import TileSpec

    p = job["params"]
    params = RunParams(tile=TileSpec(tile_px=p["tile_px"], overlap_px=p["overlap_px"], target_mpp=p["target_mpp"],
                                     min_tissue=p["min_tissue"]), stain="macenko", device=p["device"],
                       engine=p["engine"], batch_size=p["batch_size"], mpp_override=job["mpp_override"],
                       **({"reports": False} if "reports" in RunParams.__dataclass_fields__ else {}))  # Parquet only
    device_peak = _DevicePeak() if p["device"] == "cuda" else None
    t0, cpu0 = time.perf_counter(), time.process_time()
    detector, notes = params.make_detector()
    setup_s, setup_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    res = process_slide(job["slide"], Path(job["work"]) / "ours", params, detector=detector, resume=False)
    total_s, total_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if res.status != "ok":
        raise RuntimeError(f"ours failed on {job['slide']}: {res.error}")
    tm = res.timings
    workers, threads = cpu_share(params.cpu_workers) if p["device"] == "cpu" and detector.engine in REENTRANT_ENGINES \
        else (1, 0)
    out: dict[str, Any] = {"stages": _our_stages(tm, setup_s), "cpu_stages": _our_cpu_stages(tm, setup_cpu),
                           "end_to_end_s": total_s, "end_to_end_cpu_s": total_cpu, "n_tiles": res.n_tiles,
                           "n_detections": res.n_detections, "peak_rss_mib": _peak_rss_mib(),
                           "engine": detector.engine, "precision": getattr(detector, "precision", None), "notes": notes,
                           "raw_timings": tm, "tile_loop": {"wall_s": tm.get("tiles"), "cpu_s": tm.get("tiles_cpu"),
                                                            "workers": workers, "threads_each": threads},
                           "detections": str(Path(job["work"]) / "ours" / "detections"),
                           "tiles": str(Path(job["work"]) / "ours" / "tiles")}
    if device_peak is not None:
        out["peak_device_mib"] = device_peak.stop()
    if p["device"] == "cpu":  # after the run and its peak RSS: these passes do not disturb either
        out["engine_alone"] = _engine_alone(job, detector, workers)
        out["decode"] = _decode_rates(job)
    return out


def _our_stages(tm: dict[str, float], setup_s: float) -> dict[str, float]:
    """The pipeline's timings in the bench's stages (wall seconds; loop stages summed over workers)."""
    return {"setup": setup_s, "open": tm.get("sha256", 0.0) + tm.get("open", 0.0), "tissue": tm.get("tissue", 0.0),
            "read": tm.get("read", 0.0), "normalise": tm.get("stain_fit", 0.0) + tm.get("normalize", 0.0),
            "detect": tm.get("detect", 0.0) + tm.get("dedup", 0.0), "write": tm.get("write", 0.0)}


def _our_cpu_stages(tm: dict[str, float], setup_cpu: float) -> dict[str, float | None]:
    """CPU seconds of the same stages (None for a loop stage the schedule did not time on the CPU)."""
    def cpu(*keys: str) -> float | None:
        values = [tm.get(f"{k}_cpu") for k in keys]
        return None if any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]

    return {"setup": setup_cpu, "open": cpu("sha256", "open"), "tissue": cpu("tissue"), "read": cpu("read"),
            "normalise": cpu("stain_fit", "normalize"), "detect": cpu("detect", "dedup"), "write": cpu("write")}


ENGINE_ALONE_TILES = 128  # tiles of the run the engine is timed on alone
ENGINE_ALONE_MIN_S = 1.0


def _engine_alone(job: dict[str, Any], detector: Any, workers: int) -> dict[str, Any]:
    """Our engine alone on the run's first tiles (read, normalised and preprocessed as the run does them),
    ``workers`` threads side by side as in the run, repeated for at least ENGINE_ALONE_MIN_S."""
    from gpupath import stain
    from gpupath._resize import resize_batch
    from gpupath.detect.detector import CPU_CHUNK
    from gpupath.slide import open_slide

    if not hasattr(detector, "engine_impl"):
        return {"not_run": f"engine {detector.engine} has no model to time alone"}
    g = job["grid"]
    n = min(ENGINE_ALONE_TILES, len(g["x"]))
    with open_slide(job["slide"], mpp=job["mpp_override"]) as slide:
        raw = slide.read_tiles(list(zip(g["x"][:n], g["y"][:n])), g["level"], g["read_px"]).pixels
    tiles = resize_batch(raw, g["tile_px"])
    tiles = stain.apply_macenko(tiles, stain.fit_macenko(tiles))
    inputs = [detector.preprocessor(tiles[i:i + CPU_CHUNK]) for i in range(0, n, CPU_CHUNK)]  # as the run calls it
    detector.engine_impl(inputs[0])  # warm

    def work(k: int) -> int:
        done = 0
        for i in range(k, len(inputs), workers):
            detector.engine_impl(inputs[i])
            done += len(inputs[i])
        return done

    import concurrent.futures as cf

    tiles_done, t0 = 0, time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        while time.perf_counter() - t0 < ENGINE_ALONE_MIN_S:
            tiles_done += sum(pool.map(work, range(workers)))
    wall = time.perf_counter() - t0
    return {"tiles": n, "tiles_timed": tiles_done, "wall_s": wall, "tiles_per_s": tiles_done / wall,
            "workers": workers, "engine": detector.engine, "precision": getattr(detector, "precision", None)}


def _decode_rates(job: dict[str, Any]) -> dict[str, Any]:
    """Our reader's decode rate per core (the file-tile cache's decoder CPU seconds on one pass over the
    run's tiles) against raw libjpeg-turbo (imagecodecs, one thread) on the same file tiles."""
    from gpupath.slide import open_slide

    g = job["grid"]
    bs = job["params"]["batch_size"]
    with open_slide(job["slide"], mpp=job["mpp_override"]) as slide:
        for i in range(0, len(g["x"]), bs):
            slide.read_tiles(list(zip(g["x"][i:i + bs], g["y"][i:i + bs])), g["level"], g["read_px"])
        stats = slide.tile_cache_stats()
        backend = slide.backend
        level_wh = slide.level_dimensions[g["level"]]
    if stats is None or stats["decode_cpu_s"] <= 0:
        return {"not_run": f"the {backend} reader has no file-tile cache to time"}
    ours = {"backend": backend, "file_tiles": stats["decoded"], "mp": stats["decoded_px"] / 1e6,
            "cpu_s": stats["decode_cpu_s"], "mp_per_s_per_core": stats["decoded_px"] / 1e6 / stats["decode_cpu_s"]}
    raw = _raw_jpeg_rate(job, level_wh)
    if "not_run" in raw:
        return {"ours": ours, **raw}
    return {"ours": ours, "raw": raw, "ratio": ours["mp_per_s_per_core"] / raw["mp_per_s_per_core"]}


def _raw_jpeg_rate(job: dict[str, Any], level_wh: tuple[int, int]) -> dict[str, Any]:
    """imagecodecs' libjpeg-turbo decoding, on one thread, every JPEG file tile under the run's tiles (of the
    tiled TIFF page of ``level_wh`` = the grid level's (width, height) px)."""
    import imagecodecs
    import tifffile

    from gpupath.slide import tiff_pages

    g = job["grid"]
    with tifffile.TiffFile(job["slide"]) as tf:
        page = next((pg for pg in tiff_pages(tf) if (pg.imagewidth, pg.imagelength) == level_wh and pg.is_tiled),
                    None)
        if page is None:
            return {"not_run": f"no tiled TIFF page of {level_wh[0]}x{level_wh[1]} px (level {g['level']})"}
        if int(page.compression) != 7:
            return {"not_run": f"level {g['level']} is not JPEG-tiled (compression {int(page.compression)})"}
        tw, th = int(page.tilewidth), int(page.tilelength)
        across = -(-int(page.imagewidth) // tw)
        ds, read_px = g["downsample"], g["read_px"]
        wanted = set()
        for x0, y0 in zip(g["x"], g["y"]):
            x, y = int(x0 // ds), int(y0 // ds)
            for ty in range(max(y, 0) // th, (y + read_px - 1) // th + 1):
                for tx in range(max(x, 0) // tw, (x + read_px - 1) // tw + 1):
                    if tx < across and ty * across + tx < len(page.dataoffsets):
                        wanted.add(ty * across + tx)
        fh = tf.filehandle
        data = []
        for i in sorted(wanted):
            fh.seek(int(page.dataoffsets[i]))
            data.append(fh.read(int(page.databytecounts[i])))
        colorspace, outcolorspace = tifffile.tifffile.jpeg_decode_colorspace(
            page.photometric, page.planarconfig, page.extrasamples, page.is_jfif)
        tables = page.jpegtables
    cpu = time.thread_time()
    for d in data:
        imagecodecs.jpeg8_decode(d, tables=tables, colorspace=colorspace, outcolorspace=outcolorspace)
    cpu_s = time.thread_time() - cpu
    mp = len(data) * tw * th / 1e6
    return {"decoder": f"imagecodecs {imagecodecs.__version__} jpeg8 (libjpeg-turbo)", "file_tiles": len(data), "mp": mp,
            "cpu_s": cpu_s, "mp_per_s_per_core": mp / cpu_s}


# --------------------------------------------------------------------------- baseline (child)


def _baseline_tissue(slide: Any, g: dict[str, Any], mpp: float, min_tissue: float) -> tuple[np.ndarray, int]:
    """Tissue as labs do it: Otsu on the grey level of a ~8 µm/px thumbnail. Returns the baseline's own
    tile mask (counted, not used: the same tiles are read) and how many of our grid's tiles it keeps."""
    w0, h0 = slide.dimensions
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
    return own_tiles, int(own_tiles[np.asarray(g["row"]), np.asarray(g["col"])].sum())


def _baseline_reader(slide: Any, g: dict[str, Any]) -> Callable[[int], np.ndarray]:
    """Tile i as OpenSlide's read_region gives it, alpha over white glass, resized to tile_px (PIL)."""
    from PIL import Image

    def read(i: int) -> np.ndarray:
        rgba = np.asarray(slide.read_region((g["x"][i], g["y"][i]), g["level"], (g["read_px"], g["read_px"])))
        alpha = rgba[..., 3:4].astype(np.float32) / 255  # outside the slide: transparent -> white glass
        rgb = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        if g["read_px"] != g["tile_px"]:
            rgb = np.asarray(Image.fromarray(rgb).resize((g["tile_px"], g["tile_px"]), Image.BILINEAR))
        return rgb

    return read


def _baseline_normaliser(sample: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """torchstain fitted on the slide's most tissue-rich tiles, its normalize() formula applied per tile."""
    import torchstain

    macenko = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    he_ref, maxc_ref = macenko.HERef.copy(), macenko.maxCRef.copy()   # Macenko's reference: the target
    macenko.fit(sample, Io=IO, alpha=1, beta=0.15)  # the slide's stains
    he_slide, maxc_slide = macenko.HERef, macenko.maxCRef

    def normalise(rgb: np.ndarray) -> np.ndarray:  # torchstain's normalize() with the slide's fit
        od = -np.log((rgb.reshape(-1, 3).astype(float) + 1) / IO)
        conc = np.linalg.lstsq(he_slide, od.T, rcond=None)[0] / (maxc_slide / maxc_ref)[:, None]
        out = IO * np.exp(-he_ref.dot(conc))
        out[out > 255] = 255
        return out.T.reshape(rgb.shape).astype(np.uint8)

    return normalise


def _baseline_detect(session: Any, read: Callable[[int], np.ndarray], normalise: Callable[[np.ndarray], np.ndarray],
                     g: dict[str, Any], model: dict[str, Any], batch_size: int, laps: _Laps) -> np.ndarray:
    """(N, 5) level-0 centre x, y, radius, score, tile index of every heatmap peak, batch by batch."""
    from scipy import ndimage

    mean, std = np.asarray(model["mean"], np.float32), np.asarray(model["std"], np.float32)
    k, stride, thr = model["peak_window_px"], model["stride_px"], model["threshold"]
    l0_per_px = g["read_px"] * g["downsample"] / g["tile_px"]
    xs, ys = np.asarray(g["x"], np.float64), np.asarray(g["y"], np.float64)
    found: list[np.ndarray] = []
    for start in range(0, len(xs), batch_size):
        laps.mark()
        index = range(start, min(start + batch_size, len(xs)))
        tiles = np.stack([read(i) for i in index])
        laps.lap("read")
        tiles = np.stack([normalise(tile) for tile in tiles])
        laps.lap("normalise")
        x = np.ascontiguousarray(((tiles.astype(np.float32) / model["scale"] - mean) / std).transpose(0, 3, 1, 2))
        heat, size, offset = session.run([model["heatmap"], model["size"], model["offset"]], {model["input"]: x})
        peaks = (heat == ndimage.maximum_filter(heat, size=(1, 1, k, k), mode="constant", cval=-1.0)) & (heat >= thr)
        n, _, r, c = np.nonzero(peaks)
        cx = (c + offset[n, 0, r, c]) * stride * l0_per_px + xs[start + n]   # level-0 px
        cy = (r + offset[n, 1, r, c]) * stride * l0_per_px + ys[start + n]
        found.append(np.stack([cx, cy, size[n, 0, r, c] * l0_per_px, heat[n, 0, r, c], start + n], axis=1))
        laps.lap("detect")
    return np.concatenate(found) if found else np.zeros((0, 5))


def _baseline_merge(det: np.ndarray, g: dict[str, Any], dedup_px: float, w0: int, h0: int) -> np.ndarray:
    """One object per nucleus across overlaps: each tile keeps the centres in its core (half the overlap
    trimmed on inner edges; kept too where the neighbour owning them was not read), then greedy NMS,
    best score first, of centres of different tiles closer than ``dedup_px`` (level-0 px)."""
    from scipy.spatial import cKDTree

    det = det[(det[:, 0] >= 0) & (det[:, 0] < w0) & (det[:, 1] >= 0) & (det[:, 1] < h0)]
    stride_l0 = g["stride_lvl_px"] * g["downsample"]
    half = (g["read_px"] - g["stride_lvl_px"]) * g["downsample"] / 2
    tile_col, tile_row = np.asarray(g["col"])[det[:, 4].astype(int)], np.asarray(g["row"])[det[:, 4].astype(int)]
    own_col = np.clip((det[:, 0] - half) // stride_l0, 0, g["n_cols"] - 1).astype(int)
    own_row = np.clip((det[:, 1] - half) // stride_l0, 0, g["n_rows"] - 1).astype(int)
    read_tiles = np.zeros((g["n_rows"], g["n_cols"]), bool)
    read_tiles[np.asarray(g["row"]), np.asarray(g["col"])] = True
    det = det[((own_col == tile_col) & (own_row == tile_row)) | ~read_tiles[own_row, own_col]]
    pairs = cKDTree(det[:, :2]).query_pairs(dedup_px, output_type="ndarray")
    pairs = pairs[det[pairs[:, 0], 4] != det[pairs[:, 1], 4]]   # across tiles only: a model's own peaks stay
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
    return det[np.sort(np.asarray(keep, np.int64))]


def _baseline_write(det: np.ndarray, w0: int, h0: int, out_path: str | Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cx, cy, rad = det[:, 0], det[:, 1], det[:, 2]
    table = pa.table({"x0_px": np.clip(cx - rad, 0, w0).astype(np.float32),
                      "y0_px": np.clip(cy - rad, 0, h0).astype(np.float32),
                      "x1_px": np.clip(cx + rad, 0, w0).astype(np.float32),
                      "y1_px": np.clip(cy + rad, 0, h0).astype(np.float32),
                      "score": det[:, 3].astype(np.float32), "label": np.zeros(len(det), np.int16)})
    pq.write_table(table, str(out_path))


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

    g = tile_grid
    laps = _Laps()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    session = ort.InferenceSession(model["path"], providers=["CPUExecutionProvider"])
    laps.lap("setup")
    slide = openslide.OpenSlide(str(slide_path))
    mpp = mpp or float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    w0, h0 = slide.dimensions
    laps.lap("open")
    own_tiles, both = _baseline_tissue(slide, g, mpp, min_tissue)
    laps.lap("tissue")
    read = _baseline_reader(slide, g)
    normalise = _baseline_normaliser(np.stack([read(i) for i in g["sample"]]))
    laps.lap("normalise")
    found = _baseline_detect(session, read, normalise, g, model, batch_size, laps)
    laps.mark()
    det = _baseline_merge(found, g, model["dedup_distance_um"] / mpp, w0, h0)
    laps.lap("detect")
    _baseline_write(det, w0, h0, out_path)
    laps.lap("write")
    slide.close()
    return {"stages": {s: laps.wall.get(s, 0.0) for s in STAGES}, "end_to_end_s": time.perf_counter() - t_start,
            "cpu_stages": {s: laps.cpu.get(s, 0.0) for s in STAGES}, "end_to_end_cpu_s": time.process_time() - cpu_start,
            "n_tiles": len(g["x"]), "n_detections": len(det), "peak_rss_mib": _peak_rss_mib(), "engine": "onnxruntime",
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
