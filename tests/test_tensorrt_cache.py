"""TensorRT engine cache: key digests, atomic store/load, rebuild on mismatch; the engine where TensorRT exists.

Everything but the last test runs without TensorRT or a GPU. The last one builds a real engine from
a tiny ONNX model and compares it with ONNX Runtime (CPU) at an FP16 tolerance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import import_or_skip
from gpupath.detect import _tensorrt as trt_mod
from gpupath.detect._tensorrt import (
    EngineCache,
    EngineKey,
    TensorRTEngine,
    engine_cache_dir,
    tensorrt_available,
)
from gpupath.errors import ConfigError

SHA = hashlib.sha256(b"tiny model").hexdigest()
KEY = EngineKey(model_sha256=SHA, gpu_name="NVIDIA H100 80GB HBM3", trt_version="10.13.0.35", input_name="tiles",
                batch=8, height=64, width=64, fp16=True)
# a different value for every field, to show each one reaches the digest
OTHER = {"model_sha256": hashlib.sha256(b"other model").hexdigest(), "gpu_name": "NVIDIA A100-SXM4-40GB",
         "trt_version": "11.4.0.106", "input_name": "input", "batch": 16, "height": 128, "width": 96, "fp16": False}
PLAN = bytes(range(256)) * 64  # 16 KiB of real, non-text bytes


def test_other_covers_every_field() -> None:
    assert set(OTHER) == {f.name for f in dataclasses.fields(EngineKey)}


def test_digest_is_stable_and_short() -> None:
    twin = EngineKey(**KEY.to_dict())
    assert KEY.digest() == twin.digest() == KEY.digest()
    assert len(KEY.digest()) == 16 and int(KEY.digest(), 16) >= 0
    canonical = json.dumps(KEY.to_dict(), sort_keys=True, separators=(",", ":"))
    assert KEY.digest() == hashlib.sha256(canonical.encode()).hexdigest()[:16]


@pytest.mark.parametrize("field", sorted(OTHER))
def test_digest_changes_with_each_field(field: str) -> None:
    changed = dataclasses.replace(KEY, **{field: OTHER[field]})
    assert changed.digest() != KEY.digest()
    assert EngineCache("/c").path_for(changed) != EngineCache("/c").path_for(KEY)


def test_key_is_frozen_and_to_dict_roundtrips() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        KEY.batch = 4  # type: ignore[misc]
    assert EngineKey(**json.loads(json.dumps(KEY.to_dict()))) == KEY


def test_path_layout(tmp_path: Path) -> None:
    path = EngineCache(tmp_path).path_for(KEY)
    assert path == tmp_path / f"{SHA[:12]}-{KEY.digest()}.engine"
    assert EngineCache.sidecar_for(path) == tmp_path / f"{SHA[:12]}-{KEY.digest()}.json"


def test_store_load_roundtrip(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "new" / "dir")  # created on store
    path = cache.store(KEY, PLAN)
    assert path.read_bytes() == PLAN
    assert json.loads(EngineCache.sidecar_for(path).read_text()) == KEY.to_dict()
    assert cache.load(KEY) == PLAN
    assert cache.load(EngineKey(**KEY.to_dict())) == PLAN  # an equal key, not the same object


def test_store_accepts_buffers_and_overwrites(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, memoryview(b"old plan"))
    cache.store(KEY, bytearray(PLAN))
    assert cache.load(KEY) == PLAN


def test_store_leaves_no_temp_files(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, PLAN)
    cache.store(dataclasses.replace(KEY, batch=4), PLAN[:100])
    cache.store(KEY, PLAN[::-1])  # overwrite
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 4
    assert all(n.endswith((".engine", ".json")) and not n.startswith(".") for n in names), names


def test_store_refuses_empty_plan(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty TensorRT plan"):
        EngineCache(tmp_path).store(KEY, b"")
    assert not any(tmp_path.iterdir())


def test_load_missing_plan(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gpupath.detect._tensorrt"):
        assert EngineCache(tmp_path).load(KEY) is None
    assert "no cached engine" in caplog.text


@pytest.mark.parametrize("field", ["gpu_name", "trt_version", "batch", "model_sha256"])
def test_load_rebuilds_when_sidecar_records_another_key(tmp_path: Path, field: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, PLAN)
    recorded = {**KEY.to_dict(), field: OTHER[field]}  # e.g. a plan copied in from another machine
    EngineCache.sidecar_for(path).write_text(json.dumps(recorded))
    with caplog.at_level(logging.INFO, logger="gpupath.detect._tensorrt"):
        assert cache.load(KEY) is None
    assert "key mismatch" in caplog.text and field in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_load_rebuilds_when_sidecar_has_extra_field(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, PLAN)
    EngineCache.sidecar_for(path).write_text(json.dumps({**KEY.to_dict(), "int8": True}))
    plan, why = cache.lookup(KEY)
    assert plan is None and "int8" in why


def test_load_rebuilds_when_sidecar_missing(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, PLAN)
    EngineCache.sidecar_for(path).unlink()  # as after a crash between the two renames
    plan, why = cache.lookup(KEY)
    assert plan is None and "sidecar missing" in why
    assert cache.load(KEY) is None


@pytest.mark.parametrize("garbage", [b"{not json", b"", b"\xff\xfe\x00", b"[1, 2, 3]", b"null"])
def test_load_rebuilds_when_sidecar_is_garbage(tmp_path: Path, garbage: bytes) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, PLAN)
    EngineCache.sidecar_for(path).write_bytes(garbage)
    plan, why = cache.lookup(KEY)
    assert plan is None and "sidecar" in why
    assert cache.load(KEY) is None


def test_load_rebuilds_when_plan_empty(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, PLAN)
    path.write_bytes(b"")
    assert cache.load(KEY) is None


def test_engine_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUPATH_ENGINE_CACHE", str(tmp_path / "from-env"))
    assert engine_cache_dir(None) == tmp_path / "from-env"
    assert engine_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"  # explicit beats the variable
    assert EngineCache().dir == tmp_path / "from-env"
    monkeypatch.delenv("GPUPATH_ENGINE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert engine_cache_dir() == tmp_path / "home" / ".cache" / "gpupath" / "engines"
    monkeypatch.setenv("GPUPATH_ENGINE_CACHE", "")  # empty means unset
    assert engine_cache_dir() == tmp_path / "home" / ".cache" / "gpupath" / "engines"


# -- optimization profile from the ONNX input shape (pure, no TensorRT) --------------------------

@pytest.mark.parametrize(("shape", "layout", "lo", "hi"), [
    ((-1, 3, -1, -1), "NCHW", (1, 3, 64, 48), (8, 3, 64, 48)),
    ((-1, 3, 64, 48), "NCHW", (1, 3, 64, 48), (8, 3, 64, 48)),
    ((-1, -1, -1, 3), "NHWC", (1, 64, 48, 3), (8, 64, 48, 3)),
    ((-1, 64, 48, 3), "NHWC", (1, 64, 48, 3), (8, 64, 48, 3)),
    ((8, 3, -1, -1), "NCHW", (8, 3, 64, 48), (8, 3, 64, 48)),   # fixed batch == max_batch
])
def test_profile_shapes(shape: tuple[int, ...], layout: str, lo: tuple[int, ...], hi: tuple[int, ...]) -> None:
    got = trt_mod._profile_shapes(shape, max_batch=8, input_hw=(64, 48), where="m.onnx")
    assert got == (layout, lo, hi, hi)


@pytest.mark.parametrize(("shape", "match"), [
    ((-1, 3, 64), "not 4-D"),
    ((-1, -1, -1, -1), "no fixed channel axis"),
    ((-1, 3, 32, -1), "height is fixed at 32"),
    ((-1, -1, 40, 3), "width is fixed at 40"),
    ((-1, 3, 32, 48), "does not fit input_hw"),
    ((-1, 5, 7, 9), "does not fit input_hw"),
    ((1, 3, 64, 48), "batch axis is fixed at 1"),
])
def test_profile_shapes_errors(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        trt_mod._profile_shapes(shape, max_batch=8, input_hw=(64, 48), where="m.onnx")


# -- availability and the engine without TensorRT ------------------------------------------------

def _engine_kwargs(tmp_path: Path) -> dict:
    return {"model_sha256": SHA, "input_name": "tiles", "output_names": ("out",), "max_batch": 4,
            "input_hw": (32, 32), "cache_dir": tmp_path / "cache"}


def test_tensorrt_unavailable_here() -> None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        pass  # expected on CPU CI
    else:
        pytest.skip("tensorrt imports on this machine")
    ok, reason = tensorrt_available()
    assert ok is False
    assert "tensorrt" in reason.lower() and "\n" not in reason


def test_engine_raises_config_error_with_reason(tmp_path: Path) -> None:
    ok, reason = tensorrt_available()
    if ok:
        pytest.skip("TensorRT and a GPU are present")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not parsed before the availability check")
    with pytest.raises(ConfigError, match="TensorRT engine for .*m.onnx") as info:
        TensorRTEngine(onnx, **_engine_kwargs(tmp_path))
    assert reason in str(info.value)
    assert not (tmp_path / "cache").exists()  # nothing built, nothing cached


def test_no_gpu_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "gpu_available", lambda: False)
    ok, reason = tensorrt_available()
    assert not ok and "no CUDA device" in reason and "TensorRT" in reason
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(ConfigError, match="no CUDA device"):
        TensorRTEngine(onnx, **_engine_kwargs(tmp_path))


@pytest.mark.parametrize(("change", "exc", "match"), [
    ({"model_sha256": "abc"}, ValueError, "64 lowercase hex"),
    ({"input_name": ""}, ValueError, "input_name"),
    ({"output_names": ()}, ValueError, "output_names"),
    ({"max_batch": 0}, ValueError, "max_batch"),
    ({"input_hw": (32,)}, ValueError, "input_hw"),
    ({"input_hw": (0, 32)}, ValueError, "input_hw"),
    ({"workspace_bytes": 0}, ValueError, "workspace_bytes"),
])
def test_engine_argument_errors(tmp_path: Path, change: dict, exc: type, match: str) -> None:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(exc, match=match):
        TensorRTEngine(onnx, **{**_engine_kwargs(tmp_path), **change})


def test_engine_missing_onnx(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.onnx: ONNX model not found"):
        TensorRTEngine(tmp_path / "nope.onnx", **_engine_kwargs(tmp_path))


# -- the real thing: TensorRT on a GPU ------------------------------------------------------------

def _tensorrt_test_modules() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """torch (to export test models), onnxruntime (the reference) and CuPy, or skip: TensorRT must load and build."""
    import_or_skip("tensorrt", "TensorRT not installed or not loadable")
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    ok, reason = tensorrt_available()
    if not ok:
        pytest.skip(reason)
    import cupy as cp

    return torch, ort, cp


@pytest.mark.gpu
def test_engine_matches_onnxruntime_and_caches(tmp_path: Path) -> None:
    torch, ort, cp = _tensorrt_test_modules()

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 2, 3, stride=2, padding=1), torch.nn.Sigmoid()).eval()
    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 40),), str(onnx_path), input_names=["tiles"],
                      output_names=["heat"], dynamic_axes={"tiles": {0: "n"}, "heat": {0: "n"}},
                      opset_version=17, dynamo=False)
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    kwargs = {"model_sha256": sha, "input_name": "tiles", "output_names": ("heat",), "input_hw": (32, 40),
              "cache_dir": tmp_path / "cache"}

    eng = TensorRTEngine(onnx_path, max_batch=4, **kwargs)
    assert eng.rebuilt and not eng.cache_hit and eng.plan_path.is_file()
    assert (eng.layout, eng.sample_shape, eng.input_dtype) == ("NCHW", (3, 32, 40), np.float32)

    rng = np.random.default_rng(7)
    x_host = rng.uniform(-1, 1, (3, 3, 32, 40)).astype(np.float32)
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        ["heat"], {"tiles": x_host})[0]
    got = eng(cp.asarray(x_host.astype(np.float16)))  # cast to the engine's float32 input on the device
    assert isinstance(got["heat"], cp.ndarray) and got["heat"].dtype == np.float32
    cp.cuda.get_current_stream().synchronize()
    np.testing.assert_allclose(cp.asnumpy(got["heat"]), want, atol=2e-2, rtol=0)  # FP16 kernels, sigmoid in [0, 1]
    assert want.shape == (3, 2, 16, 20)
    assert eng(cp.empty((0, 3, 32, 40), np.float32))["heat"].shape == (0, 2, 16, 20)
    with pytest.raises(ValueError, match="outside the engine's range"):
        eng(cp.zeros((5, 3, 32, 40), np.float32))
    with pytest.raises(TypeError, match="CuPy array"):
        eng(x_host)

    again = TensorRTEngine(onnx_path, max_batch=4, **kwargs)
    assert again.cache_hit and not again.rebuilt and again.build_reason == ""
    np.testing.assert_allclose(cp.asnumpy(again(cp.asarray(x_host))["heat"]), want, atol=2e-2, rtol=0)

    bigger = TensorRTEngine(onnx_path, max_batch=8, **kwargs)  # another key: rebuilt, first entry kept
    assert bigger.rebuilt and not bigger.cache_hit and bigger.plan_path != eng.plan_path
    assert eng.plan_path.is_file()

    eng.plan_path.write_bytes(eng.plan_path.read_bytes()[:1000])  # truncated plan, sidecar still valid
    healed = TensorRTEngine(onnx_path, max_batch=4, **kwargs)
    assert healed.rebuilt and "deserialize" in healed.build_reason
    assert TensorRTEngine(onnx_path, max_batch=4, **kwargs).cache_hit


@pytest.mark.gpu
def test_fixed_batch_engine_pads_a_short_last_batch(tmp_path: Path) -> None:
    torch, ort, cp = _tensorrt_test_modules()

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.Sigmoid()).eval()
    onnx_path = tmp_path / "fixed4.onnx"  # no dynamic axes: batch fixed at 4, as some exported detectors are
    torch.onnx.export(net, (torch.zeros(4, 3, 16, 16),), str(onnx_path), input_names=["tiles"],
                      output_names=["heat"], opset_version=17, dynamo=False)
    eng = TensorRTEngine(onnx_path, max_batch=4, model_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
                         input_name="tiles", output_names=("heat",), input_hw=(16, 16), cache_dir=tmp_path / "cache")
    x_host = np.random.default_rng(3).uniform(0, 1, (3, 3, 16, 16)).astype(np.float32)
    padded = np.concatenate([x_host, np.zeros((1, 3, 16, 16), np.float32)])
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(["heat"], {"tiles": padded})[0]
    got = eng(cp.asarray(x_host))["heat"]
    assert got.shape == (3, 2, 16, 16)  # only the real tiles' outputs
    np.testing.assert_allclose(cp.asnumpy(got), want[:3], atol=2e-2, rtol=0)
