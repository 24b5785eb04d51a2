"""``gpupath bench`` results: the machine they belong to, their file names and their reports.

:func:`machine_info` (CPU, cores, memory, GPU, versions, date, load), :func:`machine_tag` and
:func:`results_stem` (file names under bench/results/), :func:`text_report`,
:func:`markdown_report` and :func:`write_results` (JSON + Markdown beside it).
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any


# --------------------------------------------------------------------------- machine, reports


def machine_info(tiatoolbox_version: str | None = None) -> dict[str, Any]:
    """CPU model, cores, memory, GPU name (or None), versions, UTC date, load average."""
    cpu = platform.processor() or platform.machine()
    mem_gib = None
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
        mem_kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal"))
        mem_gib = round(mem_kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):  # not Linux: keep what platform says
        pass
    gpu = None
    try:
        from gpupath._xp import gpu_available

        if gpu_available():
            import cupy

            name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
            gpu = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001  no CuPy / driver: a CPU machine
        gpu = None
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    versions = {d: version(d) for d in ("gpupath", "numpy", "scipy", "onnxruntime", "openslide-python", "openslide-bin",
                                        "torchstain", "pyarrow", "Pillow", "cucim-cu13", "cupy-cuda13x",
                                        "tensorrt-cu13", "nvidia-dali-cuda130")}
    versions.update(python=platform.python_version(), tiatoolbox=tiatoolbox_version)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gib": mem_gib, "gpu": gpu, "os": platform.platform(),
            "hostname": platform.node(), "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "loadavg_1m": os.getloadavg()[0], "versions": versions,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_"))}}


def _slug(text: str, words: int) -> str:
    keep = [w for w in "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
            if w not in ("r", "tm", "cpu", "processor", "nvidia", "core", "with", "radeon", "graphics")]
    return "-".join(keep[:words]) or "unknown"


def machine_tag(machine: dict[str, Any]) -> str:
    """``<date>-<cores>c-<cpu>[-<gpu>]`` of :func:`machine_info`, e.g. ``2026-11-25-2c-amd-epyc``."""
    gpu = f"-{_slug(machine['gpu'], 2)}" if machine["gpu"] else ""
    return f"{machine['date_utc'][:10]}-{machine['cores']}c-{_slug(machine['cpu'], 2)}{gpu}"


def results_stem(result: dict[str, Any]) -> str:
    """``<date>-<cores>c-<cpu>[-<gpu>]-<slide>``: the name of a run's files under bench/results/."""
    return f"{machine_tag(result['machine'])}-{_slug(Path(result['job']['slide']).stem, 6)}"


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table_lines(result: dict[str, Any]) -> list[list[str]]:
    head = ["stage", "ours s", "baseline s", "speed-up", "ours CPU s", "base CPU s", "ours tiles/s", "base tiles/s",
            "ours MP/s", "base MP/s", "what"]
    lines = [head]
    for r in result["rows"]:
        lines.append([r["stage"].replace("_", " "), _fmt(r["ours_s"], 3), _fmt(r["baseline_s"], 3),
                      _fmt(r["speedup"]) + ("x" if r["speedup"] else ""), _fmt(r.get("ours_cpu_s"), 3),
                      _fmt(r.get("baseline_cpu_s"), 3), _fmt(r["ours_tiles_per_s"], 1),
                      _fmt(r["baseline_tiles_per_s"], 1), _fmt(r["ours_mp_per_s"], 1),
                      _fmt(r["baseline_mp_per_s"], 1), r["note"]])
    return lines


def _summary_lines(result: dict[str, Any]) -> list[str]:
    m, a, rss, job = result["machine"], result["agreement"], result["peak_rss_mib"], result["job"]
    tia = result["tiatoolbox"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
             f"{m['date_utc']}; load average at start {m['loadavg_1m']:.2f}",
             f"slide: {Path(job['slide']).name} ({job['width_px']}x{job['height_px']} px, {job['mpp']:.4g} µm/px, "
             f"{_fmt(job['tissue_mm2'])} mm² tissue); {result['n_tiles']} tiles of {job['grid']['tile_px']} px at "
             f"{job['grid']['tile_mpp']:.4g} µm/px; device {job['params']['device']}, ours engine "
             f"{result['ours']['engine']}",
             f"peak RSS: ours {rss['ours']:.0f} MiB, baseline {rss['baseline']:.0f} MiB (ours/baseline {rss['ratio']:.2f})"
             + (f"; peak device memory (ours) {result['ours']['peak_device_mib']:.0f} MiB"
                if "peak_device_mib" in result["ours"] else ""),
             f"agreement: ours {a['ours']} vs baseline {a['baseline']} detections ({a['count_diff_pct']:.2f} % apart), "
             f"{a['matched']} matched within {a['tol_px']:g} px ({a['matched_of_baseline']:.2%} of the baseline's); "
             f"matched boxes differ by <= {a['box_diff_max_px']:.2f} px (p99 {a['box_diff_p99_px']:.2f}); "
             f"same tiles: {a['same_tiles']}",
             f"baseline's own tissue mask (thumbnail Otsu) keeps {result['baseline']['own_tissue_tiles']} tiles, "
             f"{result['baseline']['own_tissue_tiles_in_our_grid']} of them in ours"]
    lines += _loop_lines(result)
    if "not_run" in tia:
        lines.append(f"TIAToolbox: not run ({tia['not_run']})")
    else:
        st = tia["stages"]
        lines.append(f"TIAToolbox {tia['version']} (peer for tissue, tiling and Macenko, which re-fits every tile; "
                     f"{tia['n_tiles']} tiles): "
                     + ", ".join(f"{s} {v:.3f} s" for s, v in st.items())
                     + f", end to end {tia['end_to_end_s']:.3f} s ({tia['tiles_per_s']['end_to_end']:.1f} tiles/s),"
                       f" peak RSS {tia['peak_rss_mib']:.0f} MiB")
    return lines


def _loop_lines(result: dict[str, Any]) -> list[str]:
    """Which stage bounds our tile loop, the engine alone, and the decoder against raw libjpeg-turbo."""
    ours, b, lines = result["ours"], result.get("bound"), []
    if b and b["by"] == "cpu":
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in b["stage_cpu_s"].items())
        lines.append(f"tile loop: {b['workers']} CPU workers x {b['threads_each']} thread(s), each running every stage "
                     f"on its own batches; {b['loop_wall_s']:.2f} s wall, {b['loop_cpu_s']:.2f} CPU s "
                     f"({b['busy']:.0%} of {b['cores']} cores busy); stage CPU s: {cpu}. Bound by {b['stage']} "
                     f"({b['share']:.0%} of the stages' CPU seconds): no stage waits on another's thread, so the loop "
                     f"lasts about their CPU seconds over the cores, and {b['stage']} holds the most of them")
    elif b:
        lines.append(f"tile loop: one reader thread ahead of the detecting thread; {b['loop_wall_s']:.2f} s wall; "
                     f"bound by {b['stage']} ({b['share']:.0%} of the stages' wall seconds)")
    eng = ours.get("engine_alone")
    if eng and "not_run" not in eng:
        in_run = ours["n_tiles"] / (ours["raw_timings"]["detect"] / eng["workers"])
        lines.append(f"engine alone ({eng['engine']} {eng['precision'] or ''}, {eng['workers']} worker(s) side by side, "
                     f"the run's first {eng['tiles']} tiles normalised and preprocessed): {eng['tiles_per_s']:.1f} tiles/s;"
                     f" the run's detect stage (preprocess + engine + decode + to level 0): {in_run:.1f} tiles/s")
    elif eng:
        lines.append(f"engine alone: not run ({eng['not_run']})")
    dec = ours.get("decode")
    if dec and "ours" in dec:
        o = dec["ours"]
        text = (f"decode: ours ({o['backend']}, file-tile cache, aligned runs of file tiles) {o['file_tiles']} file "
                f"tiles, {o['mp_per_s_per_core']:.1f} MP/s per core")
        if "raw" in dec:
            r = dec["raw"]
            text += (f"; raw {r['decoder']} on the same {r['file_tiles']} file tiles, one thread: "
                     f"{r['mp_per_s_per_core']:.1f} MP/s per core; ours = {dec['ratio']:.0%} of raw")
        else:
            text += f"; raw libjpeg-turbo not run ({dec['not_run']})"
        lines.append(text)
    elif dec:
        lines.append(f"decode: not measured ({dec['not_run']})")
    return lines


def text_report(result: dict[str, Any]) -> str:
    """The per-stage table (fixed-width text) and the summary lines."""
    lines = _table_lines(result)
    widths = [max(len(row[c]) for row in lines) for c in range(len(lines[0]))]
    text = ["  ".join(cell.ljust(w) if c in (0, 10) else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
            for row in lines]
    return "\n".join(text + [""] + _summary_lines(result))


def markdown_report(result: dict[str, Any]) -> str:
    """The same as :func:`text_report` as Markdown (a table and a list)."""
    lines = _table_lines(result)
    md = [f"# gpupath bench: {Path(result['job']['slide']).name}", "",
          "| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    md += ["| " + " | ".join(row) + " |" for row in lines[1:]]
    md += ["", *[f"- {line}" for line in _summary_lines(result)], "",
           "Speed-up = baseline s / ours s. CPU s: the process's CPU seconds in the stage (ours, inside the tile "
           "loop: the CPU seconds of the threads that ran it). MP = tiles x tile px², at the target resolution. "
           "Stages of ours inside the tile loop (read, normalise's apply, detect) run side by side on CPU workers "
           "and are summed over them, so they do not add up to the end-to-end time. Versions: "
           + ", ".join(f"{k} {v}" for k, v in result["machine"]["versions"].items() if v) + ".",
           "Figures from this machine only; compare none with figures from another machine.", ""]
    return "\n".join(md)


def write_results(result: dict[str, Any], json_path: str | Path) -> tuple[Path, Path]:
    """``json_path`` (the result) and the Markdown report beside it (same stem, ``.md``)."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    md = path.with_suffix(".md")
    md.write_text(markdown_report(result))
    return path, md

