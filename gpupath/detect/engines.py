"""Inference engines: one call, ``engine(x) -> {output name: array}``, on the input's device.

- ``onnxruntime``: any ONNX model; CPU provider, or the CUDA provider (``onnxruntime-gpu``)
  with I/O binding so CuPy inputs and outputs stay on the device.
- ``torch``: the shipped architecture (:class:`gpupath.detect.net.NucleiNet`) with its ``.npz``
  weights; CPU float32, or CUDA with float16 weights and activations (inputs arrive by DLPack,
  no copy).
- ``tensorrt``: an engine built from the ONNX file (fp16 where the GPU has it) and cached on
  disk (:mod:`gpupath.detect._tensorrt`).
- ``triton``: the model served by a Triton Inference Server, over HTTP
  (:mod:`gpupath.detect._triton`); never picked by ``auto``.

:func:`check_onnx_io` compares a model's declared inputs and outputs with its card before any
engine runs it, so a card that does not fit its model fails with one line naming both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from gpupath._xp import is_device_array
from gpupath.detect.card import ModelCard
from gpupath.detect.decoders import check_outputs
from gpupath.detect.decoders.base import dim_ok
from gpupath.errors import ConfigError

__all__ = ["Engine", "OnnxRuntimeEngine", "TorchEngine", "check_onnx_io", "onnx_io", "ENGINE_NAMES"]

ENGINE_NAMES = ("auto", "tensorrt", "torch", "onnxruntime", "classic", "triton")  # triton: gpupath.detect._triton


class Engine(Protocol):
    name: str
    device: Literal["cpu", "cuda"]

    def __call__(self, x: Any) -> dict[str, Any]: ...


def onnx_io(model_path: Path) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """({input name: shape}, {output name: shape}) as the ONNX file declares them (str/None for dynamic dims)."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  onnxruntime raises its own exception types for bad files
        raise ConfigError(f"{model_path}: not a loadable ONNX model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None
    return ({i.name: tuple(i.shape) for i in sess.get_inputs()}, {o.name: tuple(o.shape) for o in sess.get_outputs()})


def check_onnx_io(card: ModelCard) -> None:
    """Raise ConfigError when the ONNX model's inputs or outputs do not match its card."""
    inputs, outputs = onnx_io(card.model_path)
    where = f"{card.model_path.name} vs card {card.card_path.name if card.card_path else card.name}"
    listing = (f"model inputs {', '.join(f'{k}{list(v)}' for k, v in inputs.items())}; "
               f"outputs {', '.join(f'{k}{list(v)}' for k, v in outputs.items())}")
    spec = card.input
    if spec.name not in inputs:
        raise ConfigError(f"{where}: input {spec.name!r} not in the model ({listing})")
    shape = inputs[spec.name]
    if len(shape) != 4:
        raise ConfigError(f"{where}: input {spec.name!r} has rank {len(shape)}, the card's {spec.layout} needs 4")
    ch_axis = 1 if spec.layout == "NCHW" else 3
    if not dim_ok(shape[ch_axis], 3):
        raise ConfigError(f"{where}: input {spec.name!r} {list(shape)} has {shape[ch_axis]} channels on the "
                          f"{spec.layout} channel axis; the card says 3 ({spec.channels})")
    h_axis, w_axis = (2, 3) if spec.layout == "NCHW" else (1, 2)
    fixed = [shape[a] for a in (h_axis, w_axis)]
    if all(isinstance(v, int) and v > 0 for v in fixed):
        if spec.size_px is None or tuple(fixed) != tuple(spec.size_px):
            raise ConfigError(f"{where}: the model takes fixed {fixed[0]} x {fixed[1]} px inputs; "
                              f"set input.size_px: [{fixed[0]}, {fixed[1]}] in the card (card: {spec.size_px})")
    problem = check_outputs(card.output, outputs, card.classes)
    if problem:
        raise ConfigError(f"{where}: {problem} ({listing})")


class OnnxRuntimeEngine:
    """ONNX Runtime session over a card's model; outputs keyed by name, on the input's device."""

    name = "onnxruntime"

    def __init__(self, card: ModelCard, *, device: Literal["cpu", "cuda"] = "cpu", intra_op_threads: int = 0,
                 model_path: Path | None = None) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu for it)")
            providers = [("CUDAExecutionProvider", {"device_id": _current_device_id()}), "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        # pool threads that spin between operators steal the core of the worker beside them (CPU workers,
        # a reader thread): measured 5.9 -> 5.2 s on a 20k x 20k slide with spinning off
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.device = device
        self.card = card
        self.model_path = model_path or card.model_path  # the file that runs (the card's int8 one, when chosen)
        self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # onnxruntime quietly drops a CUDA provider that fails to load and runs on the CPU,
            # which would copy every batch to the host: refuse instead
            raise ConfigError(f"onnxruntime could not load its CUDA provider (providers: "
                              f"{', '.join(self.session.get_providers())}); see onnxruntime's CUDA requirements")
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: Any) -> dict[str, Any]:
        if self.device == "cpu":
            if is_device_array(x):
                raise TypeError("the CPU onnxruntime engine takes NumPy input")
            return dict(zip(self.output_names, self.session.run(None, {self.card.input.name: x}), strict=True))
        return self._run_bound(x)

    def _run_bound(self, x: Any) -> dict[str, Any]:
        """CUDA provider with I/O binding: the CuPy input is read in place, outputs stay on the device."""
        import cupy

        x = cupy.ascontiguousarray(x)
        binding = self.session.io_binding()
        binding.bind_input(self.card.input.name, "cuda", x.device.id, x.dtype, list(x.shape), x.data.ptr)
        for name in self.output_names:
            binding.bind_output(name, "cuda", x.device.id)
        cupy.cuda.get_current_stream().synchronize()  # onnxruntime runs on its own stream
        self.session.run_with_iobinding(binding)
        result = {}
        for name, value in zip(self.output_names, binding.get_outputs(), strict=True):
            nbytes = int(np.prod(value.shape())) * np.dtype(_ORT_DTYPES[value.data_type()]).itemsize
            mem = cupy.cuda.UnownedMemory(value.data_ptr(), nbytes, value)  # keeps the OrtValue alive
            result[name] = cupy.ndarray(tuple(value.shape()), _ORT_DTYPES[value.data_type()],
                                        cupy.cuda.MemoryPointer(mem, 0)).copy()  # own the memory before binding goes
        cupy.cuda.get_current_stream().synchronize()  # the copies are done before onnxruntime may reuse its memory
        return result


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def _current_device_id() -> int:
    import cupy

    return int(cupy.cuda.Device().id)


class TorchEngine:
    """The shipped architecture in torch: CPU float32, or CUDA with float16 on request."""

    name = "torch"

    def __init__(self, card: ModelCard, *, device: Literal["cpu", "cuda"] = "cpu", fp16: bool = True) -> None:
        if card.weights_path is None or not card.weights_path.is_file():
            raise ConfigError(f"{card.name}: the torch engine runs the shipped architecture from its .npz weights; "
                              "this card has none (use --engine onnxruntime or tensorrt for your ONNX model)")
        try:
            import torch

            from gpupath.detect.net import load_weights
        except ImportError as exc:
            raise ConfigError(f"torch engine: torch is not installed ({exc}); pip install torch") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("torch engine: this torch build has no CUDA device (a CPU wheel?)")
        self.device = device
        self.card = card
        self.fp16 = fp16 and device == "cuda"
        self._torch = torch
        net = load_weights(card.weights_path)
        if device == "cuda":
            net = net.to(f"cuda:{_current_device_id()}")
            if self.fp16:
                net = net.half()
        self.net = net
        self.output_names = tuple(net.output_names)

    def __call__(self, x: Any) -> dict[str, Any]:
        torch = self._torch
        if self.card.input.layout != "NCHW":
            raise ConfigError("torch engine: the shipped architecture takes NCHW input")
        with torch.inference_mode():
            if self.device == "cpu":
                t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
                return {n: o.numpy() for n, o in zip(self.output_names, self.net(t), strict=True)}
            import cupy

            # torch runs on CuPy's current stream, so the work is ordered with the kernels before and after it.
            # CuPy's null stream has ptr 0, and ExternalStream(0) would hand out a fresh stream from torch's
            # pool instead: that one is torch's default (legacy) stream
            cupy_stream = cupy.cuda.get_current_stream()
            stream = (torch.cuda.default_stream() if cupy_stream.ptr == 0
                      else torch.cuda.ExternalStream(cupy_stream.ptr))
            with torch.cuda.stream(stream):
                t = torch.from_dlpack(cupy.ascontiguousarray(x))  # CuPy -> torch, same memory
                t = t.half() if self.fp16 else t.float()
                outs = self.net(t)
                # torch -> CuPy by DLPack; float32 so decoders see one dtype
                return {n: cupy.from_dlpack(o.float().contiguous())
                        for n, o in zip(self.output_names, outs, strict=True)}
