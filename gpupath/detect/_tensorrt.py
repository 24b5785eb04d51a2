"""TensorRT engine for ONNX detectors: build once per GPU, cache the plan on disk, run on CuPy arrays.

Takes an ONNX model with one 4-D image input (NCHW or NHWC, dynamic batch axis) and returns a
callable that maps a CuPy batch ``(N, C, H, W)`` or ``(N, H, W, C)`` (model input px, N <= max
batch) to a dict of CuPy output arrays. Everything stays on the GPU: inputs and outputs are bound
by device pointer and the engine runs on CuPy's current stream, with no host copies.

Building a TensorRT engine takes seconds to minutes, so the serialized plan is cached under
:func:`engine_cache_dir`, one file per :class:`EngineKey`: model hash, GPU name, TensorRT
version, input tensor name, max batch, input height and width, and FP16. A plan is loaded only
when its JSON sidecar records exactly that key; any difference (another GPU, TensorRT version,
batch or model), a missing or unreadable sidecar, or a plan that TensorRT cannot deserialize
(truncated, corrupt) makes the engine rebuild from the ONNX file and overwrite the entry.
Both files are written atomically (temporary file, fsync, ``os.replace``), sidecar last.

Device: CUDA only (TensorRT 10.x or 11.x Python API, named I/O tensors and
``execute_async_v3``). TensorRT and CuPy are imported lazily; without them, or without a CUDA
device, :func:`tensorrt_available` says why and :class:`TensorRTEngine` raises ConfigError.

Precision: on TensorRT 10.x, ``fp16=True`` sets ``BuilderFlag.FP16`` (weak typing: TensorRT
may pick FP16 kernels, I/O stays in the ONNX types). TensorRT 11.x removed that flag; networks
are strongly typed, so precision follows the ONNX tensor types and ``fp16`` has no effect there
(convert the model with ModelOpt AutoCast for FP16). The key records the FP16 flag actually
used, so 10.x and 11.x plans never mix.

References: NVIDIA TensorRT Python API (``ICudaEngine``, ``IExecutionContext``, ``Builder``,
``OnnxParser``), and the TensorRT 8.x -> 10.x and 10.x -> 11.x migration guides.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gpupath._xp import cupy_or_none, gpu_available, is_device_array
from gpupath.errors import ConfigError, KernelError

__all__ = ["EngineCache", "EngineKey", "TensorRTEngine", "engine_cache_dir", "tensorrt_available"]

_log = logging.getLogger(__name__)

ENV_CACHE_DIR = "GPUPATH_ENGINE_CACHE"
INSTALL_HINT = "pip install tensorrt-cu13"


def tensorrt_available() -> tuple[bool, str]:
    """Whether a TensorRT engine can be built and run here.

    Returns
    -------
    ok : bool
        True when ``tensorrt`` imports and CuPy sees a CUDA device.
    reason : str
        ``""`` when ``ok``, else one line saying what is missing and how to get it.
    """
    try:
        import tensorrt  # noqa: F401  (optional dependency, imported lazily)
    except ImportError as exc:
        return False, f"tensorrt is not installed ({INSTALL_HINT}): {exc}"
    except OSError as exc:  # the bindings import but libnvinfer is missing or mismatched
        return False, f"tensorrt is installed but its libraries do not load ({INSTALL_HINT}): {exc}"
    if not gpu_available():
        return False, "no CUDA device: TensorRT needs one (CuPy found no usable GPU)"
    return True, ""


@dataclass(frozen=True, slots=True)
class EngineKey:
    """Everything a serialized TensorRT plan depends on; a plan is reused only for an equal key."""

    model_sha256: str     # sha256 hex digest of the ONNX file's bytes
    gpu_name: str         # CUDA device name, e.g. "NVIDIA H100 80GB HBM3"
    trt_version: str      # tensorrt.__version__
    input_name: str       # ONNX input tensor name
    batch: int            # max batch size of the optimization profile (tiles)
    height: int           # model input height, px
    width: int            # model input width, px
    fp16: bool            # BuilderFlag.FP16 set at build time (always False on TensorRT >= 11)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (what the cache sidecar stores)."""
        return asdict(self)

    def digest(self) -> str:
        """First 16 hex chars of the sha256 of the fields' canonical JSON (sorted keys, no spaces)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def engine_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder of cached TensorRT plans.

    Parameters
    ----------
    cache_dir : str or Path, optional
        Used as given when not None.

    Returns
    -------
    Path
        ``cache_dir``, else ``$GPUPATH_ENGINE_CACHE`` when set and non-empty, else
        ``~/.cache/gpupath/engines``. Not created here.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE_DIR, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gpupath" / "engines"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX); best effort: a no-op where directories cannot be
    opened (Windows) or a filesystem refuses fsync on one; the renames are atomic either way."""
    from gpupath.files import fsync_path

    with contextlib.suppress(OSError):
        fsync_path(folder)


class EngineCache:
    """Serialized TensorRT plans on disk, one ``.engine`` file plus a ``.json`` key sidecar per key.

    Parameters
    ----------
    cache_dir : str or Path, optional
        See :func:`engine_cache_dir`. Created on the first :meth:`store`.
    """

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.dir = engine_cache_dir(cache_dir)

    def path_for(self, key: EngineKey) -> Path:
        """``<dir>/<model_sha256[:12]>-<digest>.engine``; its sidecar is the same path with ``.json``."""
        return self.dir / f"{key.model_sha256[:12]}-{key.digest()}.engine"

    @staticmethod
    def sidecar_for(plan_path: Path) -> Path:
        """The JSON sidecar of a plan file."""
        return plan_path.with_suffix(".json")

    def lookup(self, key: EngineKey) -> tuple[bytes | None, str]:
        """The cached plan for ``key`` and, when there is none, why (one line, naming the file)."""
        plan_path = self.path_for(key)
        side = self.sidecar_for(plan_path)
        if not plan_path.is_file():
            return None, f"{plan_path}: no cached engine"
        try:
            recorded = json.loads(side.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, f"{side}: sidecar missing (an interrupted write?)"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, f"{side}: sidecar unreadable ({type(exc).__name__}: {exc})"
        expected = key.to_dict()
        if not isinstance(recorded, dict):
            return None, f"{side}: sidecar holds {type(recorded).__name__}, expected a JSON object"
        if recorded != expected:
            diff = ", ".join(
                f"{name}: cached {recorded.get(name)!r} != wanted {want!r}"
                for name, want in expected.items() if recorded.get(name) != want
            )
            extra = sorted(set(recorded) - set(expected))
            if extra:
                diff = ", ".join(filter(None, [diff, f"unknown fields {extra}"]))
            return None, f"{side}: key mismatch ({diff})"
        try:
            plan = plan_path.read_bytes()
        except OSError as exc:
            return None, f"{plan_path}: unreadable ({exc})"
        if not plan:
            return None, f"{plan_path}: empty file"
        return plan, ""

    def load(self, key: EngineKey) -> bytes | None:
        """The cached plan for ``key``, or None (and a log line saying why) when it must be rebuilt.

        None when the plan file is missing or empty, its sidecar is missing or not valid JSON, or
        the sidecar's recorded key differs from ``key`` in any field. Whether the bytes deserialize
        is checked by :class:`TensorRTEngine`, which rebuilds when they do not.
        """
        plan, why = self.lookup(key)
        if plan is None:  # a first run is routine; a present but unusable entry is worth a warning
            level = logging.WARNING if self.path_for(key).is_file() else logging.INFO
            _log.log(level, "TensorRT engine cache miss, rebuilding: %s", why)
        return plan

    def store(self, key: EngineKey, plan: bytes) -> Path:
        """Write ``plan`` and its key sidecar atomically; returns the plan's path.

        The stale sidecar is removed first and the new one written last, so a reader never pairs
        a half-written or foreign plan with a valid key: an interrupted store is a cache miss.
        """
        data = bytes(plan)
        if not data:
            raise ValueError(f"refusing to cache an empty TensorRT plan for key {key.digest()}")
        self.dir.mkdir(parents=True, exist_ok=True)
        plan_path = self.path_for(key)
        side = self.sidecar_for(plan_path)
        side.unlink(missing_ok=True)
        _atomic_write(plan_path, data)
        sidecar = json.dumps(key.to_dict(), sort_keys=True, indent=2) + "\n"
        _atomic_write(side, sidecar.encode("utf-8"))
        _fsync_dir(self.dir)
        return plan_path


def _profile_shapes(
    shape: tuple[int, ...], *, max_batch: int, input_hw: tuple[int, int], where: str
) -> tuple[Literal["NCHW", "NHWC"], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Layout and (min, opt, max) optimization-profile shapes of a 4-D image input.

    ``shape`` is the network input's shape with -1 for dynamic axes. The channel axis is the fixed
    one of axes 1 and 3 (when both are fixed, the one whose other two axes match ``input_hw``).
    The batch axis spans 1..max_batch when dynamic; fixed spatial axes must equal ``input_hw``.
    """
    h, w = input_hw
    if len(shape) != 4:
        raise ConfigError(f"{where}: input shape {shape} is not 4-D; expected NCHW or NHWC images")
    n, d1, d2, d3 = shape
    if d1 > 0 and d3 < 0:
        layout = "NCHW"
    elif d3 > 0 and d1 < 0:
        layout = "NHWC"
    elif d1 > 0 and d3 > 0:
        if (d2, d3) == (h, w):
            layout = "NCHW"
        elif (d1, d2) == (h, w):
            layout = "NHWC"
        else:
            raise ConfigError(f"{where}: fixed input shape {shape} does not fit input_hw {input_hw} "
                              f"as NCHW or NHWC; expected (N, C, {h}, {w}) or (N, {h}, {w}, C)")
    else:
        raise ConfigError(f"{where}: input shape {shape} has no fixed channel axis (axis 1 or 3); "
                          f"export the model with a static channel count")
    c, (sh, sw) = (d1, (d2, d3)) if layout == "NCHW" else (d3, (d1, d2))
    for axis, dim, want in (("height", sh, h), ("width", sw, w)):
        if dim > 0 and dim != want:
            raise ConfigError(f"{where}: input {axis} is fixed at {dim} px but input_hw asks for {want} px")
    if n > 0 and n != max_batch:
        raise ConfigError(f"{where}: input batch axis is fixed at {n} but max_batch is {max_batch}; "
                          f"export with a dynamic batch axis or pass max_batch={n}")
    lo = n if n > 0 else 1

    def full(batch: int) -> tuple[int, ...]:
        return (batch, c, h, w) if layout == "NCHW" else (batch, h, w, c)

    return layout, full(lo), full(max_batch), full(max_batch)


@functools.cache
def _trt_logger(trt: types.ModuleType) -> Any:
    # TensorRT expects one logger for all builders and runtimes of a process.
    return trt.Logger(trt.Logger.WARNING)


@functools.cache
def _warn_no_fp16_flag(trt_version: str) -> None:
    # once per process: every engine of a run would repeat it
    _log.warning("fp16 requested but TensorRT %s has no BuilderFlag.FP16 (strongly typed networks); precision "
                 "follows the ONNX model's types (convert it with ModelOpt AutoCast for FP16)", trt_version)


def _gpu_name(cp: types.ModuleType, device_id: int) -> str:
    name = cp.cuda.runtime.getDeviceProperties(device_id)["name"]
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


class TensorRTEngine:
    """An ONNX detector compiled by TensorRT for this GPU, cached on disk, called on CuPy batches.

    Parameters
    ----------
    onnx_path : str or Path
        The ONNX model: one 4-D image input (NCHW or NHWC) with a dynamic or ``max_batch`` batch axis.
    model_sha256 : str
        sha256 hex digest of ``onnx_path``'s bytes (e.g. ``ModelCard.model_sha256``): the cache's
        identity of the model. Not recomputed here.
    input_name : str
        Name of the ONNX input tensor.
    output_names : tuple of str
        ONNX outputs that ``__call__`` returns (all outputs are computed).
    max_batch : int
        Largest batch (tiles) a call may pass; the profile is tuned for it (min 1, opt = max).
    input_hw : (int, int)
        Model input (height, width), px. Fixed for the engine.
    fp16 : bool
        Allow FP16 kernels (TensorRT 10.x, when the GPU has fast FP16). No effect on 11.x.
    cache_dir : str or Path, optional
        Plan cache folder, see :func:`engine_cache_dir`.
    workspace_bytes : int
        Builder workspace memory pool limit, bytes.

    Attributes
    ----------
    cache_hit : bool
        True when a cached plan for this key deserialized and is in use.
    rebuilt : bool
        True when this construction compiled the ONNX model (no usable cached plan: missing,
        key mismatch, unreadable sidecar, or a plan that failed to deserialize). Exactly one of
        ``cache_hit`` and ``rebuilt`` is True.
    build_reason : str
        Why the engine was built ("" on a cache hit).
    key : EngineKey
    plan_path : Path
    layout : {"NCHW", "NHWC"}
    sample_shape : tuple of int
        Shape of one input tile: (C, H, W) or (H, W, C).
    input_dtype : numpy.dtype
        What inputs are cast to before the engine runs.

    Raises
    ------
    ConfigError
        TensorRT or a CUDA device is missing (the reason of :func:`tensorrt_available`), the ONNX
        file is missing or does not parse, or its I/O does not match the arguments.
    KernelError
        TensorRT could not build or load the engine, or create an execution context.

    Notes
    -----
    One execution context per engine: calls must not overlap (use one engine per thread or
    stream). The engine is bound to the CUDA device current at construction. It runs on CuPy's
    current stream; on the legacy default stream TensorRT adds synchronizations, so pipelines
    should call it inside ``with cupy.cuda.Stream():``.

    Examples
    --------
    >>> eng = TensorRTEngine("nuclei.onnx", model_sha256=card.model_sha256, input_name="tiles",
    ...                      output_names=("heatmap", "size"), max_batch=32, input_hw=(256, 256))
    ... # doctest: +SKIP
    >>> out = eng(cupy_tiles)  # {"heatmap": cupy.ndarray (N, 1, 64, 64) float32, ...}  # doctest: +SKIP
    """

    name = "tensorrt"
    device = "cuda"

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        model_sha256: str,
        input_name: str,
        output_names: tuple[str, ...],
        max_batch: int,
        input_hw: tuple[int, int],
        fp16: bool = True,
        cache_dir: str | Path | None = None,
        workspace_bytes: int = 1 << 30,
    ) -> None:
        onnx_path = Path(onnx_path)
        output_names = tuple(output_names)
        if not (isinstance(model_sha256, str) and len(model_sha256) == 64
                and all(ch in "0123456789abcdef" for ch in model_sha256)):
            raise ValueError(f"model_sha256 must be 64 lowercase hex chars, got {model_sha256!r}")
        if not input_name or not isinstance(input_name, str):
            raise ValueError(f"input_name must be a non-empty string, got {input_name!r}")
        if not output_names or not all(isinstance(o, str) and o for o in output_names):
            raise ValueError(f"output_names must be non-empty strings, got {output_names!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if len(input_hw) != 2 or not all(isinstance(v, int) and v >= 1 for v in input_hw):
            raise ValueError(f"input_hw must be (height, width) px, two ints >= 1, got {input_hw!r}")
        if not isinstance(workspace_bytes, int) or workspace_bytes < 1:
            raise ValueError(f"workspace_bytes must be an int >= 1, got {workspace_bytes!r}")
        if not onnx_path.is_file():
            raise ConfigError(f"{onnx_path}: ONNX model not found")
        ok, reason = tensorrt_available()
        if not ok:
            raise ConfigError(f"TensorRT engine for {onnx_path}: {reason}")

        import tensorrt as trt  # optional dependency, imported lazily

        cp = cupy_or_none()
        assert cp is not None  # tensorrt_available() checked the device
        self._trt, self._cp = trt, cp
        self.onnx_path = onnx_path
        self.input_name, self.output_names = input_name, output_names
        self.max_batch, self.input_hw = max_batch, (int(input_hw[0]), int(input_hw[1]))
        self._workspace_bytes = workspace_bytes
        self._device_id = cp.cuda.Device().id
        fp16_flag = getattr(trt.BuilderFlag, "FP16", None)  # removed in TensorRT 11 (strong typing)
        if fp16 and fp16_flag is None:
            _warn_no_fp16_flag(str(trt.__version__))
        self.key = EngineKey(model_sha256=model_sha256, gpu_name=_gpu_name(cp, self._device_id),
                             trt_version=str(trt.__version__), input_name=input_name, batch=max_batch,
                             height=self.input_hw[0], width=self.input_hw[1],
                             fp16=bool(fp16 and fp16_flag is not None))
        self.fp16 = self.key.fp16
        self._cache = EngineCache(cache_dir)
        self.plan_path = self._cache.path_for(self.key)
        self._runtime = trt.Runtime(_trt_logger(trt))

        plan, self.build_reason = self._cache.lookup(self.key)
        engine = None
        if plan is not None:
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                self.build_reason = f"{self.plan_path}: cached engine failed to deserialize (stale or corrupt)"
        if engine is None:
            level = logging.WARNING if self.plan_path.is_file() else logging.INFO  # unusable entry vs first run
            _log.log(level, "building TensorRT engine: %s", self.build_reason)
            plan = self._build()
            try:
                self._cache.store(self.key, plan)
            except OSError as exc:  # a read-only or full cache must not stop detection: build again next time
                _log.warning("%s: could not cache the TensorRT engine: %s", self.plan_path, exc)
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise KernelError(f"{onnx_path}: TensorRT {trt.__version__} built an engine it cannot "
                                  f"deserialize; see TensorRT's log above")
        self.cache_hit = not self.build_reason
        self.rebuilt = not self.cache_hit
        self._engine = engine
        self._bind_io()

    # -- build ---------------------------------------------------------------------------------
    def _build(self) -> bytes:
        """Parse the ONNX file, add the batch profile, and return the serialized plan."""
        trt, path = self._trt, self.onnx_path
        logger = _trt_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ConfigError(f"{path}: TensorRT's ONNX parser failed: {errors or 'no error recorded'}")
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        names = [t.name for t in inputs]
        if names != [self.input_name]:
            raise ConfigError(f"{path}: model inputs are {names}; expected exactly one named {self.input_name!r}")
        outputs = {network.get_output(i).name for i in range(network.num_outputs)}
        missing = [o for o in self.output_names if o not in outputs]
        if missing:
            raise ConfigError(f"{path}: no model outputs named {missing}; the model has {sorted(outputs)}")
        shape = tuple(int(d) for d in inputs[0].shape)
        _, lo, opt, hi = _profile_shapes(shape, max_batch=self.max_batch, input_hw=self.input_hw, where=str(path))
        profile = builder.create_optimization_profile()
        profile.set_shape(self.input_name, lo, opt, hi)
        config = builder.create_builder_config()
        config.add_optimization_profile(profile)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self._workspace_bytes)
        if self.key.fp16:
            if getattr(builder, "platform_has_fast_fp16", True):  # property deprecated in 10.x, gone in 11
                config.set_flag(trt.BuilderFlag.FP16)
            else:
                _log.warning("%s: this GPU has no fast FP16; building FP32 kernels", path)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise KernelError(f"{path}: TensorRT {trt.__version__} could not build an engine for input "
                              f"{self.input_name!r} {hi}; see TensorRT's log above")
        return bytes(memoryview(serialized))

    # -- I/O -----------------------------------------------------------------------------------
    def _bind_io(self) -> None:
        """Check the engine's named I/O tensors against the arguments and cache their dtypes."""
        trt, engine, where = self._trt, self._engine, str(self.plan_path)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._all_outputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if inputs != [self.input_name]:
            raise ConfigError(f"{where}: engine inputs are {inputs}; expected exactly one named {self.input_name!r}")
        missing = [o for o in self.output_names if o not in self._all_outputs]
        if missing:
            raise ConfigError(f"{where}: no engine outputs named {missing}; it has {list(self._all_outputs)}")
        self._dtypes: dict[str, np.dtype] = {}
        for n in names:
            try:
                self._dtypes[n] = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            except TypeError as exc:  # bf16 / fp8 / int4 have no NumPy dtype
                raise ConfigError(f"{where}: tensor {n!r} has TensorRT type {engine.get_tensor_dtype(n)} "
                                  f"with no NumPy equivalent") from exc
        self.input_dtype = self._dtypes[self.input_name]
        lo, _, hi = (tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(self.input_name, 0))
        self._min_batch, self.sample_shape = lo[0], hi[1:]
        if len(hi) != 4 or hi[0] != self.max_batch or self.input_hw not in (hi[2:], hi[1:3]):
            raise ConfigError(f"{where}: engine profile max shape {hi} does not match max_batch {self.max_batch} "
                              f"and input_hw {self.input_hw}")
        self.layout: Literal["NCHW", "NHWC"] = "NCHW" if hi[2:] == self.input_hw else "NHWC"
        self._context = engine.create_execution_context()
        if self._context is None:
            raise KernelError(f"{where}: TensorRT could not create an execution context (GPU memory?)")

    def __call__(self, x: Any) -> dict[str, Any]:
        """Run the engine on a batch of model inputs.

        Parameters
        ----------
        x : (N, *sample_shape) CuPy array
            Model input tiles on the engine's GPU, ``N <= max_batch``; cast to :attr:`input_dtype`
            (and made C-contiguous) on the device when needed.

        Returns
        -------
        dict of str to CuPy array
            One array per name in ``output_names``, shapes from the engine (leading axis N);
            float16 outputs are returned as float32. For N == 0, empty arrays of shape
            ``(0, *per-tile shape)``.

        Raises
        ------
        TypeError
            ``x`` is not a device (CuPy) array.
        ValueError
            Wrong shape, batch over ``max_batch``, or ``x`` on another GPU. A batch under a fixed-batch
            engine's size is padded with zero tiles, and only its own outputs are returned.
        KernelError
            TensorRT refused the input shape or the launch failed.
        """
        cp, ctx = self._cp, self._context
        if not is_device_array(x):
            raise TypeError(f"TensorRT input must be a CuPy array on the GPU, got {type(x).__module__}."
                            f"{type(x).__name__}; move it with gpupath._xp.to_device")
        x = cp.asarray(x)  # zero-copy view of any __cuda_array_interface__ array
        if x.ndim != 4 or tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"TensorRT input {self.input_name!r} has shape {tuple(x.shape)}; expected "
                             f"(N, {', '.join(map(str, self.sample_shape))}) ({self.layout})")
        n = int(x.shape[0])
        if n > self.max_batch:
            raise ValueError(f"batch of {n} tiles is outside the engine's range "
                             f"{self._min_batch}..{self.max_batch} (max_batch)")
        run_n = max(n, self._min_batch)  # a fixed-batch model: a slide's last, short batch is padded
        if x.device.id != self._device_id:
            raise ValueError(f"input is on GPU {x.device.id} but the engine was built on GPU {self._device_id}")
        with cp.cuda.Device(self._device_id):
            if not ctx.set_input_shape(self.input_name, (run_n, *self.sample_shape)):
                raise KernelError(f"TensorRT refused input shape {(n, *self.sample_shape)} for {self.input_name!r}")
            shapes = {name: tuple(int(d) for d in ctx.get_tensor_shape(name)) for name in self._all_outputs}
            bad = {name: s for name, s in shapes.items() if any(d < 0 for d in s)}
            if bad:
                raise KernelError(f"{self.plan_path}: outputs with data-dependent shapes are not supported: {bad}")
            if n == 0:  # TensorRT's profile starts at 1: report per-tile shapes without running
                return {name: cp.empty((0, *shapes[name][1:]), dtype=self._out_dtype(name))
                        for name in self.output_names}
            x = cp.ascontiguousarray(x, dtype=self.input_dtype)  # no copy when already right
            if run_n > n:  # zero tiles after the real ones; their outputs are dropped below
                x = cp.concatenate([x, cp.zeros((run_n - n, *self.sample_shape), x.dtype)])
            outs = {name: cp.empty(shapes[name], dtype=self._dtypes[name]) for name in self._all_outputs}
            ctx.set_tensor_address(self.input_name, x.data.ptr)
            for name, arr in outs.items():
                ctx.set_tensor_address(name, arr.data.ptr)
            # CuPy's pool reuses a freed block only for allocations on the stream it was allocated
            # on, so the temporary cast of x may be released before the kernels finish.
            stream = cp.cuda.get_current_stream()
            if not ctx.execute_async_v3(stream.ptr):
                raise KernelError(f"{self.plan_path}: TensorRT execute_async_v3 failed for a batch of {n}")
            return {name: (outs[name].astype(cp.float32) if outs[name].dtype == cp.float16 else outs[name])[:n]
                    for name in self.output_names}

    def _out_dtype(self, name: str) -> np.dtype:
        dt = self._dtypes[name]
        return np.dtype(np.float32) if dt == np.float16 else dt
