"""Reports: overlay drawing, summaries against the Parquet tables, HTML escaping, and the pages as
headless Chromium renders them (Debian's ``chromium``, started here; skipped when it is absent)."""

from __future__ import annotations

import base64
import html.parser
import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from gpupath.errors import ConfigError
from gpupath.batch import run_slides
from gpupath.pipeline import RunParams
from gpupath.report import (
    build_reports,
    render_overlay,
    slide_report_html,
    slide_thumbnail,
    write_slide_outputs,
)
from gpupath.report.overlay import (
    HEATMAP_CELL_PX,
    SCALE_BAR_COLOUR,
    TISSUE_COLOUR,
    nice_length_um,
)
from gpupath.report.colours import label_colour
from gpupath.report.summary import label_counts, read_run
from gpupath.slide import open_slide
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

HOSTILE_TITLE = '<script>alert(1)</script> & "q"'
HOSTILE_NAME = "slide<img src=x onerror=alert(1)>.svs"       # a legal file name
MISSING_NAME = "missing<b onmouseover=alert(2)>.svs"


def chromium() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if exe is None:
        pytest.skip("headless Chromium not installed (/usr/bin/chromium; Debian: apt-get install chromium)")
    return exe


def run_chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium, headless, offline, on a fresh profile: the page as a user's browser opens it from disk."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def screenshot(page: Path, tmp: Path, name: str, *, window: tuple[int, int] = (1400, 2400)) -> np.ndarray:
    png = tmp / f"{name}.png"
    # virtual time: the screenshot waits until the page has settled (images decoded, fonts laid out);
    # without it a loaded CI machine once caught one of two shots mid-layout
    run_chromium(page, tmp, f"--screenshot={png}", f"--window-size={window[0]},{window[1]}",
                 "--virtual-time-budget=10000")
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


class DomParser(html.parser.HTMLParser):
    """Tags with their attributes, and the text inside each element that has an id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text_by_id: dict[str, str] = defaultdict(str)
        self._open: list[tuple[str, str | None]] = []
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in ("img", "meta", "br", "link", "input", "hr"):
            self._open.append((tag, dict(attrs).get("id")))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text += data
        for _, ident in self._open:
            if ident:
                self.text_by_id[ident] += data


def parse(markup: str) -> DomParser:
    parser = DomParser()
    parser.feed(markup)
    parser.close()
    return parser


def assert_inert(dom: DomParser) -> None:
    """No script, no event handler, no URL that leaves the page's own folder."""
    for tag, attrs in dom.tags:
        assert tag not in ("script", "iframe", "object", "embed", "base"), (tag, attrs)
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        if tag == "img":
            assert (attrs.get("src") or "").startswith("data:image/"), attrs
        if tag == "a":
            assert not re.match(r"^[a-z][a-z0-9+.-]*:", attrs.get("href") or "", re.IGNORECASE), attrs


@dataclass
class Run:
    out: Path
    slide: Path
    slide_id: str
    run: dict


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A real run of a small synthetic slide whose file name and TIFF description hold markup, plus a
    missing slide with markup in its name; reports built from the run folder."""
    tmp = tmp_path_factory.mktemp("report-run")
    slide = tmp / HOSTILE_NAME
    write_synthetic_slide(slide, SyntheticSpec(width_px=2048, height_px=2048, mpp=0.5, seed=1))
    description = tifffile.tiffcomment(slide)
    tifffile.tiffcomment(slide, f"{description}|Title = {HOSTILE_TITLE}")  # Aperio key -> aperio.Title
    out = tmp / "out"
    results = run_slides([slide, tmp / MISSING_NAME], out, RunParams(engine="onnxruntime"))
    assert [r.status for r in results] == ["ok", "failed"], results
    build_reports(out)
    return Run(out=out, slide=slide, slide_id=results[0].slide_id, run=read_run(out))


def detections_of(run: Run) -> pa.Table:
    return pq.read_table(run.out / "detections" / f"slide_id={run.slide_id}" / "part-0.parquet")


# ---------------------------------------------------------------- overlay drawing (known answers)

@pytest.mark.parametrize(("max_um", "expected"), [(600.0, 500.0), (199.0, 100.0), (2.5, 2.0), (1000.0, 1000.0),
                                                  (0.07, 0.05), (12345.0, 10000.0)])
def test_nice_length_um(max_um: float, expected: float) -> None:
    assert nice_length_um(max_um) == pytest.approx(expected)


def test_nice_length_um_rejects_nonpositive() -> None:
    with pytest.raises(ValueError, match="max_um must be positive"):
        nice_length_um(0.0)


def test_scale_bar_length_and_place() -> None:
    # 6000 x 4000 px at 0.5 µm/px on a 300 x 200 thumbnail: 10 µm per overlay px; a fifth of the
    # width is 600 µm -> a 500 µm bar, 50 px long
    thumb = np.full((200, 300, 3), 200, np.uint8)
    ov = render_overlay(thumb, level0_size=(6000, 4000), mpp=0.5, boxes_l0=np.zeros((0, 4)))
    assert ov.image.size == (300, 200) and ov.mode == "none"
    assert ov.scale_bar_um == 500.0 and ov.scale_bar_px == 50
    arr = np.asarray(ov.image)
    x, y = ov.scale_bar_xy
    assert y > 150 and x < 20  # bottom left
    row = arr[y, :, :]
    black = np.flatnonzero((row == SCALE_BAR_COLOUR).all(axis=1))
    assert black.min() == x and black.max() == x + 49  # exactly 50 px of bar on its top row
    assert (row[x + 50] == 255).all()  # then the white box behind it
    label = arr[y - 20 : y, x : x + 60]
    assert (label.max(axis=-1) < 100).sum() > 10  # the label "500 µm" drawn above the bar (anti-aliased)


def test_no_scale_bar_without_mpp() -> None:
    thumb = np.full((200, 300, 3), 200, np.uint8)
    ov = render_overlay(thumb, level0_size=(6000, 4000), mpp=None, boxes_l0=np.zeros((0, 4)))
    assert ov.scale_bar_um is None and ov.scale_bar_px == 0
    assert (np.asarray(ov.image) == 200).all()  # nothing drawn


def test_boxes_drawn_at_thumbnail_scale() -> None:
    thumb = np.full((100, 100, 3), 255, np.uint8)
    boxes = np.array([[200.0, 300.0, 400.0, 500.0], [700.0, 700.0, 712.0, 712.0]])  # level-0 px, 10 px -> 1 px
    ov = render_overlay(thumb, level0_size=(1000, 1000), mpp=None, boxes_l0=boxes, labels=np.array([0, 1]))
    arr = np.asarray(ov.image)
    c0, c1 = label_colour(0), label_colour(1)
    assert ov.mode == "boxes" and ov.n_drawn == 2
    for x, y in ((20, 30), (39, 30), (20, 49), (39, 49), (30, 30), (20, 40)):  # the outline of [20, 40) x [30, 50)
        assert tuple(arr[y, x]) == c0, (x, y)
    assert tuple(arr[40, 30]) == (255, 255, 255)  # inside: the slide shows through
    assert tuple(arr[50, 30]) == (255, 255, 255) and tuple(arr[30, 40]) == (255, 255, 255)  # half-open
    assert tuple(arr[70, 70]) == c1  # the 1.2-px box is a dot


def test_heatmap_when_too_dense() -> None:
    thumb = np.full((100, 100, 3), 255, np.uint8)
    # 1000 detections centred at level-0 (525, 525) -> overlay (52.5, 52.5): one heatmap cell
    boxes = np.tile([520.0, 520.0, 530.0, 530.0], (1000, 1))
    ov = render_overlay(thumb, level0_size=(1000, 1000), mpp=0.5, boxes_l0=boxes)
    assert ov.mode == "heatmap"
    cell = ov.heatmap_cell_px
    assert cell == 10  # sqrt(HEATMAP_PER_CELL * 10,000 px² / 1000 detections)
    cell_mm2 = (cell * 10 * 0.5 / 1000) ** 2  # 10 overlay px = 100 level-0 px = 50 µm
    assert ov.heatmap_max_per_mm2 == pytest.approx(1000 / cell_mm2)
    arr = np.asarray(ov.image).astype(int)
    inside = arr[50:60, 50:60].reshape(-1, 3)  # cell (5, 5) holds them all
    assert (inside == inside[0]).all() and (inside[0] < 250).any()  # the cell is coloured, evenly
    assert (arr[40:50, 30:70] == 255).all() and (arr[60:70, 30:70] == 255).all()  # empty cells are not
    sparse = render_overlay(thumb, level0_size=(1000, 1000), mpp=0.5, boxes_l0=boxes[:100])
    assert sparse.mode == "dots" and sparse.heatmap_cell_px == 0  # one per 100 px²: drawn one by one


def test_heatmap_cells_shrink_with_density() -> None:
    thumb = np.full((512, 512, 3), 255, np.uint8)
    rng = np.random.default_rng(1)
    cells = []
    for n in (20_000, 200_000):
        xy = rng.uniform(0, 5120, (n, 2))
        ov = render_overlay(thumb, level0_size=(5120, 5120), mpp=0.5, boxes_l0=np.concatenate([xy, xy + 8], axis=1))
        assert ov.mode == "heatmap"
        cells.append(ov.heatmap_cell_px)
    assert cells == [12, HEATMAP_CELL_PX]  # ceil(sqrt(10 * 512² / n)), at least HEATMAP_CELL_PX


def test_heatmap_threshold_uses_tissue_area() -> None:
    thumb = np.full((100, 100, 3), 255, np.uint8)
    rng = np.random.default_rng(0)
    xy = rng.uniform(400, 600, (300, 2))
    boxes = np.concatenate([xy, xy + 5], axis=1)
    tissue = np.zeros((50, 50), bool)
    tissue[20:30, 20:30] = True  # 20 x 20 overlay px of tissue = 400 px²
    assert render_overlay(thumb, level0_size=(1000, 1000), mpp=0.5, boxes_l0=boxes).mode != "heatmap"
    ov = render_overlay(thumb, level0_size=(1000, 1000), mpp=0.5, boxes_l0=boxes, tissue=tissue)
    assert ov.mode == "heatmap"  # 300 detections on 400 px² of tissue: too dense to draw one by one


def test_tissue_outline() -> None:
    thumb = np.full((100, 100, 3), 255, np.uint8)
    tissue = np.zeros((50, 50), bool)  # half the overlay's resolution: resized, nearest
    tissue[10:40, 15:35] = True
    ov = render_overlay(thumb, level0_size=(1000, 1000), mpp=None, boxes_l0=np.zeros((0, 4)), tissue=tissue)
    arr = np.asarray(ov.image)
    outline = (arr == TISSUE_COLOUR).all(axis=-1)
    assert ov.tissue_outline
    assert outline[20:80, 30].all() and outline[20:80, 69].all() and outline[20, 30:70].all()
    assert not outline[25:75, 35:65].any() and not outline[:15].any()


def test_render_overlay_validates() -> None:
    with pytest.raises(ValueError, match=r"thumbnail must be \(H, W, 3\) uint8"):
        render_overlay(np.zeros((10, 10), np.uint8), level0_size=(10, 10), mpp=1.0, boxes_l0=np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"labels must be \(1,\)"):
        render_overlay(np.zeros((10, 10, 3), np.uint8), level0_size=(10, 10), mpp=1.0,
                       boxes_l0=np.ones((1, 4)), labels=np.zeros(2))


def test_slide_thumbnail_keeps_aspect(tmp_path: Path) -> None:
    path = tmp_path / "wide.svs"
    write_synthetic_slide(path, SyntheticSpec(width_px=1536, height_px=1024, mpp=0.5, seed=3))
    with open_slide(path) as slide:
        thumb = slide_thumbnail(slide, max_px=256)
    assert thumb.shape == (171, 256, 3) and thumb.dtype == np.uint8  # 1024 * 256 / 1536 = 170.7
    assert thumb.std() > 5  # tissue, not a blank canvas


def test_label_counts_keeps_every_class() -> None:
    labels = pa.DictionaryArray.from_arrays(pa.array([0, 2, 2], pa.int16()), pa.array(["a", "b", "c"]))
    table = pa.table({"label": labels})
    counts, index = label_counts(table, ["a", "b", "c", "d"])
    assert counts == {"a": 1, "b": 0, "c": 2, "d": 0}
    assert index.tolist() == [0, 2, 2]
    counts, index = label_counts(table, ["c"])  # the table's own names follow the given ones
    assert counts == {"c": 2, "a": 1, "b": 0} and index.tolist() == [1, 0, 0]


# ---------------------------------------------------------------- files of a real run

def test_run_outputs(hostile_run: Run) -> None:
    out, sid = hostile_run.out, hostile_run.slide_id
    for rel in (f"overlays/{sid}.png", f"summaries/{sid}.json", f"reports/{sid}.html", "index.html"):
        assert (out / rel).is_file(), rel
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    with Image.open(out / "overlays" / f"{sid}.png") as img:
        assert img.size == (1024, 1024) and img.mode == "RGB"  # 2048 x 2048 slide, <= 1024 px


def test_summary_matches_parquet(hostile_run: Run) -> None:
    out, sid = hostile_run.out, hostile_run.slide_id
    summary = json.loads((out / "summaries" / f"{sid}.json").read_text())
    result = next(r for r in hostile_run.run["slides"] if r["slide_id"] == sid)
    det = detections_of(hostile_run)
    names = det.column("label").to_pylist()
    expected = {name: names.count(name) for name in hostile_run.run["environment"]["detector"]["classes"]}
    assert summary["counts"] == expected and sum(expected.values()) == det.num_rows > 100
    assert summary["n_detections"] == det.num_rows == result["n_detections"]
    assert summary["tissue_mm2"] == result["tissue_mm2"] > 0
    for label, n in expected.items():
        assert summary["density_per_mm2"][label] == pytest.approx(n / result["tissue_mm2"])
    assert summary["density_total_per_mm2"] == pytest.approx(det.num_rows / result["tissue_mm2"])
    tiles = pq.read_table(out / "tiles" / f"slide_id={sid}" / "part-0.parquet")
    assert summary["n_tiles"] == tiles.num_rows == result["n_tiles"]
    assert summary["timings_s"] == result["timings"] and set(summary["timings_s"]) >= {"tissue", "detect"}
    assert summary["overlay"]["mode"] == "boxes" and summary["overlay"]["scale_bar_um"] == 200.0
    # every class of the detector, in its order, with the colour it is drawn in and a legend in the image
    classes = hostile_run.run["environment"]["detector"]["classes"]
    assert list(summary["counts"]) == list(summary["density_per_mm2"]) == classes
    assert summary["overlay"]["class_colours"] == {name: list(label_colour(i)) for i, name in enumerate(classes)}
    assert summary["overlay"]["legend"] is True
    assert summary["slide_metadata"]["aperio.Title"] == HOSTILE_TITLE


def test_report_in_chromium(hostile_run: Run, tmp_path: Path) -> None:
    """The report as Chromium shows it: counts and escaped metadata in the DOM, the overlay decoded."""
    out, sid = hostile_run.out, hostile_run.slide_id
    page = out / "reports" / f"{sid}.html"
    summary = json.loads((out / "summaries" / f"{sid}.json").read_text())
    dom = parse(run_chromium(page, tmp_path, "--dump-dom").stdout)
    assert_inert(dom)
    n = summary["n_detections"]
    assert dom.text_by_id["n-detections"].strip() == f"{n:,}"
    assert dom.text_by_id["count-0"].strip() == f"{next(iter(summary['counts'].values())):,}"
    assert dom.text_by_id["tissue-mm2"].strip() == f"{summary['tissue_mm2']:,.3f}"
    assert HOSTILE_TITLE in dom.text_by_id["metadata"]  # the slide's free text, shown as text
    assert HOSTILE_NAME in dom.text_by_id["slide-name"]
    imgs = [attrs for tag, attrs in dom.tags if tag == "img"]
    assert [a.get("id") for a in imgs] == ["overlay"]

    # The overlay decoded and is shown pixel for pixel: screenshot the page, then the same page
    # with the overlay swapped for a flat image of the same size (same layout); where the two
    # differ is the overlay's box, and there the first screenshot must be the overlay PNG itself.
    # A broken or blocked image (icon + alt text) fails the comparison.
    overlay = np.asarray(Image.open(out / "overlays" / f"{sid}.png").convert("RGB")).astype(np.int16)
    source = page.read_text(encoding="utf-8")
    data_uri = re.search(r'src="(data:image/png;base64,[^"]+)"', source).group(1)
    assert base64.b64decode(data_uri.split(",", 1)[1]) == (out / "overlays" / f"{sid}.png").read_bytes()
    flat = tmp_path / "flat.png"
    Image.new("RGB", overlay.shape[1::-1], (255, 0, 255)).save(flat)
    twin = page.with_name(f"flat-{sid}.html")
    twin.write_text(source.replace(data_uri, "data:image/png;base64," + base64.b64encode(flat.read_bytes()).decode()),
                    encoding="utf-8")
    try:
        # a first Chromium start on a fresh machine may still be building its font cache: a throwaway
        # shot first, so the two compared shots lay text out with the same fonts
        screenshot(twin, tmp_path, "warm-up")
        shown, flat_shot = screenshot(page, tmp_path, "report"), screenshot(twin, tmp_path, "flat")
    finally:
        twin.unlink()
    rows, cols = np.nonzero((shown != flat_shot).any(axis=-1))
    assert rows.size, "the page looks the same with and without the overlay: the image was not drawn"
    box = shown[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.shape == overlay.shape, (box.shape, overlay.shape)
    assert np.abs(box - overlay).mean() < 2.0
    assert (flat_shot[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] == (255, 0, 255)).all()


def test_index_in_chromium(hostile_run: Run, tmp_path: Path) -> None:
    out, sid = hostile_run.out, hostile_run.slide_id
    dom = parse(run_chromium(out / "index.html", tmp_path, "--dump-dom").stdout)
    assert_inert(dom)
    assert not [t for t, _ in dom.tags if t == "b"]  # the failed slide's name is text, not markup
    failed = dom.text_by_id["failed"]
    assert MISSING_NAME in failed and "no such file" in failed
    links = [attrs["href"] for tag, attrs in dom.tags if tag == "a"]
    assert links == [f"reports/{sid}.html"]
    thumbs = [attrs["src"] for tag, attrs in dom.tags if tag == "img"]
    assert len(thumbs) == 1 and thumbs[0].startswith("data:image/jpeg;base64,")
    assert dom.text_by_id["n-ok"] == "1" and dom.text_by_id["n-failed"] == "1"
    assert dom.text_by_id["device"] == "cpu"
    det = hostile_run.run["environment"]["detector"]
    assert det["model_sha256"] in dom.text_by_id["detector"] and det["engine"] in dom.text_by_id["detector"]
    assert '"engine": "onnxruntime"' in dom.text_by_id["params"]
    assert f"{detections_of(hostile_run).num_rows:,}" in dom.text_by_id["slide-0"]


def test_html_escapes_every_run_string() -> None:
    evil = '<script>x</script>"\'&'
    summary = {"file_name": evil, "path": evil, "status": evil, "warning": evil, "vendor": evil, "backend": evil,
               "slide_id": evil, "counts": {evil: 3}, "density_per_mm2": {evil: 1.0}, "n_detections": 3,
               "timings_s": {evil: 1.0}, "overlay": {"note": evil, "mode": "boxes", "width_px": 4, "height_px": 4},
               "slide_metadata": {evil: evil}, "notes": [evil]}
    env = {"device": evil, "detector": {"model": evil, "classes": [evil], "notes": [evil]}, evil: evil}
    page = slide_report_html(summary, overlay_png=b"\x89PNG", params={"model": evil}, environment=env)
    assert "<script" not in page and "</script" not in page
    assert page.count("&lt;script&gt;") >= 12
    dom = parse(page)
    assert_inert(dom)
    assert [a["data-label"] for t, a in dom.tags if "data-label" in a] == [evil]  # attribute value intact


def test_write_slide_outputs_rejects_failed_slide(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only processed slides get reports"):
        write_slide_outputs(tmp_path, {"path": "x.svs", "status": "failed", "slide_id": ""}, params={},
                            environment={})


def test_build_reports_without_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no run.json"):
        build_reports(tmp_path)


def test_build_reports_unknown_slide(hostile_run: Run) -> None:
    with pytest.raises(ConfigError, match="no slide matches 'nope'"):
        build_reports(hostile_run.out, slides=["nope"])


def test_slide_gone_blank_canvas(hostile_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(hostile_run.out, out, ignore=shutil.ignore_patterns(".gpupath.lock"))
    run = json.loads((out / "run.json").read_text())
    run["slides"][0]["path"] = str(tmp_path / "moved-away.svs")
    (out / "run.json").write_text(json.dumps(run))
    written = build_reports(out, slides=[hostile_run.slide_id[:12]])
    sid = hostile_run.slide_id
    assert [p.relative_to(out).as_posix() for p in written] == [
        f"overlays/{sid}.png", f"summaries/{sid}.json", f"reports/{sid}.html", f"geojson/{sid}.geojson", "index.html"]
    summary = json.loads((out / "summaries" / f"{sid}.json").read_text())
    assert "not readable" in summary["overlay"]["note"] and "moved-away.svs" in summary["overlay"]["note"]
    assert summary["slide_metadata"]["aperio.Title"] == HOSTILE_TITLE  # kept from the earlier summary
    assert summary["counts"] == json.loads((hostile_run.out / "summaries" / f"{sid}.json").read_text())["counts"]
    arr = np.asarray(Image.open(out / "overlays" / f"{sid}.png").convert("RGB"))
    assert arr.shape == (1024, 1024, 3) and (arr == 232).all(axis=-1).mean() > 0.5  # blank canvas, boxes on it
    assert "blank canvas" in (out / "reports" / f"{sid}.html").read_text()


def gpupath(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpupath", *map(str, args)], capture_output=True, text=True, check=False,
                          timeout=300)


def test_cli_report(hostile_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(hostile_run.out, out, ignore=shutil.ignore_patterns(".gpupath.lock"))
    for rel in ("index.html", "reports", "overlays", "summaries"):
        target = out / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    proc = gpupath("report", out)
    assert proc.returncode == 0, proc.stderr
    assert "1 slide reports, 0 failed" in proc.stdout
    assert (out / "index.html").is_file() and (out / "reports" / f"{hostile_run.slide_id}.html").is_file()

    proc = gpupath("report", tmp_path / "empty")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no run.json" in lines[0]


# ---------------------------------------------------------------- classes: legend and totals

def test_overlay_legend_names_every_class_in_its_colour() -> None:
    thumb = np.full((400, 400, 3), 230, np.uint8)
    boxes = np.array([[100, 100, 120, 120], [300, 300, 320, 320], [500, 520, 520, 540]], np.float64)
    names = ["inflammatory", "epithelial", "stromal"]
    ov = render_overlay(thumb, level0_size=(800, 800), mpp=0.5, boxes_l0=boxes, labels=np.array([0, 0, 2]),
                        label_names=names)
    assert ov.mode == "boxes" and ov.legend_labels == tuple(names) and ov.legend_box is not None
    x0, y0, x1, y1 = ov.legend_box
    assert x1 >= 390 and y0 < 100          # top right
    legend = np.asarray(ov.image)[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3)
    for i in range(3):                     # a swatch per class, the absent "epithelial" included
        assert (legend == label_colour(i)).all(axis=1).sum() >= 25, names[i]
    # without names: no legend (the report then lists the classes)
    assert render_overlay(thumb, level0_size=(800, 800), mpp=0.5, boxes_l0=boxes).legend_box is None


def test_index_totals_classes_over_slides() -> None:
    from gpupath.report.html import index_html

    def row(name: str, counts: dict[str, int], tissue: float) -> dict:
        return {"result": {"status": "ok", "path": f"/s/{name}.svs", "slide_id": name * 8},
                "summary": {"counts": counts, "n_detections": sum(counts.values()), "tissue_mm2": tissue,
                            "density_per_mm2": {k: v / tissue for k, v in counts.items()}}}

    rows = [row("a", {"inflammatory": 10, "epithelial": 30, "stromal": 0}, 2.0),
            row("b", {"inflammatory": 5, "epithelial": 0, "stromal": 15}, 3.0)]
    dom = parse(index_html({"slides": [r["result"] for r in rows]}, rows))
    assert [dom.text_by_id[f"class-count-{i}"].strip() for i in range(3)] == ["15", "30", "15"]
    assert [dom.text_by_id[f"class-density-{i}"].strip() for i in range(3)] == ["3.0", "6.0", "3.0"]  # per 5 mm²
