"""Time each device kernel against its NumPy twin; print pixels/s and, on a GPU, the share of
memory bandwidth reached.

    python bench/bench_kernels.py [--mpx 4] [--repeat 5] [--json out.json]

On a machine without a GPU only the twins run (the kernels need CUDA; the simulator is for
correctness, not speed). Figures are measured in this run only; compare nothing across machines.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

MODULES = ["macenko", "vahadane", "tissue", "nuclei", "boxes"]


def _cases() -> list[Any]:
    cases = []
    for name in MODULES:
        try:
            module = importlib.import_module(f"gpupath_kernels.{name}")
        except ImportError as exc:
            print(f"# skip gpupath_kernels.{name}: {exc}", file=sys.stderr)
            continue
        if hasattr(module, "bench_cases"):
            cases.extend(module.bench_cases())
    return cases


def _time(fn: Any, args: tuple[Any, ...], repeat: int, sync: Any) -> float:
    fn(*args)  # warm-up (kernel compile, caches)
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: fall back to what platform knows
        pass
    return platform.processor() or platform.machine()


def _gpu() -> tuple[Any, str, float] | None:
    """(cupy, device name, peak bandwidth in bytes/s) or None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        # DDR: two transfers per clock; memoryClockRate in kHz, memoryBusWidth in bits
        peak = 2.0 * props["memoryClockRate"] * 1e3 * props["memoryBusWidth"] / 8
        return cupy, props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]), peak
    except Exception:  # noqa: BLE001  no CuPy / driver / device: CPU-only run
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mpx", type=float, default=4.0, help="megapixels of input per case")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="write results here too")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gpu = _gpu()
    host = f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}  host: {host}  "
          f"GPU: {gpu[1] if gpu else 'none (twins only)'}")
    print(f"{'kernel':28s} {'input':24s} {'twin Mpx/s':>11s} {'GPU Mpx/s':>10s} {'GPU/twin':>9s} {'BW frac':>8s}")
    rows = []
    n_px = int(args.mpx * 1e6)
    for case in _cases():
        inputs = case.make_input(rng, n_px)
        shape = "x".join(map(str, np.shape(inputs[0]))) + f" {np.asarray(inputs[0]).dtype}"
        twin_s = _time(case.run_twin, inputs, args.repeat, lambda: None)
        row = {"kernel": case.name, "input": shape, "pixels": n_px, "twin_s": twin_s}
        if gpu:
            cupy = gpu[0]
            dev_inputs = tuple(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in inputs)
            gpu_s = _time(case.run, dev_inputs, args.repeat, cupy.cuda.Device().synchronize)
            row.update(gpu_s=gpu_s, bandwidth_fraction=case.bytes_moved(inputs) / gpu_s / gpu[2])
        rows.append(row)
        gpu_txt = (f"{n_px / row['gpu_s'] / 1e6:10.1f} {twin_s / row['gpu_s']:9.1f} {row['bandwidth_fraction']:8.2f}"
                   if gpu else f"{'-':>10s} {'-':>9s} {'-':>8s}")
        print(f"{case.name:28s} {shape:24s} {n_px / twin_s / 1e6:11.1f} {gpu_txt}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"host": host, "gpu": gpu[1] if gpu else None, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
