"""Prepare, on a machine with PyPI, what a GPU session carries to the device machine.

    python bench/gpu_proof/prepare.py [--dry-run]

The device image has torch, CuPy, Numba, numba-cuda, NumPy, SciPy, pyarrow, tifffile, typer,
rich, Pillow, threadpoolctl and onnxruntime, but not cuCIM, nvImageCodec, imagecodecs, OpenSlide,
torchstain, DALI, Dask (with dask-cuda), Starlette/uvicorn or gpupath. Run it in the venv of the
README's test command: the versions to carry are read from it. This downloads their cp312 manylinux
wheels (same versions as this environment), builds gpupath's own wheel, copies the real test
slides, and packs everything into loads of at most 60 MiB under ``.whl/`` (the device tool
carries 64 MiB per call), splitting any wheel that is larger into parts. ``.whl/plan.json``
lists the loads; bench/gpu_proof/README.md gives the device calls.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
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
         "onnxruntime", "nvidia-dali-cuda130", "pyyaml", "threadpoolctl",
         # what `import nvidia.dali` needs that the image lacks (its other needs: makefun, nvtx, libcst,
         # only its experimental dynamic mode imports them)
         "optree", "gast", "astunparse",
         # nvImageCodec's codec libraries (cuCIM's and convert's device decode/encode): found through the
         # RUNPATH of nvidia/nvimgcodec/extensions (../../cu13/lib, ../../nvjpeg2k/lib, ../../nvtiff/lib,
         # ../../libnvcomp/lib64), i.e. only when installed into the same --target; the image has no wheels
         # of them (libnvjpeg may be in /usr/local/cuda/lib64, nvJPEG2000 and nvTIFF are separate products)
         "nvidia-nvjpeg", "nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13", "nvidia-libnvcomp-cu13",
         # gpupath's batch and serve dependencies the image lacks (their other needs are in the image)
         "partd", "locket", "tblib", "zict", "tornado", "starlette", "uvicorn"]
# carried at these versions rather than this venv's: dask-cuda (gpu extra: one Dask worker per GPU)
# pins dask and distributed through rapids-dask-dependency, so the device gets what `pip install
# gpupath[gpu]` resolves to
DEVICE_PINS = {"dask-cuda": "26.10.0", "rapids-dask-dependency": "26.10.0", "dask": "2026.7.1",
               "distributed": "2026.7.1"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_5_x86_64"]


def download(dest: Path, dry_run: bool, python_version: str = "3.12") -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}=={md.version(name)}" for name in CARRY if name not in DEVICE_PINS]
    specs += [f"{name}=={version}" for name, version in DEVICE_PINS.items()]
    if dry_run:
        print("would download:", " ".join(specs))
        return []
    plat = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *plat, "-d", str(dest), *specs],
                   check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(REPO)], check=True)
    wanted = {_key(*spec.split("==")) for spec in specs} | {_key("gpupath", md.version("gpupath"))}
    for stale in [w for w in dest.glob("*.whl") if _key(*w.name.split("-")[:2]) not in wanted]:
        stale.unlink()  # an earlier version left here: two versions of one package stop the whole install
    return sorted(dest.glob("*.whl"))


def _key(name: str, version: str) -> tuple[str, str]:
    """(normalised distribution name, version), equal for a spec and its wheel's file name."""
    return re.sub(r"[-_.]+", "_", name).lower(), version


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
    # first fit, largest first: fewest loads, so fewest device calls (parts join by name, whatever load they are in)
    loads: list[list[tuple[Path, int, int, str]]] = []
    for piece in sorted(pieces, key=lambda p: -p[2]):
        room = next((load for load in loads if sum(p[2] for p in load) + piece[2] <= load_bytes), None)
        if room is None:
            loads.append(room := [])
        room.append(piece)
    for stale in whl.glob("load-*"):  # loads of an earlier, larger plan
        shutil.rmtree(stale)
    names = []
    for i, load in enumerate(loads, 1):
        folder = whl / f"load-{i}"
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
    ap.add_argument("--whl", type=Path, default=WHL, help="where the loads go (the device calls carry .whl/)")
    ap.add_argument("--python-version", default="3.12",
                    help="the device image's Python (another only to rehearse the install on this machine)")
    args = ap.parse_args()
    whl = args.whl
    wheels = download(whl / "all", args.dry_run, args.python_version)
    if args.dry_run:
        return 0
    data = sorted(p for p in args.data.iterdir() if p.suffix.lower() in (".svs", ".tif", ".tiff", ".ndpi", ".dcm"))
    loads = pack(wheels, data, whl=whl)
    (whl / "plan.json").write_text(json.dumps({"loads": loads}, indent=2) + "\n")
    for i, names in enumerate(loads, 1):
        size = sum((whl / f"load-{i}" / n).stat().st_size for n in names) / 2**20
        print(f"load-{i}: {len(names)} files, {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
