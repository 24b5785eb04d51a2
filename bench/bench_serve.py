"""Load test of ``gpupath serve``: concurrent Deep Zoom tile requests on loopback, latency and memory.

Writes a generated slide (``--slide-px`` square, mpp 0.25) into a store, starts ``gpupath serve
STORE`` as a separate process on a free 127.0.0.1 port with a small tile cache (``--cache-mb``),
then ``--clients`` threads, each on one keep-alive ``http.client`` connection, request
``--requests`` tiles in all: random tiles of every DZI level (seeded), a ``--hot`` fraction of
them from a small set of 64 tiles (what viewers re-request), so the cache both hits and evicts.
Prints and writes tiles/s, p50/p90/p99/max latency (ms; the max is the first request, which
opens the slide) and the server's resident memory (VmRSS) after the warm-up quarter and at the end: a flat
RSS shows the cache bound holds.

    python bench/bench_serve.py                                 # 8 clients, 2,000 tiles
    python bench/bench_serve.py --results-dir bench/results     # also <date>-<machine>-serve.json/.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass  # process gone or no /proc: reported as 0
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/slides")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not answer in {timeout_s} s")


def run_load(store: Path, *, clients: int = 8, requests: int = 2000, cache_mb: int = 16, hot: float = 0.5,
             seed: int = 0) -> dict[str, Any]:
    """Start a server on ``store`` (loopback only) and time ``requests`` tile GETs from ``clients`` threads."""
    from gpupath.serve import DziGeometry, load_source

    src = load_source(store)
    [(sid, slide)] = list(src.slides.items())[:1]
    g = DziGeometry(int(slide.width_px), int(slide.height_px))
    tiles = [(lv, c, r) for lv in range(g.max_level + 1)
             for c in range(g.tile_count(lv)[0]) for r in range(g.tile_count(lv)[1])]
    rng = np.random.default_rng(seed)
    hot_set = [tiles[i] for i in rng.choice(len(tiles), size=min(64, len(tiles)), replace=False)]
    plan = [hot_set[rng.integers(len(hot_set))] if rng.random() < hot else tiles[rng.integers(len(tiles))]
            for _ in range(requests)]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gpupath", "serve", str(store), "--host", "127.0.0.1",
                             "--port", str(port), "--cache-mb", str(cache_mb), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_up(port, proc)
        rss_start = _rss_bytes(proc.pid)
        latencies = np.zeros(requests)
        errors: list[str] = []
        next_i = iter(range(requests))
        lock = threading.Lock()
        done = [0]
        rss_warm = [0]

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    break
                lv, c, r = plan[i]
                t0 = time.perf_counter()
                conn.request("GET", f"/dzi/{sid}_files/{lv}/{c}_{r}.jpeg")
                resp = conn.getresponse()
                body = resp.read()
                latencies[i] = time.perf_counter() - t0
                if resp.status != 200 or not body:
                    errors.append(f"{plan[i]}: {resp.status}")
                with lock:
                    done[0] += 1
                    if done[0] == requests // 4:
                        rss_warm[0] = _rss_bytes(proc.pid)
            conn.close()

        rss_peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                rss_peak[0] = max(rss_peak[0], _rss_bytes(proc.pid))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall_s = time.perf_counter() - t0
        stop.set()
        sampler.join()
        rss_end = _rss_bytes(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ms = latencies * 1000
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "device": "cpu", "slide_px": [g.width_px, g.height_px], "dzi_levels": g.max_level + 1,
        "tiles_in_pyramid": len(tiles), "clients": clients, "requests": requests, "hot_fraction": hot,
        "cache_mb": cache_mb, "errors": len(errors), "wall_s": round(wall_s, 3),
        "tiles_per_s": round(requests / wall_s, 1),
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p90": round(float(np.percentile(ms, 90)), 2),
                       "p99": round(float(np.percentile(ms, 99)), 2), "max": round(float(ms.max()), 2)},
        "server_rss_mb": {"start": round(rss_start / 2**20, 1), "after_warmup": round(rss_warm[0] / 2**20, 1),
                          "end": round(rss_end / 2**20, 1), "peak": round(rss_peak[0] / 2**20, 1)},
    }


def make_store(root: Path, slide_px: int, seed: int = 3) -> Path:
    """A store holding one generated ``slide_px`` square slide (mpp 0.25)."""
    from gpupath.ingest import ingest
    from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

    path = root / "bench.svs"
    write_synthetic_slide(path, SyntheticSpec(width_px=slide_px, height_px=slide_px, mpp=0.25, seed=seed))
    ingest([path], root / "store")
    return root / "store"


def markdown(r: dict[str, Any]) -> str:
    lat, rss = r["latency_ms"], r["server_rss_mb"]
    return (f"# gpupath serve load test ({r['date']})\n\n"
            f"machine: {r['machine']['cpus']} CPUs, {r['machine']['processor']}, Python {r['machine']['python']}; "
            f"device {r['device']}; loopback\n\n"
            f"slide {r['slide_px'][0]} x {r['slide_px'][1]} px, {r['dzi_levels']} DZI levels, "
            f"{r['tiles_in_pyramid']} tiles; {r['clients']} clients, {r['requests']} requests "
            f"({r['hot_fraction']:.0%} from 64 hot tiles), cache {r['cache_mb']} MiB\n\n"
            "| tiles/s | p50 ms | p90 ms | p99 ms | max ms | errors | RSS start / warm / end / peak MiB |\n"
            "|---:|---:|---:|---:|---:|---:|---|\n"
            f"| {r['tiles_per_s']} | {lat['p50']} | {lat['p90']} | {lat['p99']} | {lat['max']} | {r['errors']} | "
            f"{rss['start']} / {rss['after_warmup']} / {rss['end']} / {rss['peak']} |\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide-px", type=int, default=16384)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--cache-mb", type=int, default=16)
    ap.add_argument("--hot", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpupath-bench-serve-") as tmp:
        store = make_store(Path(tmp), args.slide_px)
        result = run_load(store, clients=args.clients, requests=args.requests, cache_mb=args.cache_mb, hot=args.hot,
                          seed=args.seed)
    print(markdown(result))
    if args.results_dir:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        cpu = (result["machine"]["processor"] or "cpu").split()[0].lower()
        stem = f"{result['date'][:10]}-{result['machine']['cpus']}c-{cpu}-serve"
        (args.results_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.results_dir / f"{stem}.md").write_text(markdown(result))
        print(f"wrote {args.results_dir / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
