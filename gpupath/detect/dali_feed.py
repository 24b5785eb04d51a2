"""Model-input preprocessing as an NVIDIA DALI pipeline (the twin of :func:`~gpupath.detect.preprocess.preprocess`).

:class:`DaliPreprocessor` turns a batch of tiles ``(N, H, W, 3)`` uint8 RGB into the model input
of an :class:`~gpupath.detect.card.InputSpec` with the same steps, shape, layout and dtype as
:func:`gpupath.detect.preprocess.preprocess`: ``fn.external_source`` -> ``fn.resize`` (antialiased
linear, only when ``size_px`` differs from the tile size) -> ``fn.color_space_conversion`` (BGR
models only) -> ``fn.crop_mirror_normalize`` (normalise, HWC -> CHW, cast).

Devices
-------
``device="cpu"`` runs DALI's CPU operators (no GPU needed): NumPy tiles in, NumPy array out.
``device="cuda"`` runs DALI's GPU operators: CuPy tiles go CuPy -> DALI (``no_copy``: DALI reads
the CuPy buffer itself) -> DLPack -> CuPy, with no host copy anywhere.

Tolerance against the reference: without resize, float32 agrees to about 1e-7 relative (DALI
multiplies by 1 / std in pixel units); float16 to one fp16 rounding step. With resize, DALI's
filter equals :func:`gpupath._resize.resize_batch` inside the tile to +-1 grey level (rounding);
the outermost one or two rows and columns differ more (DALI clamps at the tile edge, the
reference renormalises its weights), up to ~15 grey levels on pixel noise and a few on tissue.

DALI is imported lazily: importing this module works without it, and :func:`dali_available`
says whether it can be used.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from gpupath._xp import cupy_or_none, is_device_array
from gpupath.detect.card import InputSpec
from gpupath.detect.preprocess import check_tiles, output_shape
from gpupath.errors import ConfigError

__all__ = ["DaliPreprocessor", "dali_available"]

_INPUT = "tiles"   # name of the external_source that is fed each batch


def dali_available() -> tuple[bool, str]:
    """Whether NVIDIA DALI imports, and if not, why (one line).

    Returns
    -------
    (ok, reason) : ``(True, "")`` when ``nvidia.dali`` imports, else ``(False, reason)``.
    """
    try:
        import nvidia.dali  # noqa: F401  (optional dependency: only whether it imports)
    except ImportError as exc:
        return False, f"NVIDIA DALI is not installed ({exc}); install nvidia-dali-cuda130 (or the build for your CUDA)"
    except Exception as exc:  # noqa: BLE001  a broken install (missing libcudart, ...) reads the same to callers
        return False, f"NVIDIA DALI failed to import: {type(exc).__name__}: {exc}".replace("\n", " ")
    return True, ""


class DaliPreprocessor:
    """Preprocess tile batches for a model with a DALI pipeline.

    Parameters
    ----------
    spec : the model input (size, channel order, normalisation, layout, dtype).
    batch_size : largest number of tiles one call takes; smaller batches (e.g. the last one of a
        slide) are fine.
    device : ``cpu`` (NumPy in and out) or ``cuda`` (CuPy in and out, no host copy).
    device_id : CUDA device of the ``cuda`` pipeline (the tiles must live there).
    num_threads : DALI CPU worker threads.

    Raises
    ------
    ConfigError
        DALI is not installed, or ``device="cuda"`` without a usable CUDA device.
    TypeError, ValueError
        Arguments of the wrong type or out of range.

    Notes
    -----
    One pipeline is built on first use per resize need (tiles already at ``size_px`` skip the
    resize, as the reference does) and reused for every later call. Instances are not
    thread-safe: give each thread its own.

    Examples
    --------
    >>> pre = DaliPreprocessor(InputSpec(name="tiles"), batch_size=64)
    >>> pre(np.zeros((3, 256, 256, 3), np.uint8)).shape
    (3, 3, 256, 256)
    """

    __slots__ = ("_pipes", "batch_size", "device", "device_id", "num_threads", "spec")

    def __init__(self, spec: InputSpec, *, batch_size: int, device: Literal["cpu", "cuda"] = "cpu",
                 device_id: int = 0, num_threads: int = 2) -> None:
        if not isinstance(spec, InputSpec):
            raise TypeError(f"spec must be an InputSpec, got {type(spec).__name__}")
        for key, value in (("batch_size", batch_size), ("num_threads", num_threads)):
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        if not isinstance(device_id, int | np.integer) or device_id < 0:
            raise ValueError(f"device_id must be an int >= 0, got {device_id!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        ok, reason = dali_available()
        if not ok:
            raise ConfigError(f"DaliPreprocessor needs NVIDIA DALI: {reason}")
        if device == "cuda" and cupy_or_none() is None:
            raise ConfigError("DaliPreprocessor(device='cuda') needs CuPy and a CUDA device; none is usable "
                              "(use device='cpu')")
        self.spec, self.batch_size, self.device = spec, int(batch_size), device
        self.device_id, self.num_threads = int(device_id), int(num_threads)
        self._pipes: dict[bool, Any] = {}   # resize or not -> built DALI Pipeline

    def __repr__(self) -> str:
        return (f"DaliPreprocessor({self.spec.name!r}, batch_size={self.batch_size}, device={self.device!r}, "
                f"device_id={self.device_id})")

    def _pipeline(self, resize: bool) -> Any:
        """The built pipeline for this spec, batch size and device, with or without the resize."""
        if resize in self._pipes:
            return self._pipes[resize]
        from nvidia.dali import fn, types  # optional dependency: imported on first use
        from nvidia.dali.pipeline import Pipeline

        spec, on_gpu = self.spec, self.device == "cuda"
        # prefetch_queue_depth=1: run() computes exactly the batch just fed (feed, run, read back).
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=self.device_id if on_gpu else None, prefetch_queue_depth=1)
        with pipe:
            # no_copy: DALI reads the caller's buffer, which __call__ keeps alive until run() returns
            x = fn.external_source(name=_INPUT, device="gpu" if on_gpu else "cpu", layout="HWC",
                                   dtype=types.UINT8, no_copy=True)
            if resize:
                # linear + antialias = triangle filter widened by the downscale factor, as resize_batch
                x = fn.resize(x, size=list(spec.size_px), interp_type=types.INTERP_LINEAR, antialias=True,
                              dtype=types.UINT8)
            if spec.channels == "BGR":
                x = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.BGR)
            # (p / scale - mean) / std == (p - mean * scale) / (std * scale): mean, std in pixel units
            x = fn.crop_mirror_normalize(
                x, mean=[m * spec.scale for m in spec.mean], std=[s * spec.scale for s in spec.std],
                output_layout="CHW" if spec.layout == "NCHW" else "HWC",
                dtype=types.FLOAT16 if spec.dtype == "float16" else types.FLOAT)
            pipe.set_outputs(x)
        pipe.build()
        self._pipes[resize] = pipe
        return pipe

    def __call__(self, tiles: Any) -> Any:
        """Preprocess one batch.

        Parameters
        ----------
        tiles : (N, H, W, 3) uint8 RGB, ``N <= batch_size``; NumPy for ``device="cpu"``, CuPy (on
            ``device_id``) for ``"cuda"``.

        Returns
        -------
        Same shape, layout and dtype as :func:`gpupath.detect.preprocess.preprocess`: (N, 3, h, w)
        or (N, h, w, 3), C-contiguous; NumPy on cpu, CuPy on cuda (a zero-copy DLPack view of
        DALI's output buffer, which stays valid after later calls).

        Raises
        ------
        TypeError
            Tiles not uint8, or on the wrong device for this preprocessor.
        ValueError
            Tiles not (N, H, W, 3), more than ``batch_size`` tiles, or (any-size models) H, W not
            multiples of ``spec.multiple_of``.
        """
        on_gpu = self.device == "cuda"
        if is_device_array(tiles) != on_gpu:
            where = "CuPy (device) arrays" if on_gpu else "NumPy (host) arrays"
            raise TypeError(f"DaliPreprocessor(device={self.device!r}) takes {where}, got {type(tiles).__name__}; "
                            f"move the tiles explicitly (gpupath._xp.to_host / to_device)")
        tiles = check_tiles(tiles, self.spec)
        n, h, w, _ = tiles.shape
        if n > self.batch_size:
            raise ValueError(f"batch of {n} tiles exceeds batch_size={self.batch_size} of this DaliPreprocessor")
        xp = cupy_or_none() if on_gpu else np
        if on_gpu and tiles.device.id != self.device_id:
            raise ValueError(f"tiles are on CUDA device {tiles.device.id}, this pipeline runs on {self.device_id}")
        if n == 0:  # DALI cannot return an empty batch as one tensor
            return xp.empty(output_shape(self.spec, 0, (h, w)), dtype=self.spec.dtype)
        tiles = xp.ascontiguousarray(tiles)   # DALI takes densely packed samples only
        resize = self.spec.size_px is not None and tuple(self.spec.size_px) != (h, w)
        pipe = self._pipeline(resize)
        pipe.feed_input(_INPUT, tiles)        # CuPy input: DALI orders on CuPy's current stream
        (out,) = pipe.run()
        tensor = out.as_tensor()              # the dense (N, ...) batch, no copy
        if on_gpu:
            return xp.from_dlpack(tensor)     # TensorGPU.__dlpack__: zero-copy, synchronised with CuPy's stream
        return np.asarray(tensor)             # __array_interface__ view; keeps DALI's buffer alive
