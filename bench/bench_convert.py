"""Convert throughput: slide -> pyramidal OME-TIFF, megapixels of level 0 per second.

    python bench/bench_convert.py [--size 16384] [--tile 256] [--compression jpeg] [--repeat 2]
                                  [--slide PATH] [--json out.json]

Source: a generated H&E slide of ``--size`` x ``--size`` px (written once to a temporary folder,
not timed), or ``--slide``. Each row converts the whole slide (read through the pipeline's reader,
encode, full pyramid, write) and reports wall seconds, level-0 MP/s and the output size, best of
``--repeat``. Rows: the CPU path (imagecodecs encoders) and the GPU path (device pyramid,
nvImageCodec JPEG encode), or a GPU row that says why it does not run here. Timings are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpupath.convert import ConvertParams, pick_device, convert_slide
from gpupath.errors import ConfigError


def bench(slide: Path, work: Path, params: ConvertParams, repeat: int) -> dict:
    best = None
    out = work / "bench.ome.tif"
    for _ in range(repeat):
        result = convert_slide(slide, out, params)
        if best is None or result.seconds < best.seconds:
            best = result
    assert best is not None
    w, h = best.level_dimensions[0]
    return {"row": f"convert {best.device}", "slide": str(slide), "width_px": w, "height_px": h, "tile_px": params.tile_px,
            "compression": params.compression, "quality": params.quality, "levels": len(best.level_dimensions),
            "seconds": round(best.seconds, 3), "megapixels_per_s": round(best.megapixels_per_s, 1),
            "output_mb": round(out.stat().st_size / 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384, help="generated slide edge, px")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--compression", default="jpeg", choices=["jpeg", "jpeg2000", "deflate"])
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--slide", type=Path, default=None, help="convert this slide instead of a generated one")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    params = ConvertParams(tile_px=args.tile, compression=args.compression, quality=args.quality, device="cpu")
    try:
        pick_device(dataclasses.replace(params, device="cuda"))
        why_not_gpu = ""
    except ConfigError as exc:
        why_not_gpu = str(exc)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        slide = args.slide
        if slide is None:
            from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

            slide = work / f"gen{args.size}.svs"
            write_synthetic_slide(slide, SyntheticSpec(args.size, args.size, seed=0))
        rows = [bench(slide, work, params, args.repeat)]
        if why_not_gpu:
            rows.append({"row": "convert cuda", "skipped": why_not_gpu})
        else:
            rows.append(bench(slide, work, dataclasses.replace(params, device="cuda"), args.repeat))
    machine = {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0))}
    print(f"machine: {machine}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['row']:<14} skipped: {row['skipped']}")
        else:
            print(f"{row['row']:<14} {row['width_px']}x{row['height_px']} px, tile {row['tile_px']}, "
                  f"{row['compression']} q{row['quality']}, {row['levels']} levels: {row['seconds']:.2f} s, "
                  f"{row['megapixels_per_s']:.1f} MP/s, {row['output_mb']} MB")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
