"""gpupath.serve: DZI tiles against read_region, detections per viewport, security, viewer in headless Chromium."""

from __future__ import annotations

import http.client
import io
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import data_file

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from gpupath.errors import ConfigError
from gpupath.serve import (
    DziGeometry,
    ServedSlide,
    ServeSource,
    TileCache,
    check_bind,
    create_app,
    load_source,
    render_tile,
    serve_in_thread,
)

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 4096 px slide (mpp 0.25) and its run folder, with reports."""
    from gpupath.batch import run_slides
    from gpupath.pipeline import RunParams
    from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

    root = tmp_path_factory.mktemp("serve")
    path = root / "slide.svs"
    write_synthetic_slide(path, SyntheticSpec(width_px=4096, height_px=4096, mpp=0.25, seed=2))
    out = root / "out"
    [result] = run_slides([path], out, RunParams(engine="onnxruntime"))
    assert result.status == "ok", result.error
    return out


@pytest.fixture(scope="module")
def server(run_out: Path) -> Iterator[tuple[object, object]]:
    app = create_app(run_out, cache_bytes=8 * 2**20)
    bg = serve_in_thread(app)
    yield app, bg
    bg.stop()


def _get(bg: object, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection(bg.host, bg.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def _slide_id(run_out: Path) -> str:
    return json.loads((run_out / "run.json").read_text())["slides"][0]["slide_id"]


# --- DZI geometry and the cache ----------------------------------------------------------------

def test_dzi_geometry_follows_openslide_deepzoom() -> None:
    g = DziGeometry(4096, 3000)
    assert g.max_level == 12 and g.level_dimensions(12) == (4096, 3000) and g.level_dimensions(0) == (1, 1)
    assert g.level_dimensions(10) == (1024, 750)
    assert g.tile_count(12) == (math.ceil(4096 / 254), math.ceil(3000 / 254))
    assert g.tile_bounds(12, 0, 0) == (0, 0, 255, 255)            # overlap on inner sides only
    assert g.tile_bounds(12, 1, 1) == (253, 253, 509, 509)
    assert g.tile_bounds(12, 16, 11) == (16 * 254 - 1, 11 * 254 - 1, 4096, 3000)
    assert not g.valid(13, 0, 0) and not g.valid(-1, 0, 0) and not g.valid(12, 17, 0) and not g.valid(12, 0, -1)
    with pytest.raises(ValueError, match="no tile"):
        g.tile_bounds(12, 17, 0)
    with pytest.raises(ValueError, match="non-empty"):
        DziGeometry(0, 10)


def test_tile_cache_stays_within_its_byte_budget() -> None:
    cache = TileCache(1000)
    for i in range(100):
        cache.put(("s", i), bytes(90))
        assert cache.nbytes <= 1000
    assert len(cache) == 11 and cache.get(("s", 0)) is None and cache.get(("s", 99)) == bytes(90)
    cache.get(("s", 89))                # now most recent: survives the next insert
    cache.put(("s", 100), bytes(90))
    assert cache.get(("s", 89)) is not None and cache.get(("s", 90)) is None
    cache.put(("big",), bytes(2000))   # over the whole budget: not kept
    assert cache.get(("big",)) is None and cache.nbytes <= 1000


# --- tiles against read_region -----------------------------------------------------------------

def _reference(slide, g: DziGeometry, level: int, col: int, row: int) -> np.ndarray:
    """The tile's area from OpenSlide-style read_region: the slide level that matches, else level 0 resized."""
    from PIL import Image

    x0, y0, x1, y1 = g.tile_bounds(level, col, row)
    ds = g.downsample(level)
    matching = [k for k, d in enumerate(slide.level_downsamples) if abs(d - ds) < 1e-6]
    if matching:
        img = slide.read_region((x0 * ds, y0 * ds), matching[0], (x1 - x0, y1 - y0))
    else:
        img = slide.read_region((x0 * ds, y0 * ds), 0, ((x1 - x0) * ds, (y1 - y0) * ds))
        img = img.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    rgba = np.asarray(img).astype(np.int16)
    rgb = rgba[..., :3]
    rgb[rgba[..., 3] == 0] = 255   # transparent (outside the level) is white, as tiles show glass
    return rgb


def test_tiles_match_read_region_at_every_dzi_level(server, run_out: Path) -> None:
    from PIL import Image

    from gpupath.slide import open_slide

    _, bg = server
    sid = _slide_id(run_out)
    status, body, _ = _get(bg, f"/dzi/{sid}.dzi")
    assert status == 200 and b'TileSize="254"' in body and b'Width="4096"' in body
    with open_slide(run_out.parent / "slide.svs") as slide:
        assert len(slide.level_dimensions) > 1   # some DZI levels match a slide level, others are resized
        g = DziGeometry(*slide.dimensions)
        for level in range(g.max_level + 1):
            cols, rows = g.tile_count(level)
            for col, row in {(0, 0), (cols // 2, rows // 2), (cols - 1, rows - 1)}:
                status, body, headers = _get(bg, f"/dzi/{sid}_files/{level}/{col}_{row}.jpeg")
                assert status == 200 and headers["content-type"] == "image/jpeg"
                got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(np.int16)
                want = _reference(slide, g, level, col, row)
                assert got.shape == want.shape, (level, col, row)
                diff = np.abs(got - want)
                # JPEG q80 (4:4:4) on small, high-contrast tiles: mean error within 10 levels, bounded tail
                assert diff.mean() < 10, (level, col, row, diff.mean())
                assert np.percentile(diff, 99) < 40, (level, col, row, np.percentile(diff, 99))
                # the pixels before encoding: the same area within resampling error
                png = render_tile(slide, g, level, col, row, fmt="png")
                lossless = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
                assert np.abs(lossless - want).mean() < 4, (level, col, row)   # pyramid level vs level 0 filters


@pytest.mark.gpu
def test_gpu_tiles_match_cpu_tiles(run_out: Path) -> None:
    from PIL import Image

    from gpupath.slide import open_slide

    with open_slide(run_out.parent / "slide.svs") as slide:
        g = DziGeometry(*slide.dimensions)
        for level in (g.max_level, g.max_level - 1, g.max_level - 3, 3):
            cpu, gpu = (np.asarray(Image.open(io.BytesIO(render_tile(slide, g, level, 0, 0, fmt="png", device=dev))))
                        .astype(np.int16) for dev in ("cpu", "cuda"))
            assert cpu.shape == gpu.shape and np.abs(cpu - gpu).mean() < 3, level   # box vs triangle filter


# --- detections --------------------------------------------------------------------------------

def test_detections_boxes_then_density(server, run_out: Path) -> None:
    from gpupath.query import query

    _, bg = server
    sid = _slide_id(run_out)
    bbox = (500, 1400, 1100, 1900)
    status, body, _ = _get(bg, f"/api/detections/{sid}?x0={bbox[0]}&y0={bbox[1]}&x1={bbox[2]}&y1={bbox[3]}&min_score=0.5")
    assert status == 200
    d = json.loads(body)
    want = query(run_out, slide=sid, bbox=bbox, min_score=0.5)
    from gpupath.detect.card import shipped_card
    from gpupath.report.colours import colour_hex, label_colours

    classes = list(shipped_card().classes)
    assert d["mode"] == "boxes" and d["labels"] == classes and d["n"] == want.num_rows > 0
    # each class in the overlay's colour, in label-index order; every box names one of them
    assert d["colours"] == [colour_hex(rgb) for rgb in label_colours(classes).values()]
    assert {b[5] for b in d["boxes"]} <= set(range(len(classes)))
    from collections import Counter

    assert Counter(classes[b[5]] for b in d["boxes"]) == Counter(want.column("label").to_pylist())
    assert sorted(round(b[0], 1) for b in d["boxes"]) == sorted(round(x, 1) for x in want.column("x0_px").to_pylist())
    status, body, _ = _get(bg, f"/api/detections/{sid}?x0=0&y0=0&x1=4096&y1=4096&max_boxes=10")
    d = json.loads(body)
    assert status == 200 and d["mode"] == "density" and d["n"] > 10
    assert sum(d["grid"]["counts"]) == d["n"] == query(run_out, slide=sid, bbox=(0, 0, 4096, 4096)).num_rows


# --- security ----------------------------------------------------------------------------------

def test_bad_requests_are_4xx_and_read_nothing(server, run_out: Path) -> None:
    app, bg = server
    st = app.state.gp
    sid = _slide_id(run_out)
    other = "0" * 64
    bad = [
        "/dzi/..%2f..%2f..%2fetc%2fpasswd.dzi", "/dzi/..%2F..%2Frun.json", "/dzi/../../etc/passwd",
        "/dzi/%2Fetc%2Fpasswd.dzi", "/dzi//etc/passwd_files/0/0_0.jpeg", f"/dzi/{run_out.parent / 'slide.svs'}.dzi",
        f"/dzi/{other}.dzi", f"/dzi/{other}_files/12/0_0.jpeg", f"/dzi/{sid.upper()}.dzi", f"/dzi/{sid[:12]}.dzi",
        f"/api/detections/{other}?x0=0&y0=0&x1=10&y1=10", f"/reports/{other}.html", "/reports/..%2frun.json",
        f"/reports/..%2f..%2f{sid}.html", "/static/..%2fapp.py", "/static/../app.py",
        f"/dzi/{sid}_files/13/0_0.jpeg", f"/dzi/{sid}_files/-1/0_0.jpeg", f"/dzi/{sid}_files/12/-1_0.jpeg",
        f"/dzi/{sid}_files/12/0_17.jpeg", f"/dzi/{sid}_files/12/99999999999999999999_0.jpeg",
        f"/dzi/{sid}_files/12/1e3_0.jpeg", f"/dzi/{sid}_files/0/0_0.png", f"/dzi/{sid}_files/0/0_0.jpeg%00",
        f"/api/detections/{sid}?x0=10&y0=0&x1=0&y1=10", f"/api/detections/{sid}?x0=nan&y0=0&x1=1&y1=1",
        f"/api/detections/{sid}?x0=0&y0=0&x1=1&y1=1&max_boxes=-1", f"/api/detections/{sid}?x0=0",
    ]
    reads, opens = st.reads, st.opens
    for path in bad:
        status, body, _ = _get(bg, path)
        assert 400 <= status < 500, (path, status)
        assert b"root:" not in body and b"slides" not in body, path
    assert (st.reads, st.opens) == (reads, opens)
    for method in ("POST", "PUT", "DELETE"):
        assert _get(bg, "/api/slides", method=method)[0] == 405


def test_token_required_and_compared(run_out: Path) -> None:
    # the same middleware guards any bind; a non-loopback bind without a token never starts (below)
    app = create_app(run_out, token="s3cret-token")
    bg = serve_in_thread(app, token="s3cret-token")
    try:
        sid = _slide_id(run_out)
        for path in ("/", "/api/slides", f"/dzi/{sid}.dzi", f"/dzi/{sid}_files/12/0_0.jpeg"):
            assert _get(bg, path)[0] == 401
            assert _get(bg, path, {"Authorization": "Bearer wrong"})[0] == 401
            assert _get(bg, path + "?token=s3cret-tokenX")[0] == 401
        assert app.state.gp.reads == 0 and app.state.gp.opens == 0
        assert _get(bg, "/api/slides", {"Authorization": "Bearer s3cret-token"})[0] == 200
        assert _get(bg, f"/dzi/{sid}_files/12/0_0.jpeg?token=s3cret-token")[0] == 200
        # opening the viewer with ?token= sets an HttpOnly cookie: its script and tiles load in a browser
        status, _, headers = _get(bg, "/viewer?token=s3cret-token")
        cookie = headers.get("set-cookie", "")
        assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie, headers
        jar = {"Cookie": cookie.split(";")[0]}
        assert _get(bg, "/static/viewer.js", jar)[0] == 200
        assert _get(bg, f"/dzi/{sid}_files/12/0_0.jpeg", jar)[0] == 200
        assert _get(bg, "/static/viewer.js", {"Cookie": "gpupath_token=wrong"})[0] == 401
    finally:
        bg.stop()


def test_huge_viewport_is_clamped_not_a_server_error(server, run_out: Path) -> None:
    _, bg = server
    sid = _slide_id(run_out)
    status, body, _ = _get(bg, f"/api/detections/{sid}?x0=-1e308&y0=0&x1=1e308&y1=8192&max_boxes=0")
    assert status == 200 and b'"density"' in body
    assert _get(bg, f"/api/detections/{sid}?x0=0&y0=0&x1=1e-300&y1=1e-300")[0] == 400


def test_a_slide_without_a_pyramid_is_never_read_whole_per_tile(tmp_path: Path) -> None:
    import tifffile

    from gpupath.serve._tiles import MAX_READ_PX, TileTooCostly, _read_level_rgb, build_overview

    path = tmp_path / "flat.tif"  # one level, 5000 x 5000: a low DZI level would read all of it per tile
    tifffile.imwrite(path, np.full((5000, 5000, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
                     compression="deflate")
    from gpupath.slide import open_slide

    with open_slide(path, mpp=0.5) as slide:
        g = DziGeometry(5000, 5000)
        assert 5000 * 5000 > MAX_READ_PX
        with pytest.raises(TileTooCostly, match="gpupath convert"):
            _read_level_rgb(slide, g, 2, 0, 0, "cpu", None)  # 1 px per 2048 level-0 px: the whole slide
        assert _read_level_rgb(slide, g, g.max_level, 0, 0, "cpu", None).shape[-1] == 3
        ov = build_overview(slide, g)  # read strip by strip, at most MAX_READ_PX pixels each
        assert ov.downsample == 4 and ov.rgb.shape == (1250, 1250, 3) and (ov.rgb == 200).all()
        tile = _read_level_rgb(slide, g, 2, 0, 0, "cpu", None, overview=lambda: ov)
        w, h = g.level_dimensions(2)
        assert tile.shape == (h, w, 3) and (tile == 200).all()


def test_low_zoom_tiles_of_an_unpyramided_slide_come_from_one_bounded_overview(tmp_path: Path) -> None:
    """20 concurrent low-zoom tiles of a one-level 6000 x 6000 slide: all served (they were 404s or whole-slide
    reads of 48 MiB each), from one overview built once; the memory the server allocated for them stays under
    100 MiB (tracemalloc: NumPy and Pillow buffers included)."""
    import concurrent.futures as cf
    import tracemalloc

    import tifffile

    from gpupath.ingest import ingest

    ramp = np.broadcast_to((np.arange(6000, dtype=np.uint16) % 251).astype(np.uint8)[None, :, None], (6000, 6000, 3))
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.ascontiguousarray(ramp), tile=(512, 512), photometric="rgb", compression="jpeg",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")  # 0.5 µm/px
    store = tmp_path / "store"
    (stored,) = ingest([flat], store)
    assert stored.status == "stored", stored.reason
    app = create_app(store, cache_bytes=0)  # no tile cache: every request renders
    bg = serve_in_thread(app)
    try:
        g = DziGeometry(6000, 6000)
        wanted = [(level, col, row) for level in range(g.max_level - 5, g.max_level - 2)
                  for col in range(g.tile_count(level)[0]) for row in range(g.tile_count(level)[1])]
        wanted = (wanted * 20)[:20]
        tracemalloc.start()
        with cf.ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(lambda t: _get(bg, f"/dzi/{stored.sha256}_files/{t[0]}/{t[1]}_{t[2]}.jpeg")[0],
                                  wanted))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        bg.stop()
    assert codes == [200] * 20, codes
    assert app.state.gp.overviews_built == 1
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB allocated serving 20 low-zoom tiles"


def test_a_slide_file_gone_since_the_run_is_404_and_one_log_line(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from gpupath.batch import run_slides
    from gpupath.pipeline import RunParams
    from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

    path = tmp_path / "moved.svs"
    write_synthetic_slide(path, SyntheticSpec(width_px=1024, height_px=1024, mpp=0.25, seed=4), workers=1)
    [result] = run_slides([path], tmp_path / "out", RunParams(engine="classic", reports=False))
    assert result.status == "ok", result.error
    path.rename(tmp_path / "elsewhere.svs")  # the lab moved the scan after the run
    bg = serve_in_thread(create_app(tmp_path / "out", cache_bytes=2**20))
    try:
        with caplog.at_level("WARNING", logger="gpupath.serve"):
            codes = [_get(bg, f"/dzi/{result.slide_id}_files/{level}/0_0.jpeg")[0] for level in (10, 9)]
            status, body, _ = _get(bg, f"/dzi/{result.slide_id}_files/8/0_0.jpeg")
    finally:
        bg.stop()
    assert codes == [404, 404] and status == 404 and body == b"404 slide file not readable on the server"
    assert str(path) not in body.decode()  # the client learns no server paths
    lines = [r.getMessage() for r in caplog.records if r.name == "gpupath.serve"]
    assert len(lines) == 1 and result.slide_id in lines[0] and str(path) in lines[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])
def test_non_loopback_bind_needs_a_token(host: str) -> None:
    with pytest.raises(ConfigError, match="--token"):
        check_bind(host, None)
    check_bind(host, "t")
    for loop in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(loop, None)


def test_cli_refuses_public_bind_without_token(run_out: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "gpupath", "serve", str(run_out), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "--token" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_rejects_what_is_not_a_run_or_store(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "gpupath", "serve", str(tmp_path)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2 and "neither a run folder" in r.stderr


def test_slide_names_are_escaped(tmp_path: Path) -> None:
    name = '<script>alert("x")</script>&.svs'
    src = ServeSource("run", tmp_path, {"a" * 64: ServedSlide("a" * 64, tmp_path / "x.svs", name, 10, 10, 0.25, 3)})
    bg = serve_in_thread(create_app(src))
    try:
        status, body, headers = _get(bg, "/")
        assert status == 200 and b"<script>" not in body and b"&lt;script&gt;alert(&quot;x&quot;)" in body
        assert "default-src 'self'" in headers["content-security-policy"]
        assert json.loads(_get(bg, "/api/slides")[1])["slides"][0]["name"] == name   # JSON: data, shown as text
    finally:
        bg.stop()


def test_store_is_served_without_detections(tmp_path: Path) -> None:
    from gpupath.ingest import ingest
    from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

    path = tmp_path / "a.svs"
    write_synthetic_slide(path, SyntheticSpec(width_px=600, height_px=400, mpp=0.5, seed=1))
    ingest([path], tmp_path / "store")
    src = load_source(tmp_path / "store")
    [(sid, s)] = src.slides.items()
    assert src.kind == "store" and s.n_detections is None and s.path.is_relative_to((tmp_path / "store").resolve())
    bg = serve_in_thread(create_app(src))
    try:
        assert _get(bg, f"/dzi/{sid}_files/10/2_1.jpeg")[0] == 200
        assert json.loads(_get(bg, f"/api/detections/{sid}?x0=0&y0=0&x1=10&y1=10")[1])["n"] == 0
    finally:
        bg.stop()


# --- viewer in a browser -----------------------------------------------------------------------

@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: the headless-browser viewer test needs it")
def test_viewer_draws_tiles_and_boxes_in_chromium(server, run_out: Path, tmp_path: Path) -> None:
    from PIL import Image

    from gpupath.query import label_names, query
    from gpupath.slide import open_slide
    from gpupath.synthetic import read_nuclei

    _, bg = server
    sid = _slide_id(run_out)
    nuclei = read_nuclei(run_out.parent / "slide.svs")
    dets = query(run_out, slide=sid, bbox=(1000, 1000, 3000, 3000), min_score=0.5).to_pylist()
    # a detected nucleus: the box whose centre is nearest a true nucleus centre
    b = min(dets, key=lambda d: np.min(np.hypot(nuclei["x_px"] - (d["x0_px"] + d["x1_px"]) / 2,
                                                nuclei["y_px"] - (d["y0_px"] + d["y1_px"]) / 2)))
    cx, cy = round((b["x0_px"] + b["x1_px"]) / 2), round((b["y0_px"] + b["y1_px"]) / 2)
    shot = tmp_path / "viewer.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1000,800", "--virtual-time-budget=8000",
           f"{bg.url}/viewer#slide={sid}&level=12&x={cx}&y={cy}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "serve_viewer.png")
    px = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert px.shape == (800, 1000, 3)
    # level 12 = full resolution: screen (500, 400) is level-0 (cx, cy); tiles drawn 1:1
    with open_slide(run_out.parent / "slide.svs") as slide:
        patch = np.asarray(slide.read_region((cx + 200, cy - 300), 0, (200, 150)))[..., :3].astype(np.int16)
    screen = px[100:250, 700:900]
    assert np.abs(screen - patch).mean() < 8, np.abs(screen - patch).mean()
    # the box of the detected nucleus: its left and top edges are drawn in the label's colour
    left, top = round(b["x0_px"] - cx + 500), round(b["y0_px"] - cy + 400)
    mid_y, mid_x = round((b["y0_px"] + b["y1_px"]) / 2 - cy + 400), round((b["x0_px"] + b["x1_px"]) / 2 - cx + 500)

    from gpupath.report.colours import label_colours

    box_colour = label_colours(label_names(run_out))[b["label"]]   # the box's class colour, as the overlay's

    def is_box(y: int, x: int) -> bool:
        near = px[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3)
        return bool(np.any(np.all(np.abs(near - box_colour) < 60, axis=1)))

    assert is_box(mid_y, left) and is_box(top, mid_x)
    assert not is_box(mid_y, mid_x)   # inside: the nucleus itself (tile pixels), not the box


# --- load test (tiny) --------------------------------------------------------------------------

def test_bench_serve_runs_tiny(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).parents[1] / "bench" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    store = bench.make_store(tmp_path, 1024)
    r = bench.run_load(store, clients=2, requests=40, cache_mb=1)
    assert r["errors"] == 0 and r["requests"] == 40 and r["clients"] == 2
    # the pyramid it drew from, by hand: 1024 px -> DZI levels 0..10 of 1, 2, ..., 1024 px, 254 px tiles:
    # 5 x 5 at 1024 px, 3 x 3 at 512, 2 x 2 at 256 and one tile each at the 8 levels of 128 px and less
    assert r["slide_px"] == [1024, 1024] and r["dzi_levels"] == 11 and r["tiles_in_pyramid"] == 25 + 9 + 4 + 8
    # timings: present and finite; the rate is the 40 requests over the wall seconds (both rounded:
    # wall_s to 1 ms, tiles_per_s to 0.1); no request took longer than the whole load
    wall_s = r["wall_s"]
    assert isinstance(wall_s, float) and math.isfinite(wall_s) and wall_s >= 0.001
    lo, hi = 40 / (wall_s + 0.0005), 40 / max(wall_s - 0.0005, 1e-9)
    assert lo - 0.05 <= r["tiles_per_s"] <= hi + 0.05, (r["tiles_per_s"], wall_s)
    lat = r["latency_ms"]
    assert all(math.isfinite(lat[k]) for k in ("p50", "p90", "p99", "max"))
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] <= wall_s * 1000 + 0.5 + 0.005, lat
    assert set(r["server_rss_mb"]) == {"start", "after_warmup", "end", "peak"}
    assert all(math.isfinite(v) and v > 0 for v in r["server_rss_mb"].values()), r["server_rss_mb"]
    md = bench.markdown(r)
    assert "tiles/s" in md and f"| {r['tiles_per_s']} | {lat['p50']} |" in md


# --- issue 18, item 10: small holes ------------------------------------------------------------

def test_a_token_outside_latin1_logs_in_and_its_cookie_works(run_out: Path) -> None:
    """A token of any Unicode text: ``?token=`` (percent-encoded UTF-8) logs in and sets a cookie that works
    (it was a 500: a header is Latin-1)."""
    import urllib.parse

    token = "clé-日本-ü"
    bg = serve_in_thread(create_app(run_out, token=token), token=token)
    try:
        status, _, headers = _get(bg, "/viewer?token=" + urllib.parse.quote(token))
        assert status == 200, status
        jar = {"Cookie": headers["set-cookie"].split(";")[0]}
        assert _get(bg, "/api/slides", jar)[0] == 200
        assert _get(bg, "/api/slides", {"Cookie": "gpupath_token=" + urllib.parse.quote("clé-日本-x")})[0] == 401
    finally:
        bg.stop()


def test_no_redirect_built_from_the_host_header(server) -> None:
    """``/viewer/`` with a forged Host: a 404 here, not a redirect to that host."""
    _, bg = server
    status, _, headers = _get(bg, "/viewer/", {"Host": "evil.example"})
    assert status == 404 and "evil.example" not in headers.get("location", ""), (status, headers)


def test_a_damaged_detections_partition_is_a_503_not_a_500(run_out: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_out, copy)
    sid = _slide_id(copy)
    part = copy / "detections" / f"slide_id={sid}" / "part-0.parquet"
    data = bytearray(part.read_bytes())
    data[8:len(data) - 1024] = bytes(len(data) - 1032)  # data pages zeroed, footer kept: opens, cannot be read
    part.write_bytes(bytes(data))
    bg = serve_in_thread(create_app(copy))
    try:
        status, body, _ = _get(bg, f"/api/detections/{sid}?x0=0&y0=0&x1=4096&y1=4096")
        assert status == 503 and b"damaged" in body, (status, body[:200])
        assert _get(bg, "/api/slides")[0] == 200  # the server goes on
    finally:
        bg.stop()


def test_a_busy_port_is_one_line_before_any_serving_line(run_out: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "gpupath", "serve", str(run_out), "--port", str(port),
                               "--device", "cpu"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "serving" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert f"--port {port}" in line and "in use" in line, line


# --- issue 18, item 6: half-sent requests ------------------------------------------------------

def test_half_sent_requests_are_closed_and_others_still_served(server, run_out: Path) -> None:
    """Slowloris: 20 connections that send part of their headers and stop. A normal request is still
    answered meanwhile, and each half-sent one is closed within 20 s (the header deadline is 10 s)."""
    import socket
    import time

    from gpupath.serve import HEADER_TIMEOUT_S

    _, bg = server
    held = []
    for _ in range(20):
        s = socket.create_connection((bg.host, bg.port), timeout=30)
        s.sendall(b"GET /api/slides HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        held.append(s)
    t0 = time.monotonic()
    sid = _slide_id(run_out)
    status, body, _ = _get(bg, f"/dzi/{sid}_files/12/0_0.jpeg")
    assert status == 200 and body[:2] == b"\xff\xd8"  # a tile, while 20 half-sent requests wait
    closed_after = []
    for s in held:
        s.settimeout(max(0.1, 20 - (time.monotonic() - t0)))
        try:
            assert s.recv(1024) == b""  # closed by the server, no response to a request never finished
        finally:
            s.close()
        closed_after.append(time.monotonic() - t0)
    assert max(closed_after) < 20 and min(closed_after) >= HEADER_TIMEOUT_S - 1, closed_after


def test_a_slide_changed_since_it_was_recorded_is_not_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A store's slide whose bytes changed since ingest: its first tile is a 404 and one log line (the file is
    hashed once, when first opened), never tiles of another image; the unchanged slide is served."""
    from gpupath.ingest import ingest

    store = tmp_path / "store"
    results = ingest([shutil.copy(data_file("cmu-1-small-region.svs"), tmp_path / "a.svs"),
                      shutil.copy(data_file("OS-2-ndpi.ome.tif"), tmp_path / "b.ome.tif")], store)
    assert [r.status for r in results] == ["stored", "stored"], [r.reason for r in results]
    changed, kept = results
    stored = Path(changed.stored_path)
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    app = create_app(store)
    bg = serve_in_thread(app)
    try:
        with caplog.at_level("WARNING", logger="gpupath.serve"):
            status, body, _ = _get(bg, f"/dzi/{changed.sha256}_files/8/0_0.jpeg")
            again = _get(bg, f"/dzi/{changed.sha256}_files/7/0_0.jpeg")[0]
        good = _get(bg, f"/dzi/{kept.sha256}_files/8/0_0.jpeg")[0]
    finally:
        bg.stop()
    assert (status, again, good) == (404, 404, 200) and body == b"404 slide file not readable on the server"
    lines = [r.getMessage() for r in caplog.records if r.name == "gpupath.serve"]
    assert len(lines) == 1 and "changed since it was recorded" in lines[0], lines
