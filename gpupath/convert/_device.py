"""Convert's device path: JPEG tiles encoded on the GPU by nvImageCodec, and the cpu / cuda choice.

:class:`DeviceJpeg` turns a CuPy tile row into baseline JPEG (YCbCr 4:2:0) streams on the device;
:func:`pick_device` resolves ``ConvertParams.device`` (``auto``: the CPU without a GPU; with a GPU whose
JPEG encoder fails, the CPU with a note).
"""

from __future__ import annotations

import functools
from typing import Any

from gpupath._xp import array_module, cupy_or_none, gpu_available, gpu_problem
from gpupath.convert._tiles import ConvertParams, tiles_of_row
from gpupath.errors import ConfigError, GpupathError

_NO_NVIMGCODEC = "nvImageCodec is not installed (pip install 'gpupath[gpu]')"


def _jpeg_params(nvimgcodec: Any, quality: int) -> Any:
    """Baseline (not progressive) JPEG, YCbCr 4:2:0: the streams the file's JPEG tags declare."""
    return nvimgcodec.EncodeParams(quality_type=nvimgcodec.QualityType.QUALITY, quality_value=float(quality),
                                   chroma_subsampling=nvimgcodec.ChromaSubsampling.CSS_420,
                                   jpeg_encode_params=nvimgcodec.JpegEncodeParams(progressive=False,
                                                                                  optimized_huffman=False))


class DeviceJpeg:
    """Tile rows on the GPU (CuPy) -> JPEG bytes per tile, encoded on the device by nvImageCodec."""

    def __init__(self, quality: int, tile_px: int) -> None:
        from nvidia import nvimgcodec

        self.nv, self.tile_px = nvimgcodec, tile_px
        self.encoder = nvimgcodec.Encoder()
        self.params = _jpeg_params(nvimgcodec, quality)

    def __call__(self, rows: Any) -> list[bytes]:
        cp = array_module(rows)
        stream = cp.cuda.get_current_stream().ptr
        images = [self.nv.as_image(tile, stream) for tile in tiles_of_row(rows, self.tile_px)]
        streams = self.encoder.encode(images, "jpeg", params=self.params, cuda_stream=stream)
        if any(cs is None for cs in streams):
            raise GpupathError("nvImageCodec could not JPEG-encode a tile on the GPU; convert with --device cpu")
        return [bytes(cs) for cs in streams]  # encoded bytes: device -> host


@functools.cache
def _device_jpeg_problem() -> str:
    """Why the GPU JPEG path is unusable here ('' when a 16 x 16 test tile encodes on the device)."""
    cp = cupy_or_none()
    if cp is None:
        return "no usable CUDA GPU (CuPy found no device)"
    try:
        enc = DeviceJpeg(90, 16)
    except ImportError:
        return _NO_NVIMGCODEC
    except Exception as exc:  # noqa: BLE001  driver / library mismatch: report it, fall back
        return f"nvImageCodec's encoder does not start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    try:
        blob = enc(cp.zeros((16, 16, 3), cp.uint8))[0]
    except Exception as exc:  # noqa: BLE001  as above
        return f"nvImageCodec cannot encode a test tile ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return "" if blob[:2] == b"\xff\xd8" else "nvImageCodec's test tile is not a JPEG stream"


def pick_device(params: ConvertParams) -> tuple[str, str]:
    """(``cpu`` or ``cuda``, note for the result's warnings); ConfigError when ``cuda`` cannot run."""
    if params.device == "cpu":
        return "cpu", ""
    if params.device == "auto":
        if not gpu_available():
            return "cpu", ""  # a machine without a GPU: the CPU is the plan there, not a fallback worth a warning
        problem = _device_jpeg_problem() if params.compression == "jpeg" else ""
        return ("cpu", f"converted on the CPU: {problem}") if problem else ("cuda", "")
    if not gpu_available():
        raise ConfigError(f"device cuda asked for, but CuPy finds no usable CUDA GPU ({gpu_problem()}); "
                          "use --device cpu or auto")
    if params.compression == "jpeg" and (problem := _device_jpeg_problem()):
        raise ConfigError(f"device cuda with JPEG: {problem}; use --device cpu or auto")
    return "cuda", ""
