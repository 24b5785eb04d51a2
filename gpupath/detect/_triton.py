"""Triton engine: a card's model run by a Triton Inference Server over HTTP (``--engine triton``).

Takes the model input batch the preprocessor made (``(N, C, H, W)`` or ``(N, H, W, C)`` float32,
model input px) and returns ``{output name: array}`` for the card's outputs, like every engine in
:mod:`gpupath.detect.engines`. The model runs wherever the server runs it (any Triton backend:
onnxruntime, TensorRT, python); gpupath only needs ``tritonclient[http]``.

:class:`TritonEngine` checks, before any slide is read, that the server is reachable and ready,
that it has the model (default: the card's name) ready, and that the model's inputs and outputs
include the card's; each failure is a one-line ConfigError naming the URL, the model and what
the server has. Batches larger than the model's ``max_batch_size`` are sent as several requests.

Device: the client is host-side. With ``device="cpu"`` inputs and outputs are NumPy. With
``device="cuda"`` the CuPy input is copied to the host for the request and the outputs are copied
back to the device, so decoding stays on the GPU; a network service costs these copies unless
Triton's CUDA shared memory is used (a follow-up, for a server on the same machine).

Provenance: the server is trusted to serve the card's model under that name; the run records the
card's sha256 and (in its parameters) the server URL.

References: Triton Inference Server HTTP/REST protocol (KServe v2) and the ``tritonclient.http``
Python client (``InferenceServerClient``, ``InferInput``, ``InferRequestedOutput``).
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import numpy as np

from gpupath._xp import is_device_array, to_device, to_host
from gpupath.detect.card import ModelCard
from gpupath.errors import ConfigError, GpupathError

__all__ = ["TritonEngine", "triton_available"]

# Triton datatypes the engine sends (the preprocessors make float32; a float16 model gets a cast)
_DTYPES = {"FP32": np.float32, "FP16": np.float16}


def _client_module() -> Any:
    try:
        import tritonclient.http as httpclient
    except ImportError as exc:
        raise ConfigError(f"triton engine: tritonclient is not installed ({exc}); "
                          "pip install tritonclient[http]") from None
    return httpclient


def _split_url(url: str) -> tuple[str, bool]:
    """(host:port, ssl) from ``host:port``, ``http://host:port`` or ``https://host:port``."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"--triton-url must be host:port (e.g. localhost:8000), got {url!r}")
    u = url.strip().rstrip("/")
    ssl = u.startswith("https://")
    for scheme in ("http://", "https://"):
        if u.startswith(scheme):
            u = u[len(scheme):]
    if "://" in u or "/" in u or not u:
        raise ConfigError(f"--triton-url {url}: expected host:port or http(s)://host:port (HTTP endpoint; "
                          "gRPC is not used)")
    return u, ssl


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _describe(tensors: dict[str, dict]) -> str:
    return ", ".join(f"{k} {v.get('datatype')}{v.get('shape')}" for k, v in tensors.items()) or "none"


def triton_available(url: str, *, timeout_s: float = 5.0) -> tuple[bool, str]:
    """(True, "") when a Triton server answers ready at ``url``, else (False, why in one line)."""
    try:
        hostport, ssl = _split_url(url)
        client = _client_module().InferenceServerClient(url=hostport, ssl=ssl, connection_timeout=timeout_s,
                                                        network_timeout=timeout_s)
    except ConfigError as exc:
        return False, str(exc)
    try:
        return (True, "") if client.is_server_ready() else (False, f"triton server {url}: not ready")
    except Exception as exc:  # noqa: BLE001  refused, DNS, timeout, HTTP error: all mean "not usable"
        return False, f"triton server {url}: not reachable ({_reason(exc)})"
    finally:
        client.close()


class TritonEngine:
    """A card's model served by Triton; ``engine(x) -> {output name: array}`` on ``device``.

    Parameters
    ----------
    card : the model card; its input name and output names must be the served model's.
    url : the server's HTTP endpoint, ``host:port`` or ``http(s)://host:port``.
    model_name : the model's name on the server (default ``card.name``).
    device : cpu (NumPy in and out) | cuda (CuPy in and out, through host copies; see the module notes).
    timeout_s : connection and per-request network timeout, s.

    Raises
    ------
    ConfigError
        tritonclient missing; the server unreachable or not ready; the model not ready there; the
        served inputs or outputs lacking the card's; an input datatype other than FP32/FP16.
    """

    name = "triton"

    def __init__(self, card: ModelCard, *, url: str, model_name: str | None = None,
                 device: Literal["cpu", "cuda"] = "cpu", timeout_s: float = 60.0) -> None:
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {device!r}")
        if not timeout_s > 0:
            raise ConfigError(f"triton timeout must be > 0 s, got {timeout_s}")
        self._http = _client_module()
        self._hostport, self._ssl = _split_url(url)
        self.url = url
        self.card = card
        self.device = device
        self.model_name = model_name or card.name
        self.timeout_s = float(timeout_s)
        self._local = threading.local()  # one client per thread: the HTTP client is gevent-based
        where = f"triton server {url}"
        client = self._client()
        try:
            ready = client.is_server_ready()
        except Exception as exc:  # noqa: BLE001  refused, DNS, timeout, HTTP error: all mean "not usable"
            raise ConfigError(f"{where}: not reachable ({_reason(exc)})") from None
        if not ready:
            raise ConfigError(f"{where}: not ready (it answers, but reports not ready: still starting?)")
        try:
            model_ready = client.is_model_ready(self.model_name)
            if not model_ready:
                raise ConfigError(f"{where}: model {self.model_name!r} is not ready there "
                                  f"(server has: {self._listing(client)})")
            meta = client.get_model_metadata(self.model_name)
            config = client.get_model_config(self.model_name)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001  tritonclient raises InferenceServerException or socket errors
            raise ConfigError(f"{where}: model {self.model_name!r}: {_reason(exc)}") from None
        inputs = {t["name"]: t for t in meta.get("inputs", [])}
        outputs = {t["name"]: t for t in meta.get("outputs", [])}
        listing = f"inputs {_describe(inputs)}; outputs {_describe(outputs)}"
        what = f"{where}: model {self.model_name!r} vs card {card.name}"
        if card.input.name not in inputs:
            raise ConfigError(f"{what}: input {card.input.name!r} not served ({listing})")
        missing = [n for n in card.output.names if n not in outputs]
        if missing:
            raise ConfigError(f"{what}: output{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                              f"not served ({listing})")
        self.input_datatype = str(inputs[card.input.name]["datatype"])
        if self.input_datatype not in _DTYPES:
            raise ConfigError(f"{what}: input {card.input.name!r} is {self.input_datatype}; the triton engine "
                              f"sends {' or '.join(_DTYPES)}")
        # 0: the model does not batch (its shapes include the batch axis); send the whole batch as one request
        self.max_batch_size = int(config.get("max_batch_size", 0) or 0)
        self.output_names = tuple(card.output.names)

    # ------------------------------------------------------------------ internals
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._http.InferenceServerClient(url=self._hostport, ssl=self._ssl,
                                                      connection_timeout=self.timeout_s,
                                                      network_timeout=self.timeout_s)
            self._local.client = client
        return client

    def _listing(self, client: Any) -> str:
        try:
            index = client.get_model_repository_index()
        except Exception as exc:  # noqa: BLE001  the listing only decorates an error message
            return f"model index unavailable: {_reason(exc)}"
        return ", ".join(f"{m.get('name')} {m.get('state', '?')}" for m in index) or "no models"

    def _infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        http = self._http
        inp = http.InferInput(self.card.input.name, list(x.shape), self.input_datatype)
        inp.set_data_from_numpy(x, binary_data=True)
        wanted = [http.InferRequestedOutput(n, binary_data=True) for n in self.output_names]
        try:
            res = self._client().infer(self.model_name, [inp], outputs=wanted)
        except Exception as exc:  # noqa: BLE001  server gone, timeout, or the server's own error text
            raise GpupathError(f"triton server {self.url}: inference of {self.model_name!r} on a "
                               f"{list(x.shape)} batch failed ({_reason(exc)})") from None
        return {n: res.as_numpy(n) for n in self.output_names}

    # ------------------------------------------------------------------ public
    def __call__(self, x: Any) -> dict[str, Any]:
        """Outputs for a model input batch ``x`` (first axis: batch), split into requests of at most
        ``max_batch_size`` items; arrays on the engine's device."""
        if is_device_array(x) != (self.device == "cuda"):
            raise TypeError(f"the triton engine on {self.device} takes {'CuPy' if self.device == 'cuda' else 'NumPy'}"
                            " input")
        # cuda: the request body is built on the host, so the batch is copied there (explicit transfer)
        host = np.ascontiguousarray(to_host(x), dtype=_DTYPES[self.input_datatype])
        if host.ndim == 0 or len(host) == 0:
            raise ValueError(f"triton engine: expected a non-empty batch, got shape {host.shape}")
        step = self.max_batch_size or len(host)
        parts = [self._infer(host[i:i + step]) for i in range(0, len(host), step)]
        out = {n: parts[0][n] if len(parts) == 1 else np.concatenate([p[n] for p in parts]) for n in self.output_names}
        if self.device == "cuda":
            out = {n: to_device(v) for n, v in out.items()}  # back to the GPU so decoding stays there
        return out

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None
