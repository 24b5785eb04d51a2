"""Region query through the row-group index vs a full scan, over a generated detections dataset.

Writes N synthetic detections (uniform random centres on S slides of 200k x 200k level-0 px,
boxes of radius 3-10 px, sorted and written exactly as the pipeline writes them:
``results.detections_table`` + ``results.write_slide_parts``), then times, for each row-group size:

- region query: ``gpupath.query.query(out, bbox=...)`` for random square regions (each call reads
  the footers again, as a fresh ``gpupath query`` would), with the row groups and rows it read;
- full scan: ``pyarrow.parquet.read_table(out/detections)`` + the same filter in NumPy.

and checks that both give the same rows. Prints machine, versions and the numbers.

    python bench/bench_query.py                                   # 10M detections, 2 slides
    python bench/bench_query.py --row-group-rows 65536,16384,8192 # compare layouts
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gpupath.detect.boxes import Detections, random_detections
from gpupath.query import BBox, plan_query, query
from gpupath.results import (
    DETECTIONS_ROW_GROUP_ROWS,
    detections_table,
    tiles_table,
    write_slide_parts,
)

SIDE_PX = 200_000
STRIDE_PX = 448   # level-0 distance between tile origins (512-px tiles with 64-px overlap)


def synthetic_detections(n: int, rng: np.random.Generator) -> Detections:
    return random_detections(n, rng, side_px=SIDE_PX, n_labels=2, stride_px=STRIDE_PX)  # nucleus, mitosis


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what platform knows
    return platform.processor() or platform.machine()


def numpy_filter(table: pa.Table, region: BBox) -> np.ndarray:
    c = {k: table.column(k).to_numpy() for k in ("x0_px", "y0_px", "x1_px", "y1_px")}
    keep = (c["x1_px"] > region.x0) & (c["x0_px"] < region.x1) & (c["y1_px"] > region.y0) & (c["y0_px"] < region.y1)
    return np.flatnonzero(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detections", type=int, default=10_000_000, help="total detections (default 10M)")
    ap.add_argument("--slides", type=int, default=2, help="slides they are spread over")
    ap.add_argument("--region-px", type=int, default=2000, help="edge of the square query region, level-0 px")
    ap.add_argument("--queries", type=int, default=20, help="random regions timed")
    ap.add_argument("--row-group-rows", default=str(DETECTIONS_ROW_GROUP_ROWS),
                    help="comma-separated row-group sizes to compare")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.row_group_rows.split(",")]
    work = args.dir or Path(tempfile.mkdtemp(prefix="gpupath-bench-query-"))
    print(f"{dt.date.today()}  {cpu_name()}  ({platform.system()}, host only)  pyarrow {pa.__version__}  "
          f"numpy {np.__version__}")
    print(f"{args.detections:,} detections on {args.slides} slide(s) of {SIDE_PX:,} x {SIDE_PX:,} px; "
          f"regions {args.region_px} x {args.region_px} px, {args.queries} random ones")
    try:
        t0 = time.perf_counter()
        tables = []
        z = np.zeros(0, np.int64)
        tiles = tiles_table(x=z, y=z, size_l0_px=512, col=z, row=z, level=0, tissue_fraction=np.zeros(0),
                            n_detections=z, provenance={})
        for k in range(args.slides):
            det = synthetic_detections(args.detections // args.slides, np.random.default_rng(args.seed + k))
            tables.append(detections_table(det, stride_l0=STRIDE_PX, label_names=["nucleus", "mitosis"],
                                           provenance={}))
        print(f"generated and sorted in {time.perf_counter() - t0:.1f} s")
        rng = np.random.default_rng(args.seed + 100)
        edge = args.region_px
        regions = [BBox(x, y, x + edge, y + edge)
                   for x, y in rng.integers(0, SIDE_PX - edge, (args.queries, 2)).tolist()]
        header = (f"{'rows/group':>10} {'groups':>6} {'MB':>6} | {'groups read mean/max':>20} {'% max':>6} "
                  f"{'rows read':>9} {'hits':>6} | {'region ms':>9} {'full scan ms':>12} {'speed-up':>8}")
        print(header)
        print("-" * len(header))
        for size in sizes:
            out = work / f"rg{size}"
            shutil.rmtree(out, ignore_errors=True)
            for k, table in enumerate(tables):
                write_slide_parts(out, f"{k:064x}", table, tiles, row_group_rows=size)
            mb = sum(p.stat().st_size for p in (out / "detections").rglob("*.parquet")) / 1e6
            query(out, bbox=regions[0])   # warm the page cache, as for the full scan below
            read, rows, hits, times = [], [], [], []
            for region in regions:
                t = time.perf_counter()
                got = query(out, bbox=region)
                times.append(time.perf_counter() - t)
                plan = plan_query(out, bbox=region)
                read.append(plan.row_groups_read)
                rows.append(plan.rows_read)
                hits.append(got.num_rows)
            total = plan.row_groups_total
            scan_times = []
            for region in regions[:3]:
                t = time.perf_counter()
                full = pq.read_table(out / "detections")
                index = numpy_filter(full, region)
                scan_times.append(time.perf_counter() - t)
                want = full.take(index)
                got = query(out, bbox=region)
                assert got.num_rows == want.num_rows and np.array_equal(
                    np.sort(got.column("x0_px").to_numpy()), np.sort(want.column("x0_px").to_numpy())), "mismatch"
                del full, want
            region_ms, scan_ms = statistics.median(times) * 1e3, statistics.median(scan_times) * 1e3
            print(f"{size:>10} {total:>6} {mb:>6.0f} | {statistics.mean(read):>13.1f} / {max(read):<4} "
                  f"{max(read) / total:>6.2%} {statistics.mean(rows):>9.0f} {statistics.mean(hits):>6.0f} | "
                  f"{region_ms:>9.1f} {scan_ms:>12.0f} {scan_ms / region_ms:>7.0f}x")
        print("region ms: median of query() (footers + planning + reading + filtering); full scan: read every "
              "row group of every slide + NumPy filter (median of 3); rows read = rows of the row groups read")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
