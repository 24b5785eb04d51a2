"""gpupath against the hand-written CPU baseline on the demo slide and a real scan; results under bench/results/.

    python bench/bench_baseline.py [SLIDE ...] [--device cpu|cuda] [--work DIR]
                                   [--results-dir bench/results] [--tiatoolbox-python PY | --no-tiatoolbox]
    python bench/bench_baseline.py --build-tiatoolbox      # the TIAToolbox peer venv, once (~7 GB)

Without slides: the demo slide (8192 px square at 0.25 µm/px, seed 0, the one `gpupath demo`
writes; generated into ``--work`` once) and ``cmu-1-small-region.svs`` from ``$GPUPATH_TEST_DATA``
or ``../shared/data``. Each slide goes through :func:`gpupath.bench.run_bench` (what ``gpupath
bench`` runs): ours and the baseline in separate child processes, per-stage table with ratios,
peak RSS, agreement of detections; the table is printed and written as
``<date>-<cores>c-<cpu>[-<gpu>]-<slide>.json`` and ``.md``. Timings are this machine's only.

TIAToolbox peer: TIAToolbox 2.1.3 pins torch < 2.13 while this project's venv has torch 2.13, so
it gets a venv of its own under ``.cache/peers/`` (git-ignored). ``--build-tiatoolbox`` makes it:
tiatoolbox with ``--no-deps`` plus the modules its tissue masker, patch extractor and stain
normaliser import (pins below; torch/torchvision from PyPI are CUDA builds, ~4.5 GB, because
torchvision's CPU build is not on PyPI). It is used when present unless ``--no-tiatoolbox``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpupath.bench import results_stem, run_bench, text_report, write_results

ROOT = Path(__file__).resolve().parents[1]
TIA_VENV = ROOT / ".cache" / "peers" / "tiatoolbox-2.1.3"
TIA_PINS = [  # what `import tiatoolbox.tools.{stainnorm,patchextraction}, tiatoolbox.wsicore` needs, as installed
    "numpy==2.4.3", "opencv-python-headless==5.0.0.93", "openslide-python==1.4.3", "openslide-bin==4.0.1.1",
    "tifffile==2026.2.24", "imagecodecs==2026.1.14", "scikit-image==0.26.0", "scipy==1.17.0", "pandas==3.1.1",
    "shapely==2.1.2", "zarr==3.1.6", "dask==2026.7.0", "PyYAML==6.0.2", "requests==2.34.2", "matplotlib==3.11.0",
    "defusedxml==0.7.1", "click==8.5.1", "joblib==1.6.0", "tqdm==4.68.4", "pillow==12.1.1", "scikit-learn==1.9.1",
    "numba==0.65.1", "umap-learn==0.5.11", "psutil==7.2.2", "simpleitk==2.5.7", "universal_pathlib==0.3.10",
    "timm==1.0.31", "transformers==5.24.0", "torch==2.14.1", "torchvision==0.29.1",
]
DEMO_PX = 8192


def build_tiatoolbox() -> Path:
    """Make the TIAToolbox venv (PyPI needed); return its python."""
    python = TIA_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TIA_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--no-deps", "tiatoolbox==2.1.3"], check=True)
    subprocess.run([*pip, *TIA_PINS], check=True)
    subprocess.run([str(python), "-c", "import tiatoolbox.tools.stainnorm, tiatoolbox.tools.patchextraction, "
                    "tiatoolbox.wsicore.wsireader"], check=True)
    return python


def default_slides(work: Path) -> list[Path]:
    from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

    demo = work / f"demo-{DEMO_PX}.svs"
    if not demo.exists():
        print(f"writing the demo slide {demo} ...", flush=True)
        write_synthetic_slide(demo, SyntheticSpec(width_px=DEMO_PX, height_px=DEMO_PX, mpp=0.25, seed=0))
    data = Path(os.environ.get("GPUPATH_TEST_DATA", ROOT.parent / "shared" / "data"))
    real = data / "cmu-1-small-region.svs"
    if not real.exists():
        print(f"# {real} missing (set GPUPATH_TEST_DATA): demo slide only", file=sys.stderr)
    return [demo] + ([real] if real.exists() else [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slides", type=Path, nargs="*", help="slides (default: the demo slide and cmu-1-small-region.svs)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where ours runs (the baseline is the CPU)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench", help="demo slide and scratch outputs")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--tiatoolbox-python", help=f"TIAToolbox venv's python (default {TIA_VENV}/bin/python if present)")
    ap.add_argument("--no-tiatoolbox", action="store_true", help="skip the TIAToolbox peer")
    ap.add_argument("--build-tiatoolbox", action="store_true", help="make the TIAToolbox venv, then exit")
    args = ap.parse_args()
    if args.build_tiatoolbox:
        print(f"TIAToolbox venv ready: {build_tiatoolbox()}")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    tia = args.tiatoolbox_python or (str(TIA_VENV / "bin" / "python") if (TIA_VENV / "bin" / "python").exists() else None)
    for slide in args.slides or default_slides(args.work):
        result = run_bench(slide, device=args.device, work=args.work / f"run-{slide.stem}",
                           tiatoolbox_python=None if args.no_tiatoolbox else tia)
        if tia is None and not args.no_tiatoolbox:
            result["tiatoolbox"] = {"not_run": f"no TIAToolbox venv at {TIA_VENV} (make it with --build-tiatoolbox)"}
        print(text_report(result), flush=True)
        path, md = write_results(result, args.results_dir / f"{results_stem(result)}.json")
        print(f"wrote {path} and {md}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
