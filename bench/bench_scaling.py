"""Cost against tissue area: `gpupath run` on generated slides of growing size, time and peak memory.

    python bench/bench_scaling.py --work DIR [--sizes 10000 30000 100000] [--device cpu]
                                  [--results-dir bench/results]

Slides: square generated H&E slides (``gpupath.synthetic``, 0.25 µm/px, 40 % tissue, seed = size),
written once into ``--work`` and reused (the 100k one takes ~4 min to write on a 2-core machine).
Each is run end to end by ``python -m gpupath run SLIDE --out DIR --device D --redo`` in a child
process (the default engine: ONNX Runtime on the CPU); its wall time and peak RSS
(``os.wait4`` rusage of that child) are recorded with the tiles, tissue mm² and detections from
its ``run.json``. The table gives seconds per mm² of tissue and peak RSS per size, and a least-
squares line wall = a + b * tissue_mm2: cost linear in tissue means a near 1 R², memory flat
means peak RSS not growing with the slide. Peak device memory is not measured here (use
``gpupath bench --device cuda``). Results: JSON + Markdown under ``--results-dir`` named
``<date>-<machine>-scaling``, with the machine, versions and date; figures are this machine's only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpupath.bench import machine_info, machine_tag
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide


def slide_for(size_px: int, work: Path) -> tuple[Path, float | None]:
    """The generated slide of ``size_px`` square (written when missing) and the seconds writing took."""
    path = work / f"scale-{size_px}.svs"
    if path.exists():
        return path, None
    t0 = time.perf_counter()
    write_synthetic_slide(path, SyntheticSpec(width_px=size_px, height_px=size_px, mpp=0.25, seed=size_px))
    return path, time.perf_counter() - t0


def run_one(slide: Path, out: Path, device: str) -> dict[str, Any]:
    """`gpupath run` on one slide in a child process: wall s, peak RSS MiB and the slide's run.json row."""
    cmd = [sys.executable, "-m", "gpupath", "run", str(slide), "--out", str(out), "--device", device, "--redo"]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: ru_maxrss in KiB (Linux)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    row = json.loads((out / "run.json").read_text())["slides"][0]
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "slide_s": row["seconds"],
            "n_tiles": row["n_tiles"], "tissue_mm2": row["tissue_mm2"], "n_detections": row["n_detections"],
            "timings": row["timings"], "command": " ".join(cmd[1:])}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Least-squares wall = a + b * tissue_mm2 (s, s/mm²), its R², and peak RSS largest / smallest."""
    area = np.array([r["tissue_mm2"] for r in rows])
    wall = np.array([r["wall_s"] for r in rows])
    rss = np.array([r["peak_rss_mib"] for r in rows])
    fit: dict[str, Any] = {"rss_max_over_min": float(rss.max() / rss.min())}
    if len(rows) >= 2 and np.ptp(area) > 0:
        b, a = np.polyfit(area, wall, 1)
        pred = a + b * area
        ss = float(((wall - wall.mean()) ** 2).sum())
        fit.update({"intercept_s": float(a), "s_per_mm2": float(b),
                    "r2": 1.0 - float(((wall - pred) ** 2).sum()) / ss if ss > 0 else 1.0})
    return fit


def markdown(result: dict[str, Any]) -> str:
    m, fit = result["machine"], result["fit"]
    md = ["# gpupath scaling: generated slides, `gpupath run` end to end", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
          f"{m['date_utc']}; device {result['device']}; load average at start {m['loadavg_1m']:.2f}.", "",
          "| slide px | tissue mm² | tiles | detections | wall s | s per mm² tissue | tiles/s | peak RSS MiB |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        md.append(f"| {r['size_px']:,} | {r['tissue_mm2']:.2f} | {r['n_tiles']:,} | {r['n_detections']:,} | "
                  f"{r['wall_s']:.1f} | {r['wall_s'] / r['tissue_mm2']:.3f} | {r['n_tiles'] / r['wall_s']:.1f} | "
                  f"{r['peak_rss_mib']:.0f} |")
    md.append("")
    if "s_per_mm2" in fit:
        md.append(f"Least squares: wall = {fit['intercept_s']:.2f} s + {fit['s_per_mm2']:.3f} s/mm² x tissue "
                  f"(R² {fit['r2']:.4f}); peak RSS largest / smallest {fit['rss_max_over_min']:.2f}.")
    md += ["", "Wall: the whole `gpupath run` process (start-up, sha256, tissue, tiles, stain, detection, Parquet "
           "and whatever else the run writes). Slides written by `gpupath.synthetic` at 0.25 µm/px, 40 % tissue, "
           "seed = size; tiles 256 px at 0.5 µm/px, 32 px overlap. Versions: "
           + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
           "Figures from this machine only; compare none with figures from another machine.", ""]
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the generated slides (kept) and runs")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000], help="slide edges, px")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--results-dir", type=Path, help="write <date>-<machine>-scaling.json/.md here")
    ap.add_argument("--json", type=Path, help="write the JSON here too (Markdown beside it)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    rows = []
    for size in args.sizes:
        slide, write_s = slide_for(size, args.work)
        row = {"size_px": size, "slide": slide.name, "write_s": write_s,
               **run_one(slide, args.work / f"run-{size}", args.device)}
        rows.append(row)
        print(f"{size:>7} px: {row['tissue_mm2']:8.1f} mm² tissue, {row['n_tiles']:6d} tiles, "
              f"{row['wall_s']:7.1f} s wall ({row['wall_s'] / row['tissue_mm2']:.3f} s/mm²), "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    result = {"format": "gpupath-scaling/1", "machine": machine, "device": args.device, "rows": rows,
              "fit": summarise(rows)}
    print(markdown(result))
    paths = [args.json] if args.json else []
    if args.results_dir:
        paths.append(args.results_dir / f"{machine_tag(machine)}-scaling.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        path.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
