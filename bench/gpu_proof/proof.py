"""On-device proof: run every GPU path of gpupath and write the figures, with the device name and date.

    python bench/gpu_proof/proof.py --out DIR [--steps tests,kernels,runs,bench] [--size 100000x80000] [--dry-run]
    python bench/gpu_proof/proof.py --merge DIR PART.json...   # one <date>-<gpu>.json/.md from split calls

Steps (each recorded, none stops the others): (1) environment and GPU; (2) ``pytest -m gpu``,
pass/fail/skip per test from its JUnit XML; (3) ``bench/bench_kernels.py`` (kernels vs twins,
memory-bandwidth fraction); (4) ``gpupath run`` on a generated slide and on the real files of the
shared test data, ``--device cpu`` and ``--device cuda`` on the same node, with wall time, tiles/s,
reader, engine and the cuda/cpu ratio; (5) ``gpupath bench --device cuda`` on the same slides: ours
against the hand-written CPU baseline (OpenSlide, torchstain, ONNX Runtime) on the same node. The
GPU paths table says which paths ran (a gpu test of theirs passed or failed) and why the others were
skipped. Writes ``<date>-<gpu>-<steps>.json`` and ``.md`` to ``--out`` after every step;
``--merge`` joins the files of one device into ``<date>-<gpu>.json`` and ``.md``.

``--dry-run`` runs the same steps on a machine without a GPU (CI): small slide, CPU only, so the
script is known to work before a GPU session spends its minutes on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL_FILES = ["cmu-1-small-region.svs", "OS-2-ndpi.ome.tif", "test3-DAPI.ndpi"]


class Budget:
    """Seconds each command may take: ``step_s``, but never past the end of the device call."""

    def __init__(self, call_s: float, step_s: float) -> None:
        self.end = time.monotonic() + call_s
        self.step_s = step_s

    def timeout(self) -> float:
        return min(self.step_s, self.end - time.monotonic())


def _sh(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """(exit code, combined output tail, seconds); never raises for the command's own failure.
    Exit 125 without running when less than 10 s are left (the call's budget is spent)."""
    if timeout < 10:
        return 125, "not run: this call's time budget is spent (split the steps over more calls)", 0.0
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


def gpu_tests(out: Path, budget: Budget) -> dict:
    xml = out / "pytest-gpu.xml"
    code, tail, secs = _sh([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={xml}"], timeout=budget.timeout())
    cases = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            status, why = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    status = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    why = child.get("message") or ""
                    if why == "collection skipped" and child.text:  # a module-level importorskip: reason in the text
                        why = child.text.rsplit("Skipped: ", 1)[-1].rstrip("')\"")
                    why = why.splitlines()[0][:200] if why else ""
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status, "why": why})
    counts = {k: sum(c["status"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"exit_code": code, "seconds": secs, "counts": counts, "cases": cases, "tail": tail[-1500:]}


def kernel_bench(out: Path, mpx: float, budget: Budget) -> dict:
    path = out / "bench-kernels.json"
    code, tail, secs = _sh([sys.executable, "bench/bench_kernels.py", "--mpx", str(mpx), "--json", str(path)],
                           timeout=budget.timeout())
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return {"exit_code": code, "seconds": secs, "rows": rows, "tail": tail[-1500:]}


def slide_runs(work: Path, slides: list[Path], devices: list[str], budget: Budget) -> list[dict]:
    """``gpupath run`` of each slide on each device (outputs under ``work``: only the figures go to --out)."""
    runs = []
    for slide in slides:
        for device in devices:
            dest = work / "runs" / f"{slide.stem}-{device}"
            shutil.rmtree(dest, ignore_errors=True)  # a fresh run, not a resumed one
            code, tail, secs = _sh([sys.executable, "-m", "gpupath", "run", str(slide), "--out", str(dest),
                                    "--device", device], timeout=budget.timeout())
            record = {"slide": slide.name, "device": device, "exit_code": code, "wall_s": secs}
            run_json = dest / "run.json"
            if run_json.exists():
                run = json.loads(run_json.read_text())
                s = run["slides"][0]
                detector = run.get("environment", {}).get("detector", {})
                record.update(status=s["status"], error=s["error"], warning=s.get("warning", ""),
                              backend=s.get("backend", ""), engine=detector.get("engine", ""),
                              notes=detector.get("notes", []), tiles=s["n_tiles"], detections=s["n_detections"],
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


def _openslide_opens(slide: Path) -> bool:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(slide)) is not None
    except Exception:  # noqa: BLE001  no OpenSlide here: let the bench say why in its own words
        return True


def bench_runs(out: Path, work: Path, slides: list[Path], device: str, budget: Budget) -> list[dict]:
    """``gpupath bench SLIDE --device DEVICE``: ours against the hand-written CPU baseline on this node."""
    rows = []
    for slide in slides:
        if not _openslide_opens(slide):
            rows.append({"slide": slide.name, "device": device, "exit_code": None,
                         "not_run": "OpenSlide cannot open it, and the baseline reads with OpenSlide"})
            continue
        path = out / "bench" / f"{slide.stem}.json"
        code, tail, secs = _sh([sys.executable, "-m", "gpupath", "bench", str(slide), "--device", device,
                                "--out", str(path), "--work", str(work / "bench" / slide.stem)], timeout=budget.timeout())
        record: dict = {"slide": slide.name, "device": device, "exit_code": code, "wall_s": secs}
        if path.exists():
            result = json.loads(path.read_text())
            end = next(r for r in result["rows"] if r["stage"] == "end_to_end")
            record.update(tiles=result["n_tiles"], engine=result["ours"].get("engine"),
                          ours_s=end["ours_s"], baseline_s=end["baseline_s"], speedup_vs_baseline=end["speedup"],
                          ours_tiles_per_s=end["ours_tiles_per_s"], baseline_tiles_per_s=end["baseline_tiles_per_s"],
                          stages={r["stage"]: r["speedup"] for r in result["rows"]},
                          peak_device_mib=result["ours"].get("peak_device_mib"),
                          matched_of_baseline=result["agreement"]["matched_of_baseline"])
        else:
            record["tail"] = tail[-800:]
        rows.append(record)
    return rows


# which GPU path each gpu test proves (by test module); a path "ran" when one of its tests passed
PATHS = {"tests/kernels/": "CuPy/Numba kernels (tissue, Macenko, Vahadane, nuclei, boxes)",
         "test_read_tiles": "cuCIM device decode", "test_slide_jpeg": "cuCIM device decode",
         "test_tissue": "tissue mask on the device",
         "test_dali_feed": "DALI GPU preprocessing", "test_decode": "detection decoders on CuPy",
         "test_learned_detector": "learned detector: torch-CUDA / TensorRT engines",
         "test_tensorrt_cache": "TensorRT engine cache", "test_classic": "classic detector on the device",
         "test_pipeline": "whole pipeline on the device", "test_batch": "dask-cuda LocalCUDACluster",
         "test_convert": "convert: CuPy pyramid + nvImageCodec encode", "test_serve": "serve: device tiles",
         "test_triton": "Triton engine", "test_stain": "stain normalisation (Macenko) on CuPy",
         "test_vahadane": "Vahadane on CuPy", "test_preprocess": "model input preprocessing on CuPy"}


def gpu_paths(cases: list[dict]) -> list[dict]:
    """Per GPU path: passed / failed / skipped gpu tests and the first skip reason."""
    paths: dict[str, dict] = {}
    for case in cases:
        name = case["test"].replace(".", "/")
        label = next((v for k, v in PATHS.items() if k in name), "other")
        entry = paths.setdefault(label, {"path": label, "passed": 0, "failed": 0, "skipped": 0, "skip_reason": ""})
        kind = "failed" if case["status"] in ("failed", "error") else case["status"]
        entry[kind] += 1
        if kind == "skipped" and not entry["skip_reason"]:
            entry["skip_reason"] = case.get("why", "")
    for entry in paths.values():
        entry["ran"] = entry["passed"] + entry["failed"] > 0
    return sorted(paths.values(), key=lambda e: e["path"])


def _f(value: object, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def markdown(result: dict) -> str:
    lines = [f"# On-device proof: {result['gpu'] or 'no GPU (dry run)'}, {result['date']}", "",
             f"host: {result['host']}", "", "## GPU paths (from `pytest -m gpu`)", "",
             "| path | ran | passed | failed | skipped | why skipped |", "|---|---|---|---|---|---|"]
    for e in result.get("paths", []):
        lines.append(f"| {e['path']} | {'yes' if e['ran'] else 'no'} | {e['passed']} | {e['failed']} | "
                     f"{e['skipped']} | {e['skip_reason'].replace('|', '/')} |")
    lines += ["", "## pytest -m gpu", "", f"{result['gpu_tests']['counts']} (exit {result['gpu_tests']['exit_code']})", ""]
    lines += [f"- {c['status']}: `{c['test']}`" for c in result["gpu_tests"]["cases"] if c["status"] != "skipped"]
    lines += ["", "## Kernels vs NumPy twins", "", "| kernel | twin Mpx/s | GPU Mpx/s | BW fraction |", "|---|---|---|---|"]
    for row in result["kernels"]["rows"]:
        gpu = f"{row['pixels'] / row['gpu_s'] / 1e6:.1f}" if "gpu_s" in row else "-"
        bw = f"{row['bandwidth_fraction']:.2f}" if "bandwidth_fraction" in row else "-"
        lines.append(f"| {row['kernel']} | {row['pixels'] / row['twin_s'] / 1e6:.1f} | {gpu} | {bw} |")
    lines += ["", "## gpupath run, cpu and cuda on this node", "",
              "| slide | device | status | reader | engine | tiles | tiles/s | slide s | cuda/cpu speed-up |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['slide']} | {r['device']} | {r.get('status', 'exit ' + str(r['exit_code']))} | "
                     f"{r.get('backend', '-')} | {r.get('engine', '-')} | {r.get('tiles', '-')} | "
                     f"{_f(r.get('tiles_per_s'), 1)} | {_f(r.get('slide_s'), 1)} | {_f(r.get('speedup_vs_cpu'))} |")
    lines += ["", "## gpupath bench: ours against the hand-written CPU baseline on this node", "",
              "| slide | ours on | engine | tiles | ours s | baseline s | speed-up | ours tiles/s | "
              "matched of baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("bench", []):
        lines.append(f"| {r['slide']} | {r['device']} | "
                     f"{r.get('engine') or r.get('not_run') or 'exit ' + str(r['exit_code'])} | "
                     f"{r.get('tiles', '-')} | {_f(r.get('ours_s'))} | {_f(r.get('baseline_s'))} | "
                     f"{_f(r.get('speedup_vs_baseline'))} | {_f(r.get('ours_tiles_per_s'), 1)} | "
                     f"{_f(r.get('matched_of_baseline'), 4)} |")
    return "\n".join(lines) + "\n"


def merge(parts: list[Path], out: Path) -> Path:
    """One ``<date>-<gpu>.json`` and ``.md`` from the files of a proof split over several calls
    (files that are not a proof result are ignored; each run and bench row names its call)."""
    loaded = [(p, json.loads(p.read_text())) for p in parts]
    calls = [(p, r) for p, r in loaded if isinstance(r, dict) and "gpu_tests" in r and "date" in r]
    if not calls:
        raise SystemExit(f"{', '.join(map(str, parts))}: no proof result among them")
    results = [r for _, r in calls]
    gpus = {r["gpu"] for r in results}
    if len(gpus) != 1:
        raise SystemExit(f"{', '.join(map(str, parts))}: from different devices ({gpus}); merge one device's files")
    merged = {**results[0], "date": min(r["date"] for r in results), "merged_from": [p.name for p, _ in calls],
              "runs": [{**x, "call": p.stem} for p, r in calls for x in r["runs"]],
              "bench": [{**x, "call": p.stem} for p, r in calls for x in r.get("bench", [])]}
    for key in ("gpu_tests", "paths", "kernels"):
        with_rows = [r[key] for r in results if r.get(key) and (r[key].get("cases") or r[key].get("rows")
                                                                 if isinstance(r[key], dict) else r[key])]
        merged[key] = with_rows[-1] if with_rows else results[0].get(key)
    stem = f"{merged['date'][:10]}-{re.sub(r'[^A-Za-z0-9]+', '-', merged['gpu'] or 'cpu-dry-run').strip('-')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(merged, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(merged))
    return out / f"{stem}.json"


def main() -> int:
    if sys.argv[1:2] == ["--merge"]:  # proof.py --merge OUT_DIR PART.json...
        print(merge([Path(p) for p in sys.argv[3:]], Path(sys.argv[2])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the figures (JSON + Markdown) go here")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpupath-proof",
                    help="the generated slide and the runs' outputs (kept for a later call of the same session)")
    ap.add_argument("--size", default="100000x80000", help="generated slide, WIDTHxHEIGHT level-0 px")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder of real test slides")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: small slide, CPU only (CI)")
    ap.add_argument("--steps", default="tests,kernels,runs,bench",
                    help="comma-separated subset of tests,kernels,runs,bench (split a proof over several calls)")
    ap.add_argument("--step-timeout", type=float, default=480.0, help="seconds for each command at most")
    ap.add_argument("--call-budget", type=float, default=570.0,
                    help="seconds for the whole call (the device tool ends a call after 600 s): a command gets "
                         "what is left, and none starts with less than 10 s")
    ap.add_argument("--no-real", action="store_true",
                    help="the generated slide only (a later call at another --size: the real files ran already)")
    args = ap.parse_args()
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    gpu = gpu_name()
    if gpu is None and not args.dry_run:
        print("no usable GPU (CuPy sees none): run with --dry-run to test the script", file=sys.stderr)
        return 2
    size = "2048x2048" if args.dry_run else args.size
    width, height = (int(v) for v in re.fullmatch(r"(\d+)x(\d+)", size).groups())
    devices = ["cpu"] if gpu is None else ["cpu", "cuda"]
    budget = Budget(args.call_budget, 120 if args.dry_run else args.step_timeout)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": gpu, "dry_run": args.dry_run,
              "host": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
              "gpu_tests": {"counts": {}, "cases": [], "exit_code": None}, "paths": [], "kernels": {"rows": []},
              "runs": [], "bench": []}
    steps = set(args.steps.split(","))
    stem = (f"{result['date'][:10]}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu or 'cpu-dry-run').strip('-')}"
            f"-{'-'.join(s for s in ('tests', 'kernels', 'runs', 'bench') if s in steps)}")

    side = out / stem  # this call's raw files (JUnit XML, kernel and bench JSON): FOLDER/*.json is results only
    side.mkdir(exist_ok=True)

    def save() -> None:  # after every step: a call cut off by its time limit still returns the figures so far
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(result))

    if "tests" in steps:
        result["gpu_tests"] = gpu_tests(side, budget)
        result["paths"] = gpu_paths(result["gpu_tests"]["cases"])
        save()
    if "kernels" in steps:
        result["kernels"] = kernel_bench(side, 0.05 if args.dry_run else 64.0, budget)
        save()
    if steps & {"runs", "bench"}:
        slide = work / f"synthetic-{width}x{height}.svs"
        if not slide.exists():  # kept in --work: a later call (runs, then bench) reuses it
            tmp = slide.with_name(f".tmp-{slide.name}")
            code, tail, secs = _sh([sys.executable, "-m", "gpupath", "synth", str(tmp), "--width", str(width),
                                    "--height", str(height)], timeout=budget.timeout())
            result["synth"] = {"exit_code": code, "seconds": secs, "tail": tail[-800:]}
            if code == 0:
                tmp.rename(slide)
        real = [] if args.no_real else [args.data / name for name in REAL_FILES if (args.data / name).exists()]
        slides = [slide, *real]
        if "runs" in steps:
            for one in slides:
                result["runs"] += slide_runs(work, [one], devices, budget)
                save()
        if "bench" in steps:
            for one in slides:
                result["bench"] += bench_runs(side, work, [one], devices[-1], budget)
                save()
    save()
    print(markdown(result))
    failed = result["gpu_tests"]["counts"].get("failed", 0) + result["gpu_tests"]["counts"].get("error", 0)
    bad_runs = [r for r in result["runs"] + result["bench"] if r["exit_code"] not in (0, 1, None)]
    return 1 if failed or bad_runs else 0


if __name__ == "__main__":
    sys.exit(main())
