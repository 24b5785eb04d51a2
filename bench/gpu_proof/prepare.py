"""Prepare, on a machine with PyPI, what a GPU session carries to the device machine.

    python bench/gpu_proof/prepare.py [--dry-run]

The device image has torch, CuPy, Numba, numba-cuda, NumPy, SciPy, pyarrow, tifffile, typer,
rich, Pillow, threadpoolctl and onnxruntime, but not cuCIM, nvImageCodec, imagecodecs, OpenSlide,
torchstain or gpupath. Run it in the venv of the README's test command: the versions to carry
are read from it. This downloads their cp312 manylinux
wheels (same versions as this environment), builds gpupath's own wheel, copies the real test
slides, and packs everything into loads of at most 60 MiB under ``.whl/`` (the device tool
carries 64 MiB per call), splitting any wheel that is larger into parts. ``.whl/plan.json``
lists the loads; bench/gpu_proof/README.md gives the device calls.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHL = REPO / ".whl"
LOAD_BYTES = 60 << 20
# distributions the device image lacks, by their names in this environment
CARRY = ["cucim-cu13", "nvidia-nvimgcodec-cu13", "imagecodecs", "openslide-python", "openslide-bin", "torchstain",
         # the learned detector's engines and model input on the device (DALI's wheel is ~200 MB: 4 loads)
         "onnxruntime", "nvidia-dali-cuda130", "pyyaml", "threadpoolctl"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_5_x86_64"]


def download(dest: Path, dry_run: bool) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}=={md.version(name)}" for name in CARRY]
    if dry_run:
        print("would download:", " ".join(specs))
        return []
    plat = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(dest), *specs], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(REPO)], check=True)
    return sorted(dest.glob("*.whl"))


def pack(files: list[Path], data: list[Path], whl: Path = WHL, load_bytes: int = LOAD_BYTES) -> list[list[str]]:
    """Group files into ``whl/load-N`` folders of <= ``load_bytes``, splitting larger files into
    ``.partNN`` pieces (joined in order on the device); returns the file names of each load."""
    pieces: list[tuple[Path, int, int, str]] = []  # (file, offset, size, name in the load)
    for f in [*files, *data]:
        size = f.stat().st_size
        if size <= load_bytes:
            pieces.append((f, 0, size, f.name))
        else:
            for k, off in enumerate(range(0, size, load_bytes)):
                pieces.append((f, off, min(load_bytes, size - off), f"{f.name}.part{k:02d}"))
    loads: list[list[tuple[Path, int, int, str]]] = [[]]
    for piece in pieces:
        if sum(p[2] for p in loads[-1]) + piece[2] > load_bytes:
            loads.append([])
        loads[-1].append(piece)
    names = []
    for i, load in enumerate(loads, 1):
        folder = whl / f"load-{i}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for src, off, size, name in load:
            with open(src, "rb") as fh:
                fh.seek(off)
                (folder / name).write_bytes(fh.read(size))
        names.append([p[3] for p in load])
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--dry-run", action="store_true", help="only list what would be downloaded")
    args = ap.parse_args()
    wheels = download(WHL / "all", args.dry_run)
    if args.dry_run:
        return 0
    data = sorted(p for p in args.data.iterdir() if p.suffix.lower() in (".svs", ".tif", ".tiff", ".ndpi", ".dcm"))
    loads = pack(wheels, data)
    (WHL / "plan.json").write_text(json.dumps({"loads": loads}, indent=2) + "\n")
    for i, names in enumerate(loads, 1):
        size = sum((WHL / f"load-{i}" / n).stat().st_size for n in names) / 2**20
        print(f"load-{i}: {len(names)} files, {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
