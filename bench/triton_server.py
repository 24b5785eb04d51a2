"""Serve an ONNX model from a Triton Inference Server (PyTriton), for ``gpupath run --engine triton``.

    python bench/triton_server.py MODEL.onnx --model-name NAME --http-port P [--grpc-port Q] [--max-batch 64]

Stand-alone: run it with the Python of a venv holding the ``peers-triton`` extra's pins
(nvidia-pytriton 0.7.0 bundles tritonserver 2.51.0 with its python backend only; it needs
numpy < 2, so it cannot share gpupath's venv). It imports numpy, onnxruntime and pytriton, never
gpupath.

Every input and output of the ONNX model is served under its own name, dtype and shape (read
from the onnxruntime session); the first axis is the batch axis, up to ``--max-batch`` items a
request, other dynamic axes are -1. Inference runs onnxruntime's CPU provider inside the Python
backend. The script prints one ``READY ...`` line on stdout once the model answers, then
serves until SIGINT (Ctrl-C) or SIGTERM, which stop Triton and remove its workspace and shared
memory.
A production deployment would serve the ONNX file with Triton's own onnxruntime or TensorRT
backend from a model repository; the client side (:mod:`gpupath.detect._triton`) is the same.
The model-repository and statistics APIs are open (as in a stock tritonserver), so listen on a
trusted address only (default 127.0.0.1).
"""

from __future__ import annotations

import os
import sysconfig

# Triton's python_backend_stub links libpython3.X.so.1.0. Put *this* interpreter's library
# directory first, before Triton() starts the server, or a pyenv/conda Python's stub loads the
# distribution's libpython against this interpreter's stdlib and the model fails to load
# ("'_thread.RLock' object has no attribute '_recursion_count'").
_LIBDIR = sysconfig.get_config_var("LIBDIR")
if _LIBDIR:
    os.environ["LD_LIBRARY_PATH"] = _LIBDIR + (f":{os.environ['LD_LIBRARY_PATH']}"
                                               if os.environ.get("LD_LIBRARY_PATH") else "")

import argparse  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

try:
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy, TritonSecurityConfig
except ImportError as _exc:  # run from gpupath's own venv: say which venv it needs, no traceback
    sys.exit(f"bench/triton_server.py needs nvidia-pytriton ({_exc}); run it with the python of a venv holding "
             "pyproject.toml's peers-triton pins (the Triton tests build one under .cache/peers/)")

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
               "tensor(int16)": np.int16, "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def _tensors(args: list) -> list[Tensor]:
    """PyTriton tensors for onnxruntime NodeArgs; the first (batch) axis is left to max_batch_size."""
    out = []
    for a in args:
        if a.type not in _ORT_DTYPES:
            raise SystemExit(f"{a.name}: ONNX type {a.type} is not served by this script")
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in a.shape[1:])
        out.append(Tensor(name=a.name, dtype=_ORT_DTYPES[a.type], shape=shape))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="ONNX file")
    ap.add_argument("--model-name", required=True, help="name clients ask for (gpupath: the card's name)")
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--grpc-port", type=int, default=None, help="default: a free port")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--max-batch", type=int, default=64, help="largest batch a request may carry")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = ap.parse_args(argv)
    if args.max_batch < 1:
        raise SystemExit(f"--max-batch must be >= 1, got {args.max_batch}")

    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(args.model, sess_options=opts, providers=["CPUExecutionProvider"])
    inputs, outputs = _tensors(sess.get_inputs()), _tensors(sess.get_outputs())
    out_names = [t.name for t in outputs]

    @batch
    def infer(**feeds: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(out_names, sess.run(out_names, feeds), strict=True))

    cfg = TritonConfig(http_address=args.host, http_port=args.http_port, grpc_address=args.host,
                       grpc_port=args.grpc_port or _free_port(), allow_metrics=False, exit_timeout_secs=5,
                       log_verbose=0)
    # PyTriton puts the statistics and model-repository APIs behind a random token by default;
    # open them, as a stock tritonserver does, so clients can list the models (gpupath names them
    # when the model it wants is missing) and read counters; the rest stays behind the token
    security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "trace", "logging"])
    # a local model store: Triton loads the model from its repository folder, so the repository
    # index lists it (with the default policy PyTriton uploads it and the index stays empty)
    policy = TritonLifecyclePolicy(launch_triton_on_startup=True, local_model_store=True)
    # SIGINT and SIGTERM both stop the server cleanly (a shell starts background jobs with SIGINT
    # ignored; service managers send SIGTERM)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with Triton(config=cfg, security_config=security, triton_lifecycle_policy=policy) as triton:
        # no dynamic batcher: a request is one batch, so a client's split is what runs
        triton.bind(model_name=args.model_name, infer_func=infer, inputs=inputs, outputs=outputs,
                    config=ModelConfig(max_batch_size=args.max_batch, batcher=None), strict=True)
        triton.run()
        print(f"READY http://{args.host}:{args.http_port} model {args.model_name} "
              f"(inputs {', '.join(t.name for t in inputs)}; outputs {', '.join(out_names)}; "
              f"max batch {args.max_batch}; {time.perf_counter() - t0:.1f} s)", flush=True)
        triton.serve()  # returns on SIGINT; leaving the block stops Triton and cleans its workspace


if __name__ == "__main__":
    main(sys.argv[1:])
