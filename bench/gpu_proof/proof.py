"""On-device proof: run every GPU path of gpupath and write the figures, with the device name and date.

    python bench/gpu_proof/proof.py --out DIR [--size 100000x80000] [--dry-run]

Steps (each recorded, none stops the others): (1) environment and GPU; (2) ``pytest -m gpu``,
pass/fail/skip per test from its JUnit XML; (3) ``bench/bench_kernels.py`` (kernels vs twins,
memory-bandwidth fraction); (4) ``gpupath run`` on a generated slide and on the real files of the
shared test data, ``--device cpu`` and ``--device cuda`` on the same node, with wall time, tiles/s
and the cuda/cpu ratio. Writes ``<date>-<gpu>.json`` and ``.md`` to ``--out``.

``--dry-run`` runs the same steps on a machine without a GPU (CI): small slide, CPU only, so the
script is known to work before a GPU session spends its minutes on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL_FILES = ["cmu-1-small-region.svs", "OS-2-ndpi.ome.tif", "test3-DAPI.ndpi"]


def _sh(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """(exit code, combined output tail, seconds); never raises for the command's own failure."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, **(env or {})})
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, code = f"timed out after {timeout} s: {exc}", 124
    return code, out[-4000:], time.perf_counter() - t0


def gpu_name() -> str | None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001  no CuPy, driver or device: a CPU-only (dry) run
        return None


def gpu_tests(out: Path, timeout: float) -> dict:
    xml = out / "pytest-gpu.xml"
    code, tail, secs = _sh([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={xml}"], timeout=timeout)
    cases = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            status = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    status = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status})
    counts = {k: sum(c["status"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"exit_code": code, "seconds": secs, "counts": counts, "cases": cases, "tail": tail[-1500:]}


def kernel_bench(out: Path, mpx: float, timeout: float) -> dict:
    path = out / "bench-kernels.json"
    code, tail, secs = _sh([sys.executable, "bench/bench_kernels.py", "--mpx", str(mpx), "--json", str(path)],
                           timeout=timeout)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return {"exit_code": code, "seconds": secs, "rows": rows, "tail": tail[-1500:]}


def slide_runs(out: Path, slides: list[Path], devices: list[str], timeout: float) -> list[dict]:
    runs = []
    for slide in slides:
        for device in devices:
            dest = out / "runs" / f"{slide.stem}-{device}"
            code, tail, secs = _sh([sys.executable, "-m", "gpupath", "run", str(slide), "--out", str(dest),
                                    "--device", device], timeout=timeout)
            record = {"slide": slide.name, "device": device, "exit_code": code, "wall_s": secs}
            run_json = dest / "run.json"
            if run_json.exists():
                s = json.loads(run_json.read_text())["slides"][0]
                record.update(status=s["status"], error=s["error"], tiles=s["n_tiles"], detections=s["n_detections"],
                              slide_s=s["seconds"], tiles_per_s=s["n_tiles"] / max(s["seconds"], 1e-9),
                              stages=s["timings"])
            else:
                record["tail"] = tail[-800:]
            runs.append(record)
    by = {(r["slide"], r["device"]): r for r in runs}
    for r in runs:
        cpu = by.get((r["slide"], "cpu"))
        if r["device"] == "cuda" and cpu and cpu.get("slide_s") and r.get("slide_s"):
            r["speedup_vs_cpu"] = cpu["slide_s"] / r["slide_s"]
    return runs


def markdown(result: dict) -> str:
    lines = [f"# On-device proof: {result['gpu'] or 'no GPU (dry run)'}, {result['date']}", "",
             f"host: {result['host']}", "", "## pytest -m gpu", "",
             f"{result['gpu_tests']['counts']} (exit {result['gpu_tests']['exit_code']})", ""]
    lines += [f"- {c['status']}: `{c['test']}`" for c in result["gpu_tests"]["cases"] if c["status"] != "skipped"]
    lines += ["", "## Kernels vs NumPy twins", "", "| kernel | twin Mpx/s | GPU Mpx/s | BW fraction |", "|---|---|---|---|"]
    for row in result["kernels"]["rows"]:
        gpu = f"{row['pixels'] / row['gpu_s'] / 1e6:.1f}" if "gpu_s" in row else "-"
        bw = f"{row['bandwidth_fraction']:.2f}" if "bandwidth_fraction" in row else "-"
        lines.append(f"| {row['kernel']} | {row['pixels'] / row['twin_s'] / 1e6:.1f} | {gpu} | {bw} |")
    lines += ["", "## gpupath run", "", "| slide | device | status | tiles | tiles/s | slide s | cuda/cpu speedup |",
              "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['slide']} | {r['device']} | {r.get('status', 'exit ' + str(r['exit_code']))} | "
                     f"{r.get('tiles', '-')} | {r.get('tiles_per_s', 0):.1f} | {r.get('slide_s', 0):.1f} | "
                     f"{r.get('speedup_vs_cpu', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", default="100000x80000", help="generated slide, WIDTHxHEIGHT level-0 px")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder of real test slides")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: small slide, CPU only (CI)")
    ap.add_argument("--steps", default="tests,kernels,runs",
                    help="comma-separated subset of tests,kernels,runs (split a proof over several calls)")
    ap.add_argument("--step-timeout", type=float, default=480.0,
                    help="seconds for each step (the device tool ends a call after 600 s)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_name()
    if gpu is None and not args.dry_run:
        print("no usable GPU (CuPy sees none): run with --dry-run to test the script", file=sys.stderr)
        return 2
    size = "2048x2048" if args.dry_run else args.size
    width, height = (int(v) for v in re.fullmatch(r"(\d+)x(\d+)", size).groups())
    devices = ["cpu"] if gpu is None else ["cpu", "cuda"]
    timeout = 120 if args.dry_run else args.step_timeout
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": gpu, "dry_run": args.dry_run,
              "host": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
              "gpu_tests": {"counts": {}, "cases": [], "exit_code": None}, "kernels": {"rows": []}, "runs": []}
    stem = f"{result['date'][:10]}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu or 'cpu-dry-run').strip('-')}"

    def save() -> None:  # after every step: a call cut off by its time limit still returns the figures so far
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(result))

    steps = set(args.steps.split(","))
    if "tests" in steps:
        result["gpu_tests"] = gpu_tests(out, timeout)
        save()
    if "kernels" in steps:
        result["kernels"] = kernel_bench(out, 0.05 if args.dry_run else 64.0, timeout)
        save()
    if "runs" not in steps:
        return 0
    slide = out / f"synthetic-{width}x{height}.svs"
    code, tail, secs = _sh([sys.executable, "-m", "gpupath", "synth", str(slide), "--width", str(width),
                            "--height", str(height)], timeout=timeout)
    result["synth"] = {"exit_code": code, "seconds": secs, "tail": tail[-800:]}
    slides = [slide] + [args.data / name for name in REAL_FILES if (args.data / name).exists()]
    for one in slides:
        result["runs"] += slide_runs(out, [one], devices, timeout)
        save()
    print(markdown(result))
    slide.unlink(missing_ok=True)  # gigabytes at full size: the figures are what we keep
    failed = result["gpu_tests"]["counts"].get("failed", 0) + result["gpu_tests"]["counts"].get("error", 0)
    return 1 if failed or any(r["exit_code"] not in (0, 1) for r in result["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
