#!/usr/bin/env bash
# Runs ON the device machine (see README.md). Two verbs:
#   bash bench/gpu_proof/device.sh load K   # one call per load: stash .whl/load-K; install once all are there
#   bash bench/gpu_proof/device.sh run      # pytest -m gpu, kernel bench, gpupath run cpu vs cuda, bench -> $OUT
set -euo pipefail
STASH=/tmp/gpupath-carry
SITE=/tmp/gpupath-site
case "${1:-}" in
  load)
    mkdir -p "$STASH"
    cp .whl/load-"$2"/* "$STASH"/
    n_loads=$(python3 -c 'import json; print(len(json.load(open(".whl/plan.json"))["loads"]))')
    have=$(ls "$STASH" | wc -l)
    want=$(python3 -c 'import json; print(sum(map(len, json.load(open(".whl/plan.json"))["loads"])))')
    echo "stashed load $2 of $n_loads ($have of $want files)"
    if [ "$have" -ge "$want" ]; then
      # join split wheels, then install everything, no index, no dependencies (the image has them)
      for first in "$STASH"/*.part00; do
        [ -e "$first" ] || continue
        whole="${first%.part00}"; cat "${whole}".part* > "$whole"; rm "${whole}".part*
      done
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$STASH"/*.whl
      mkdir -p .data && cp "$STASH"/*.svs "$STASH"/*.tif* "$STASH"/*.ndpi "$STASH"/*.dcm .data/ 2>/dev/null || true
      echo "installed into $SITE"
      # what could not be rehearsed without a GPU: the device-side libraries load
      PYTHONPATH="$SITE" python3 -c 'import cucim, nvidia.dali, nvidia.nvimgcodec, dask_cuda, cupy; print("imports ok:", cucim.__version__, nvidia.dali.__version__, dask_cuda.__version__, "GPUs:", cupy.cuda.runtime.getDeviceCount())' || true
      ls /usr/local/cuda/lib64/libnvjpeg* 2>/dev/null || echo "no libnvjpeg in /usr/local/cuda/lib64 (the carried nvidia-nvjpeg wheel serves)"
    fi
    ;;
  run)
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPUPATH_TEST_DATA="$PWD/.data"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    python3 bench/gpu_proof/proof.py --out "$OUT" --data "$PWD/.data" ${SIZE:+--size "$SIZE"} ${STEPS:+--steps "$STEPS"} \
      ${NO_REAL:+--no-real} ${DRY_RUN:+--dry-run}  # NO_REAL=1: generated slide only; DRY_RUN=1: rehearse without a GPU
    ;;
  *) echo "usage: device.sh load K | run" >&2; exit 2 ;;
esac
