"""The per-batch chain of a slide (read -> normalise -> detect -> level-0 boxes) and how it is scheduled.

Two schedules, one chain:

* **CPU workers** (``device="cpu"``, an engine that runs side by side: ONNX Runtime, classic):
  ``workers`` threads each run the whole chain on their own batches, with ``threads`` cores each
  for the compiled kernels and the engine (ONNX Runtime's ``intra_op_num_threads``). On a 2-core
  machine that is 2 workers of 1 thread: every core is busy with whichever stage its worker is in,
  so no stage waits for another stage's thread, and nothing spins waiting for work (measured on a
  generated 20k x 20k slide, 1070 tiles: 3.6 s for the loop where one reader thread beside a
  2-thread engine took 4.2 s). Neighbouring batches share the slide's file-tile cache, so each
  file tile is still decoded once. Tried and measured slower on 2 cores (12k x 12k slide, median
  of 5): two pools of 2 threads, one reading ahead and one normalising and detecting (four
  threads time-sliced on two cores), and the stain fit in a thread beside the loop's first reads
  (1.92 vs 1.77 s: the fit slowed by the workers beside it, which then wait for it).
* **Prefetch** (the device, or an engine that is not re-entrant: torch, Triton): one reader thread
  decodes up to ``prefetch_batches`` batches ahead while the calling thread normalises and
  detects (on the GPU, cuCIM's decode overlaps the device's work on the batch before).

Batches come back in grid order whatever the schedule, so results do not depend on it. Stage
times: ``tiles`` is the loop's wall time (``tiles_cpu``: the process's CPU seconds during it);
``read``, ``normalize`` and ``detect`` are the wall seconds each stage took in its thread, summed
over batches (and workers, which run side by side, so these may add up to more than ``tiles``);
with CPU workers, ``read_cpu``, ``normalize_cpu`` and ``detect_cpu`` are the CPU seconds of the
same stages (the worker's thread; its engine calls run in it too). Under prefetch, ``read`` is
the reader thread's wall time.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpupath._resize import resize_batch
from gpupath.detect.boxes import Detections, boxes_to_global
from gpupath.detect.detector import Detector
from gpupath.slide import Slide, TileBatch
from gpupath.tiling import TileGrid
from gpupath_kernels.cpu import set_cpu_threads

__all__ = ["LoopSettings", "cpu_share", "read_grid_tiles", "run_tiles", "REENTRANT_ENGINES"]

REENTRANT_ENGINES = frozenset({"onnxruntime", "classic"})  # engines that CPU workers may call side by side
MAX_CPU_WORKERS = 4


def cpu_share(workers: int = 0, cores: int | None = None) -> tuple[int, int]:
    """(workers, threads each) on the CPU: ``workers`` (0 = one per core, at most 4) and the cores each
    gets (at least 1)."""
    cores = cores or os.cpu_count() or 1
    n = workers if workers > 0 else min(cores, MAX_CPU_WORKERS)
    return n, max(1, cores // n)


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """How a slide's batches are scheduled (none of it changes a result)."""

    device: str = "cpu"
    batch_size: int = 32
    prefetch_batches: int = 2
    read_workers: int = 1           # cuCIM decoder threads of device reads
    cpu_workers: int = 0            # CPU workers (0: one per core, at most 4)


Normaliser = Callable[[Any], Any]


def read_grid_tiles(slide: Slide, grid: TileGrid, index: np.ndarray, *, device: str = "cpu",
                    read_workers: int = 1) -> TileBatch:
    """Tiles ``index`` of the grid as the pipeline reads them: at the grid's level, resized to ``tile_px``
    (NumPy on the CPU, CuPy with ``device == "cuda"``)."""
    locations = list(zip(grid.x[index].tolist(), grid.y[index].tolist()))
    raw = slide.read_tiles(locations, grid.level, grid.read_px, device=device, num_workers=read_workers)  # type: ignore[arg-type]
    return TileBatch(resize_batch(raw.pixels, grid.tile_px), raw.x, raw.y, raw.size_l0_px)


def run_tiles(slide: Slide, grid: TileGrid, detector: Detector, settings: LoopSettings, *,
              normalise: Normaliser | None, basis: np.ndarray, seconds: dict[str, float],
              on_tiles: Callable[[int, int], None] | None = None) -> list[Detections]:
    """Read, normalise and detect every tile of the grid; level-0 detections per batch, in grid order.

    ``normalise`` maps a uint8 tile batch to the normalised one (None: tiles as read); ``basis`` is the
    stain basis handed to the detector; stage seconds are added to ``seconds``; ``on_tiles(done,
    total)`` is called from this thread after each batch.
    """
    start, start_cpu = time.perf_counter(), time.process_time()
    batches = list(grid.batches(settings.batch_size))
    if on_tiles is not None:
        on_tiles(0, len(grid))
    workers, threads = cpu_share(settings.cpu_workers)
    if settings.device == "cpu" and detector.engine in REENTRANT_ENGINES:
        def chain(index: np.ndarray) -> tuple[Detections, dict[str, float]]:
            set_cpu_threads(threads)  # this worker's share of the cores for the compiled kernels
            return _chain(slide, grid, detector, settings, normalise, basis, index)

        results = _ordered(batches, chain, workers, ahead=workers)
    else:
        results = _prefetch_schedule(slide, grid, detector, settings, normalise, basis, batches)
    parts: list[Detections] = []
    done = 0
    with contextlib.closing(results):  # an early exit drops the queued batches now, not at garbage collection
        for index, (found, stage_s) in zip(batches, results):
            for stage, s in stage_s.items():
                seconds[stage] = seconds.get(stage, 0.0) + s
            parts.append(found)
            done += len(index)
            if on_tiles is not None:
                on_tiles(done, len(grid))
    seconds["tiles"] = seconds.get("tiles", 0.0) + time.perf_counter() - start
    seconds["tiles_cpu"] = seconds.get("tiles_cpu", 0.0) + time.process_time() - start_cpu  # every thread's
    return parts


class _Clock:
    """Wall and thread-CPU seconds of consecutive stages in one thread."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def lap(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + wall - self._wall
        self.seconds[f"{stage}_cpu"] = self.seconds.get(f"{stage}_cpu", 0.0) + cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def _chain(slide: Slide, grid: TileGrid, detector: Detector, settings: LoopSettings, normalise: Normaliser | None,
           basis: np.ndarray, index: np.ndarray) -> tuple[Detections, dict[str, float]]:
    """One batch, start to end, in the calling thread."""
    clock = _Clock()
    batch = read_grid_tiles(slide, grid, index, device=settings.device, read_workers=settings.read_workers)
    clock.lap("read")
    found = _normalise_detect(batch, grid, detector, normalise, basis, index, clock)
    return found, clock.seconds


def _normalise_detect(batch: TileBatch, grid: TileGrid, detector: Detector, normalise: Normaliser | None,
                      basis: np.ndarray, index: np.ndarray, clock: _Clock) -> Detections:
    tiles = batch.pixels if normalise is None else normalise(batch.pixels)
    clock.lap("normalize")
    found = detector.detect(tiles, tile_mpp=grid.tile_mpp, stain_matrix_od=basis)
    out = boxes_to_global(found, origin_x=grid.x_lvl[index] * grid.downsample,
                          origin_y=grid.y_lvl[index] * grid.downsample, tile_x=batch.x, tile_y=batch.y,
                          l0_per_px=grid.l0_per_tile_px)
    clock.lap("detect")
    return out


def _ordered(items: list[Any], fn: Callable[[Any], Any], workers: int, *, ahead: int) -> Iterator[Any]:
    """``fn(item)`` for each item on ``workers`` threads, yielded in order, at most ``workers + ahead``
    submitted at once; on an error or early exit the queued ones are dropped, not run."""
    if workers <= 1 and ahead == 0:
        yield from (fn(item) for item in items)
        return
    pool = cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="gpupath-tiles")
    pending: collections.deque[cf.Future] = collections.deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers + ahead:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _current_device_context(device: str) -> Callable[[], Any]:
    """A factory of context managers that make the calling thread's current CUDA device current."""
    if device != "cuda":
        return contextlib.nullcontext
    import cupy

    device_id = cupy.cuda.Device().id
    return lambda: cupy.cuda.Device(device_id)


def _prefetch_schedule(slide: Slide, grid: TileGrid, detector: Detector, settings: LoopSettings,
                       normalise: Normaliser | None, basis: np.ndarray,
                       batches: list[np.ndarray]) -> Iterator[tuple[Detections, dict[str, float]]]:
    """One reader thread ``prefetch_batches`` ahead; normalise and detect in the calling thread."""
    device_ctx = _current_device_context(settings.device)

    def read(index: np.ndarray) -> tuple[TileBatch, Any, float]:
        t0 = time.perf_counter()
        ready = None
        with device_ctx():  # the reader thread decodes onto the caller's GPU (dask-cuda: one GPU per worker)
            tiles = read_grid_tiles(slide, grid, index, device=settings.device, read_workers=settings.read_workers)
            if settings.device == "cuda":
                import cupy

                ready = cupy.cuda.Event(block=False, disable_timing=True)
                ready.record()  # on the reader thread's current stream, after the batch's copies and resize
        return tiles, ready, time.perf_counter() - t0

    ahead = settings.prefetch_batches
    for index, (tiles, ready, read_s) in zip(batches, _ordered(batches, read, 1 if ahead else 0, ahead=ahead)):
        if ready is not None:  # the consumer's stream waits (on the device, not the host) for the reader's work
            import cupy

            cupy.cuda.get_current_stream().wait_event(ready)
        clock = _Clock()
        found = _normalise_detect(tiles, grid, detector, normalise, basis, index, clock)
        stage_s = {k: v for k, v in clock.seconds.items() if not k.endswith("_cpu")}
        stage_s["read"] = read_s
        yield found, stage_s
