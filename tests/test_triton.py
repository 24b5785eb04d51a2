"""Tests of the triton engine (gpupath.detect._triton) against a real Triton Inference Server.

The server is tritonserver 2.51.0 as bundled by nvidia-pytriton 0.7.0 (python backend only;
``bench/triton_server.py`` runs the shipped ONNX model with onnxruntime inside it). PyTriton
needs numpy < 2, so the server gets its own venv under ``.cache/peers/`` in the repo root
(git-ignored; built once from the ``peers-triton`` extra's pins); without PyPI the build fails and
the tests that need a server skip, naming the failed step. The client side runs here, in
gpupath's own environment, with ``tritonclient[http]`` (test extra).

The server starts once per module on free ports with ``--max-batch 4``, so the 6-tile batches
below must be split into two requests, and is stopped with SIGINT at the end (checked to exit
cleanly, its whole process group gone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import data_file
from detect_helpers import assert_same_detections
from helpers_pipeline import detections_of
from peer_venv import peer_python
from scipy.spatial import cKDTree

from gpupath.detect._triton import TritonEngine, triton_available
from gpupath.detect.card import shipped_card
from gpupath.types import TileBoxes
from gpupath.detect.detector import make_detector
from gpupath.detect.engines import OnnxRuntimeEngine
from gpupath.detect.preprocess import preprocess
from gpupath.errors import ConfigError, GpupathError
from gpupath.pipeline import RunParams, process_slide
from gpupath.slide import open_slide
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide
from gpupath.tiling import TileSpec

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (test extra) not installed")

ROOT = Path(__file__).resolve().parents[1]
# the server's pins live in pyproject.toml's `peers-triton` extra (one place to change them)
PEER_PINS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["peers-triton"]
PEER = next(p for p in PEER_PINS if p.startswith("nvidia-pytriton==")).replace("nvidia-pytriton==", "pytriton-")
PEER_DIR = ROOT / ".cache" / "peers" / PEER
SERVER_SCRIPT = ROOT / "bench" / "triton_server.py"
MODEL = shipped_card().name   # the served name: the card's
MAX_BATCH = 4          # the server's max_batch_size: smaller than the 6-tile batches below
START_TIMEOUT_S = 60
NO_STAIN = np.eye(3)   # the learned detector ignores stains


# ----------------------------------------------------------------------------- server
@pytest.fixture(scope="session")
def triton_python() -> Path:
    """Python of a venv with nvidia-pytriton + onnxruntime, built once under .cache/peers/ (PyPI needed)."""
    return peer_python(PEER_DIR, peer=PEER, pins=PEER_PINS, imports="pytriton.triton, onnxruntime", timeout_s=900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def triton_url(triton_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a Triton server serving the shipped model as ``nuclei_v1`` (max batch 4)."""
    http_port, grpc_port = _free_port(), _free_port()
    url = f"127.0.0.1:{http_port}"
    log_path = tmp_path_factory.mktemp("triton") / "server.log"
    cmd = [str(triton_python), str(SERVER_SCRIPT), str(shipped_card().model_path), "--model-name", MODEL,
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--max-batch", str(MAX_BATCH)]
    with log_path.open("w") as log:
        # own session: the server, tritonserver and its python stubs form one process group to check and clean up
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])

    client = httpclient.InferenceServerClient(url=url, connection_timeout=2, network_timeout=2)
    t0 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"triton server exited {proc.returncode} before it was ready:\n{log_tail()}")
            try:
                if client.is_server_ready() and client.is_model_ready(MODEL):
                    break
            except Exception:  # noqa: BLE001, S110  not listening yet: poll again
                pass
            if time.perf_counter() - t0 > START_TIMEOUT_S:
                pytest.fail(f"triton server not ready after {START_TIMEOUT_S} s:\n{log_tail()}")
            time.sleep(0.1)
        yield url
    finally:
        client.close()
        proc.send_signal(signal.SIGINT)  # PyTriton stops Triton and removes its workspace and shared memory
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"triton server ignored SIGINT for 30 s (killed):\n{log_tail()}")
        deadline = time.perf_counter() + 10
        while _group_alive(proc.pid) and time.perf_counter() < deadline:
            time.sleep(0.1)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("tritonserver outlived its PyTriton parent (killed)")
        assert rc == 0, f"triton server exited {rc} on SIGINT:\n{log_tail()}"


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def real_tiles() -> np.ndarray:
    """Six 256-px tiles of the real H&E slide (0.499 µm/px), as tests/test_learned_detector.py reads them."""
    with open_slide(data_file("cmu-1-small-region.svs")) as slide:
        locations = [(x, y) for y in (700, 1200) for x in (300, 900, 1500)]
        return slide.read_tiles(locations, 0, 256).pixels


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "synthetic.tiff"
    write_synthetic_slide(path, SyntheticSpec(width_px=2048, height_px=2048, mpp=0.5, seed=5))
    return path


def _stats(url: str) -> tuple[int, int]:
    """(inference_count, execution_count) of the model on the server: items and requests run."""
    client = httpclient.InferenceServerClient(url=url)
    try:
        s = client.get_inference_statistics(model_name=MODEL)["model_stats"][0]
    finally:
        client.close()
    return int(s["inference_count"]), int(s["execution_count"])


# ----------------------------------------------------------------------------- results
def test_triton_gives_the_onnxruntime_detections(triton_url: str, real_tiles: np.ndarray) -> None:
    remote, notes = make_detector("triton", triton_url=triton_url)
    local, _ = make_detector("onnxruntime")
    assert (remote.engine, remote.name, notes) == ("triton", MODEL, [])
    assert remote.model_sha256 == shipped_card().extra["sha256"]  # provenance: the card's model file
    a = remote.detect(real_tiles, tile_mpp=0.5, stain_matrix_od=NO_STAIN)
    b = local.detect(real_tiles, tile_mpp=0.5, stain_matrix_od=NO_STAIN)
    assert len(a) > 100, "the tiles hold many nuclei"
    # the same onnxruntime (CPU, float32) runs the same model on both sides; only the batch split differs
    assert_same_detections(a, b, box_px=1e-3, score=1e-5)


def test_a_batch_over_the_servers_max_is_split(triton_url: str, real_tiles: np.ndarray) -> None:
    card = shipped_card()
    x = preprocess(real_tiles, card.input)  # (6, 3, 256, 256) float32
    det, _ = make_detector("triton", triton_url=triton_url)
    engine = det.engine_impl
    assert engine.max_batch_size == MAX_BATCH and len(x) > MAX_BATCH
    # the server refuses the whole batch in one request...
    raw = httpclient.InferenceServerClient(url=triton_url)
    inp = httpclient.InferInput(card.input.name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(httpclient.InferenceServerException, match="batch"):
        raw.infer(MODEL, [inp])
    raw.close()
    # ...so the engine sends ceil(6 / 4) = 2 requests, and the outputs are those of the whole batch
    items0, runs0 = _stats(triton_url)
    got = engine(x)
    items1, runs1 = _stats(triton_url)
    assert (items1 - items0, runs1 - runs0) == (6, 2)
    want = OnnxRuntimeEngine(card)(x)
    assert set(got) == set(card.output.names)
    for name in card.output.names:
        assert got[name].shape == want[name].shape and got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)


def test_the_engine_works_from_another_thread(triton_url: str, real_tiles: np.ndarray) -> None:
    """Dask runs slides on worker threads: the HTTP client (gevent-based) is made per thread."""
    det, _ = make_detector("triton", triton_url=triton_url)
    found: list[TileBoxes] = []
    worker = threading.Thread(target=lambda: found.append(det.detect(real_tiles[:2], tile_mpp=0.5,
                                                                     stain_matrix_od=NO_STAIN)))
    worker.start()
    worker.join(timeout=60)
    here = det.detect(real_tiles[:2], tile_mpp=0.5, stain_matrix_od=NO_STAIN)
    assert len(found) == 1
    assert_same_detections(found[0], here, box_px=0, score=0)


def test_pipeline_on_triton_equals_onnxruntime(triton_url: str, small_slide: Path, tmp_path: Path) -> None:
    tile = TileSpec(tile_px=256, overlap_px=32)
    res_local = process_slide(small_slide, tmp_path / "ort", RunParams(tile=tile, engine="onnxruntime", precision="fp32"))
    params = RunParams(tile=tile, engine="triton", triton_url=triton_url)
    detector, _ = params.make_detector()
    assert detector.engine == "triton"
    res_remote = process_slide(small_slide, tmp_path / "triton", params, detector=detector)
    assert res_local.status == res_remote.status == "ok", (res_local.error, res_remote.error)
    assert res_local.n_tiles == res_remote.n_tiles and res_local.n_tiles > MAX_BATCH
    assert res_remote.n_detections == res_local.n_detections > 0
    a, b = detections_of(tmp_path / "triton", res_remote.slide_id), detections_of(tmp_path / "ort", res_local.slide_id)
    ka, kb = (np.c_[d["x0_px"], d["y0_px"], d["x1_px"], d["y1_px"]] for d in (a, b))
    dist, idx = cKDTree(kb).query(ka, p=np.inf)
    assert dist.max() <= 1e-3 and len(set(idx.tolist())) == len(idx)  # level-0 px
    assert np.abs(a["score"] - b["score"][idx]).max() <= 1e-5


@pytest.mark.gpu
def test_triton_on_cuda_tiles_matches_the_host_run(triton_url: str, real_tiles: np.ndarray) -> None:
    """device cuda: CuPy tiles in, the batch copied to the host for the request, outputs decoded on the GPU."""
    import cupy

    on_gpu, _ = make_detector("triton", device="cuda", preprocess="xp", triton_url=triton_url)
    on_cpu, _ = make_detector("triton", device="cpu", triton_url=triton_url)
    assert on_gpu.engine_impl.device == "cuda"
    x = on_gpu.preprocessor(cupy.asarray(real_tiles))
    assert all(isinstance(v, cupy.ndarray) for v in on_gpu.engine_impl(x).values())
    # preprocessing and decoding on CuPy vs NumPy: float32 either way, a few ulp apart
    assert_same_detections(on_gpu.detect(cupy.asarray(real_tiles), tile_mpp=0.5, stain_matrix_od=NO_STAIN),
                     on_cpu.detect(real_tiles, tile_mpp=0.5, stain_matrix_od=NO_STAIN), box_px=1e-2, score=1e-4)


def test_cli_run_with_triton_on_a_dask_worker(triton_url: str, small_slide: Path, tmp_path: Path) -> None:
    """--triton-url reaches the worker process, which builds its own detector from the run's parameters."""
    proc = subprocess.run([sys.executable, "-m", "gpupath", "run", str(small_slide), "--out", str(tmp_path / "o"),
                           "--device", "cpu", "--engine", "triton", "--triton-url", triton_url, "--workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["environment"]["detector"]["engine"] == "triton"
    assert run["params"]["triton_url"] == triton_url
    assert "1 ok" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- errors
def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_a_model_the_server_lacks_fails_with_one_line(triton_url: str) -> None:
    with pytest.raises(ConfigError) as exc:
        make_detector("triton", triton_url=triton_url, triton_model="nope")
    assert _one_line(exc) == (f"triton server {triton_url}: model 'nope' is not ready there "
                              f"(server has: {MODEL} READY)")


def test_a_card_output_the_server_lacks_fails_with_one_line(triton_url: str) -> None:
    card = shipped_card()
    renamed = dataclasses.replace(card, output=dataclasses.replace(card.output, offset="offs"))
    with pytest.raises(ConfigError) as exc:
        TritonEngine(renamed, url=triton_url)
    assert _one_line(exc) == (
        f"triton server {triton_url}: model '{MODEL}' vs card {MODEL}: output 'offs' not served "
        "(inputs tiles FP32[-1, 3, -1, -1]; outputs heatmap FP32[-1, 1, -1, -1], classes FP32[-1, 3, -1, -1], "
        "size FP32[-1, 1, -1, -1], offset FP32[-1, 2, -1, -1])")


def test_a_request_the_server_refuses_names_the_server_and_the_batch(triton_url: str, real_tiles: np.ndarray) -> None:
    det, _ = make_detector("triton", triton_url=triton_url)
    x = preprocess(real_tiles[:1], shipped_card().input)[0]  # (3, 256, 256): the batch axis is missing
    with pytest.raises(GpupathError, match=rf"^triton server {triton_url}: inference of '{MODEL}' on a "
                                           r"\[3, 256, 256\] batch failed \(InferenceServerException: \[400\]"):
        det.engine_impl(x)


def test_a_url_with_nothing_listening_fails_with_one_line() -> None:
    url = f"127.0.0.1:{_free_port()}"  # bound and closed again: nothing listens there
    with pytest.raises(ConfigError, match=rf"^triton server {url}: not reachable \(ConnectionRefusedError") as exc:
        make_detector("triton", triton_url=url)
    _one_line(exc)
    ok, why = triton_available(url)
    assert not ok and why.startswith(f"triton server {url}: not reachable")


@pytest.mark.parametrize("url, expected", [
    ("grpc://127.0.0.1:8001", "expected host:port or http(s)://host:port"),
    ("127.0.0.1:8000/v2", "expected host:port or http(s)://host:port"),
    ("  ", "--triton-url must be host:port"),
])
def test_a_malformed_url_is_refused(url: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        make_detector("triton", triton_url=url)


@pytest.mark.parametrize("call, match", [
    pytest.param(lambda: make_detector("triton"), "--engine triton needs --triton-url", id="detector-triton-no-url"),
    pytest.param(lambda: RunParams(engine="triton"), "--engine triton needs --triton-url", id="params-triton-no-url"),
    pytest.param(lambda: make_detector("auto", triton_url="127.0.0.1:1"),
                 r"--triton-url 127.0.0.1:1 is for --engine triton \(engine here: auto", id="detector-url-with-auto"),
    pytest.param(lambda: RunParams(engine="onnxruntime", triton_url="127.0.0.1:1"),
                 r"is for --engine triton \(engine here: onnxruntime\)", id="params-url-with-onnxruntime"),
])
def test_engine_and_url_go_together(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


def test_auto_never_picks_triton() -> None:
    det, notes = make_detector("auto", device="cpu")
    assert det.engine != "triton" and not any("triton" in n for n in notes)


def test_without_tritonclient_the_engine_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tritonclient.http", None)  # import tritonclient.http now raises ImportError
    with pytest.raises(ConfigError, match=r"tritonclient is not installed .*; pip install tritonclient\[http\]"):
        make_detector("triton", triton_url="127.0.0.1:1")


def test_cli_engine_triton_without_url_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gpupath", "run", str(data_file("small.svs")), "--out",
                           str(tmp_path / "o"), "--device", "cpu", "--engine", "triton"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--engine triton needs --triton-url" in proc.stderr, proc.stderr
