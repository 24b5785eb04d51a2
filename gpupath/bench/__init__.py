"""gpupath against a hand-written CPU baseline on one slide: per stage and end to end, same run.

:func:`run_bench` plans one tile grid, then runs each side in a child process of its own (its
VmHWM is that side's peak RSS):

* **ours**: :func:`gpupath.pipeline.process_slide` (engine ``onnxruntime`` on the CPU, the best
  engine with ``device="cuda"``); stage seconds (wall and CPU) from ``SlideResult.timings``; then,
  on the CPU, the engine alone on the run's first tiles and our decoder against raw libjpeg-turbo
  on the slide's own file tiles, and which stage bounds the tile loop (:func:`loop_bound`).
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
top of ``_sides.py``, so the TIAToolbox venv (without gpupath) runs that file by path.
"""

from gpupath.bench._core import STAGE_NOTES as STAGE_NOTES
from gpupath.bench._core import loop_bound, match_detections, plan_job, run_bench
from gpupath.bench._report import machine_info, machine_tag, markdown_report, results_stem, text_report, write_results
from gpupath.bench._sides import IO as IO
from gpupath.bench._sides import STAGES, run_baseline, run_ours, run_tiatoolbox
from gpupath.bench._sides import main as main

__all__ = ["STAGES", "run_bench", "run_baseline", "run_ours", "run_tiatoolbox", "plan_job", "match_detections",
           "machine_info", "markdown_report", "text_report", "results_stem", "machine_tag", "write_results", "loop_bound"]
