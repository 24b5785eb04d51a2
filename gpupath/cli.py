"""`gpupath` command line (Typer): parses arguments, calls the stages, sets exit codes.

Exit codes: 0 all slides done; 1 some slides failed (each named with its reason on stderr and in
slides.parquet); 2 bad arguments.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gpupath._version import __version__
from gpupath.errors import one_line

if TYPE_CHECKING:
    from gpupath.pipeline import SlideResult
    from gpupath.run_plan import RunOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="GPU-native whole-slide image pipeline: read, tissue, tiles, stain, detect, Parquet.")
out_console = Console()
err_console = Console(stderr=True)

DEFAULT_DEMO_DIR = Path("gpupath-demo")


class _OneLineFormatter(logging.Formatter):
    """Log records as one line each (a file name's control characters escaped); a traceback, when one is
    attached, follows on its own lines as usual."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("gpupath")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its parse warnings reappear in our one-line errors


def _say(console: Console, text: str) -> None:
    """Print one line: control characters in it (a file name's newline) escaped by :func:`one_line`."""
    console.print(one_line(text), markup=False, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    _say(err_console, f"error: {message}")
    return typer.Exit(code)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    _setup_logging(verbose)


@app.command()
def version() -> None:
    """Print the gpupath version."""
    out_console.print(__version__)


@app.command()
def info(
    slides: Annotated[list[Path], typer.Argument(help="Slide files.", readable=False)],
    backend: Annotated[str, typer.Option(help="auto | cucim | openslide | tifffile")] = "auto",
    mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px to use instead of the metadata.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table (a list for several).")] = False,
) -> None:
    """Show slides' levels, resolution, vendor and the backend that reads them (the first tile of each level
    is decoded: a slide that cannot be is one error line, exit 1; the others are still shown)."""
    from gpupath.errors import GpupathError
    from gpupath.slide import describe_slide

    described, failed = [], 0
    for slide in slides:
        try:
            described.append(describe_slide(slide, backend=backend, mpp=mpp))  # type: ignore[arg-type]
        except (GpupathError, ValueError) as exc:
            failed += 1
            _say(err_console, f"error: {exc}")
    if as_json:
        if described:
            out_console.print_json(json.dumps(described[0] if len(slides) == 1 else described))
    else:
        for data in described:
            _print_info(data)
    if failed:
        raise typer.Exit(1)


def _print_info(data: dict) -> None:
    from gpupath.slide import mpp_plausible

    table = Table(title=one_line(f"{Path(data['path']).name}  ({data['vendor']}, read by {data['backend']})"))
    for col in ("level", "width", "height", "downsample", "µm/px"):
        table.add_column(col, justify="right")
    for lv in data["levels"]:
        table.add_row(str(lv["level"]), str(lv["width"]), str(lv["height"]), f"{lv['downsample']:.3f}",
                      "?" if lv["mpp"] is None else f"{lv['mpp']:.4f}")
    out_console.print(table)
    mpp = data["mpp"]
    if mpp is not None and not mpp_plausible(mpp):
        mpp = f"{mpp:.4g} (implausible for a scan: run needs --mpp)"
    _say(out_console, f"mpp: {mpp if mpp is not None else 'unknown (pass --mpp)'}; "
                      f"objective: {data['objective_power'] or '?'}; associated: "
                      f"{', '.join(data['associated_images']) or '-'}")


class _RunProgress:
    """Rich progress of a batch: one bar for the slides (when several), one per slide's tiles; errors,
    warnings and notes printed above the bars as they come."""

    def __init__(self, progress: Progress, n_slides: int) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.overall = progress.add_task("slides", total=n_slides, unit="slides", rate="") if n_slides > 1 else None

    def _line(self, text: str) -> None:
        _say(self.progress.console, text)

    def on_progress(self, p: dict) -> None:
        if self.overall is None:
            return
        eta = "-" if p["eta_s"] is None else f"{p['eta_s'] / 60:.1f} min"
        self.progress.update(self.overall, completed=p["slides_total"] - p["slides_left"],
                             rate=f"{p['slides_failed']} failed, {p['slides_resumed']} resumed, "
                                  f"{p['tiles_per_s']:.1f} tiles/s, ETA {eta}")

    def on_tiles(self, path: str, done: int, total: int) -> None:
        if path not in self.tasks:
            self.tasks[path] = self.progress.add_task(one_line(Path(path).name)[:40], total=total, unit="tiles", rate="")
            self.started[path] = time.perf_counter()
        rate = done / max(time.perf_counter() - self.started[path], 1e-9)
        self.progress.update(self.tasks[path], completed=done, rate=f"{rate:.1f} tiles/s")

    def on_slide(self, res: SlideResult) -> None:
        if res.status != "ok":
            self._line(f"error: {res.error}")
        elif res.warning:
            self._line(f"warning: {res.path}: {res.warning}")

    def on_note(self, note: str) -> None:
        self._line(f"note: {note}")


def _print_run_summary(results: list[SlideResult], out: Path, elapsed: float) -> None:
    table = Table(title=one_line(f"gpupath run -> {out}"))
    for col in ("slide", "status", "tiles", "detections", "tissue mm²", "seconds"):
        table.add_column(col, justify="right" if col not in ("slide", "status") else "left")
    for r in results:
        table.add_row(one_line(Path(r.path).name), r.status + (" (resumed)" if r.resumed else ""), str(r.n_tiles),
                      str(r.n_detections),
                      "-" if r.tissue_mm2 is None else f"{r.tissue_mm2:.2f}", f"{r.seconds:.1f}")
    out_console.print(table)
    n_tiles = sum(r.n_tiles for r in results if not r.resumed)
    failed = sum(r.status != "ok" for r in results)
    resumed = sum(r.resumed for r in results)
    _say(out_console, f"{len(results) - failed} ok ({resumed} resumed from an earlier run), {failed} failed; "
                      f"{n_tiles} tiles in {elapsed:.1f} s ({n_tiles / max(elapsed, 1e-9):.1f} tiles/s); "
                      f"outputs in {out}")


def _run(options: RunOptions) -> int:
    """Run one validated plan with progress bars; 1 when any slide failed."""
    from gpupath.batch import run_batch
    from gpupath.errors import ConfigError, ResultsError
    from gpupath.run_plan import plan_run

    def warn(line: str) -> None:
        _say(err_console, f"warning: {line}")

    try:
        plan = plan_run(options, warn=warn)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if plan.device_note:
        err_console.print(plan.device_note, highlight=False)
    for line in plan.refused:  # manifest rows of a store that are not read (the run then exits 1)
        _say(err_console, f"error: {line}")
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err_console,
                  transient=False) as progress:
        ui = _RunProgress(progress, len(plan.slides))
        try:
            results = run_batch(plan.slides, plan.out, plan.params, workers=plan.workers, scheduler=plan.scheduler,
                                resume=plan.resume, checksums=plan.checksums, stored=plan.stored, on_slide=ui.on_slide,
                                on_tiles=ui.on_tiles, on_note=ui.on_note, on_progress=ui.on_progress)
        except ConfigError as exc:  # the detector, cluster or output folder is unusable: no slide was touched
            raise _fail(str(exc)) from None
        except ResultsError as exc:  # the run record cannot be written (disk full): the slides' own outputs stand
            raise _fail(str(exc), 1) from None
    _print_run_summary(results, plan.out, time.perf_counter() - t0)
    return 1 if plan.refused or any(r.status != "ok" for r in results) else 0


_TILE_HELP = "Tile edge, px at the target resolution (256 or 512 usual)."


@app.command()
def run(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    slides: Annotated[Optional[list[Path]], typer.Argument(help="Slide files or folders of slides.", readable=False)] = None,
    mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px to use instead of the slides' metadata.")] = None,
    target_mpp: Annotated[Optional[float], typer.Option(help="µm/px of the tiles (default 0.5).")] = None,
    magnification: Annotated[Optional[float], typer.Option(help="Target magnification instead of --target-mpp (20 -> 0.5 µm/px).")] = None,
    tile: Annotated[int, typer.Option(help=_TILE_HELP)] = 256,
    overlap: Annotated[int, typer.Option(help="Overlap between neighbouring tiles, px at the target resolution.")] = 32,
    stain: Annotated[str, typer.Option(help="macenko | vahadane | none (none: tiles are not normalised; the slide's "
                                            "stain vectors are still estimated for the detector's colour deconvolution)")] = "macenko",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    backend: Annotated[str, typer.Option(help="auto | cucim | openslide | tifffile")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Tiles per batch.")] = 32,
    min_tissue: Annotated[float, typer.Option(help="Minimum tissue fraction of a tile.")] = 0.05,
    engine: Annotated[str, typer.Option(help="auto | tensorrt | torch | onnxruntime | triton | classic (auto: the "
                                             "best that runs here, saying what it skipped and why; never triton)")] = "auto",
    triton_url: Annotated[Optional[str], typer.Option(help="--engine triton: host:port of the Triton server's HTTP "
                                                           "endpoint serving the card's model under its name.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Your ONNX detector (needs --model-card).")] = None,
    model_card: Annotated[Optional[Path], typer.Option(help="YAML card of --model: input, outputs, decoder.")] = None,
    preprocess: Annotated[str, typer.Option(help="auto | dali | xp: model input made by DALI or NumPy/CuPy "
                                                 "(auto: DALI on a GPU when installed)")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | fp32 | int8: int8 runs the model card's int8_model on ONNX "
                                                "Runtime (auto: on the CPU when the card has one)")] = "auto",
    store: Annotated[Optional[Path], typer.Option(help="Also run every slide of this store (gpupath ingest).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Dask workers of a local cluster (0: in this process; "
                                                        "default: in this process for one slide, else ~1 per 2 cores, "
                                                        "1 per GPU with dask-cuda)")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing Dask scheduler (tcp://host:port).")] = None,
    redo: Annotated[bool, typer.Option("--redo", help="Redo slides whose outputs are already complete in --out.")] = False,
    checksums: Annotated[Optional[Path], typer.Option(help="sha256sum-format file: every slide must be listed and "
                                                           "match before it is read")] = None,
    reports: Annotated[bool, typer.Option("--reports/--no-reports", help="Overlay PNG, summary, HTML report and QuPath "
                                                                        "GeoJSON per slide, and index.html.")] = True,
) -> None:
    """Detect nuclei (or your model's objects) on slides; write Parquet tables, slides.parquet and run.json to --out."""
    from gpupath.run_plan import RunOptions

    code = _run(RunOptions(
        slides=tuple(slides or ()), out=out, mpp=mpp, target_mpp=target_mpp, magnification=magnification, tile=tile,
        overlap=overlap, stain=stain, device=device, backend=backend, batch_size=batch_size, min_tissue=min_tissue,
        engine=engine, model=model, model_card=model_card, preprocess=preprocess, precision=precision, store=store,
        workers=workers, scheduler=scheduler, redo=redo, triton_url=triton_url, checksums=checksums, reports=reports))
    raise typer.Exit(code)


@app.command()
def ingest(
    sources: Annotated[list[Path], typer.Argument(readable=False, help="Slide files; an .mrxs brings its folder; a folder of .dcm "
                                                       "files is one DICOM series.")],
    store: Annotated[Path, typer.Option(help="Store folder: slides/<sha256>/, manifest.parquet (made if missing).")],
    checksums: Annotated[Optional[Path], typer.Option(help="sha256sum-format file listing every slide (a "
                                                           "<slide>.sha256 sidecar is checked when present).")] = None,
) -> None:
    """Copy slides into a content-addressed store, verified by SHA-256, with a Parquet manifest."""
    from gpupath.errors import ConfigError
    from gpupath.ingest import IngestResult
    from gpupath.ingest import ingest as ingest_slides

    def on_result(res: IngestResult) -> None:
        if res.status == "stored":
            _say(out_console, f"stored {res.sha256[:12] if res.sha256 else '?'} {Path(res.source).name}")
            if res.warning:
                _say(err_console, f"warning: {res.source}: {res.warning}")
        elif res.status == "already":
            _say(out_console, f"kept {res.sha256[:12] if res.sha256 else '?'} {Path(res.source).name}: {res.reason}")
        else:
            _say(err_console, f"error: {res.source}: {res.reason}")

    try:
        results = ingest_slides(sources, store, checksums=checksums, on_result=on_result)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    count = {k: sum(r.status == k for r in results) for k in ("stored", "already", "rejected")}
    unverified = sum(r.status == "stored" and r.verified_by is None for r in results)
    if unverified:
        _say(err_console, f"note: {unverified} slide(s) stored without a checksum to verify against (no --checksums "
                          "entry, no <slide>.sha256 sidecar): only the copy was checked against the source file")
    _say(out_console, f"{count['stored']} stored, {count['already']} already in the store, {count['rejected']} "
                      f"rejected; store {store} (manifest {store / 'manifest.parquet'})")
    raise typer.Exit(1 if count["rejected"] else 0)


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="Run folder (holds run.json).")],
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Only this slide (id or id prefix, path or "
                                                                       "file name); repeatable. The index lists all.")] = None,
    max_px: Annotated[int, typer.Option(help="Longest side of the overlay images, px.")] = 1024,
) -> None:
    """Rebuild a run's overlays, summaries and HTML reports, and its index.html, from the run folder."""
    from gpupath.errors import ConfigError
    from gpupath.report import build_reports

    if max_px < 16:
        raise _fail(f"--max-px must be >= 16, got {max_px}")
    failed: list[str] = []

    def on_error(path: str, reason: str) -> None:
        failed.append(path)
        _say(err_console, f"error: {path}: report not made: {reason}")

    try:
        written = build_reports(out, slides=slide, max_px=max_px, on_error=on_error)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    n_reports = sum(p.parent.name == "reports" for p in written)
    _say(out_console, f"{n_reports} slide reports, {len(failed)} failed; index {written[-1]}")
    raise typer.Exit(1 if failed else 0)


@app.command()
def synth(
    path: Annotated[Path, typer.Argument(help="Output .svs/.tif path.")],
    width: Annotated[int, typer.Option(help="Level-0 width, px.")] = 8192,
    height: Annotated[int, typer.Option(help="Level-0 height, px.")] = 8192,
    mpp: Annotated[float, typer.Option(help="Level-0 µm/px.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic H&E slide (pyramidal JPEG TIFF, Aperio-style) with nuclei ground truth beside it."""
    from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

    if not path.parent.is_dir():
        raise _fail(f"{path.parent}: no such folder")
    try:
        truth = write_synthetic_slide(path, SyntheticSpec(width_px=width, height_px=height, mpp=mpp, seed=seed))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    _say(out_console, f"wrote {truth.slide_path} ({width}x{height} px, {mpp} µm/px) and "
                      f"{truth.nuclei_path} ({truth.n_nuclei} nuclei)")


@app.command("convert")
def convert_cmd(
    paths: Annotated[list[Path], typer.Argument(help="SRC OUT.ome.tif, or SRC... (files or folders) with --out-dir.")],
    out_dir: Annotated[Optional[Path], typer.Option(help="Convert every SRC to DIR/<name>.ome.tif (Dask batch).")] = None,
    store: Annotated[Optional[Path], typer.Option(help="With --out-dir: also every slide of this store.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Batch worker processes (0: in this process).")] = None,
    stain: Annotated[str, typer.Option(help="none | macenko | vahadane")] = "none",
    tile: Annotated[int, typer.Option(help="Tile edge, px (256 or 512 usual).")] = 256,
    compression: Annotated[str, typer.Option(help="jpeg | jpeg2000 | deflate")] = "jpeg",
    quality: Annotated[int, typer.Option(help="JPEG/JPEG 2000 quality 1-100 (Deflate: level 1-9).")] = 90,
    mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px to write instead of the metadata.")] = None,
    backend: Annotated[str, typer.Option(help="auto | cucim | openslide | tifffile")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (pyramid and JPEG encode on the GPU)")] = "auto",
    redo: Annotated[bool, typer.Option("--redo", help="With --out-dir: convert again slides whose output is "
                                                      "already this conversion (kept by default).")] = False,
) -> None:
    """Convert slides to tiled pyramidal BigTIFF OME-TIFF (optionally stain-normalised)."""
    from gpupath.convert import ConvertOutcome, ConvertParams, convert_slides

    try:
        params = ConvertParams(tile_px=tile, compression=compression, quality=quality,  # type: ignore[arg-type]
                               stain=stain, mpp=mpp, backend=backend, device=device)  # type: ignore[arg-type]
        if out_dir is None and (len(paths) != 2 or store is not None):
            raise ValueError(f"expected SRC OUT.ome.tif, or SRC... --out-dir DIR (got {len(paths)} paths)")
    except ValueError as exc:
        raise _fail(str(exc)) from None

    def shown(o: ConvertOutcome) -> None:
        if o.result is None:
            _say(err_console, f"error: {o.error}")
            return
        r = o.result
        if o.resumed:
            _say(out_console, f"kept {r.path}: already converted from the same bytes with the same settings "
                              "(--redo converts again)")
            return
        for warning in r.warnings:
            _say(err_console, f"warning: {o.source}: {warning}")
        _say(out_console, f"wrote {r.path}: {len(r.level_dimensions)} levels, {r.level_dimensions[0][0]}x"
                          f"{r.level_dimensions[0][1]} px, {r.mpp:.4g} µm/px, {r.megapixels_per_s:.1f} MP/s")

    if out_dir is None:
        from gpupath.convert import convert_slide
        from gpupath.errors import GpupathError

        try:
            outcomes = [ConvertOutcome(paths[0], paths[1], result=convert_slide(paths[0], paths[1], params))]
        except (GpupathError, ValueError, OSError) as exc:
            outcomes = [ConvertOutcome(paths[0], paths[1], error=str(exc))]
        shown(outcomes[0])
    else:
        try:
            outcomes = convert_slides(list(paths), out_dir, params, store=store, workers=workers, resume=not redo,
                                      on_slide=shown)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        kept = sum(o.resumed for o in outcomes)
        failed = sum(o.result is None for o in outcomes)
        _say(out_console, f"{len(outcomes) - kept - failed} written, {kept} kept, {failed} failed; in {out_dir}")
    raise typer.Exit(1 if any(o.result is None for o in outcomes) else 0)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo slide and outputs.")] = DEFAULT_DEMO_DIR,
    size: Annotated[int, typer.Option(help="Edge of the generated demo slide, level-0 px.")] = 8192,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Make (or reuse) a synthetic demo slide, run the pipeline on it and print where the outputs are."""
    from gpupath.synthetic import SyntheticSpec, write_synthetic_slide

    slide = out / f"demo-{size}.svs"
    out.mkdir(parents=True, exist_ok=True)
    if not slide.exists():
        _say(out_console, f"writing demo slide {slide} ({size}x{size} px at 0.25 µm/px) ...")
        write_synthetic_slide(slide, SyntheticSpec(width_px=size, height_px=size, mpp=0.25, seed=0))
    else:
        _say(out_console, f"reusing demo slide {slide}")
    from gpupath.run_plan import RunOptions

    code = _run(RunOptions(slides=(slide,), out=out / "run", device=device))
    _say(out_console, f"detections: {out / 'run' / 'detections'}  (read with pyarrow.parquet.read_table)")
    _say(out_console, f"slides:     {out / 'run' / 'slides.parquet'}   run record: {out / 'run' / 'run.json'}")
    raise typer.Exit(code)


@app.command("query")
def query_cmd(
    out: Annotated[Path, typer.Argument(help="Run folder (holds detections/).")],
    slide: Annotated[Optional[str], typer.Option(help="Slide id, a unique prefix of it, or the slide's path or "
                                                      "file name as the run recorded it.")] = None,
    bbox: Annotated[Optional[str], typer.Option(help="Region X0,Y0,X1,Y1 in level-0 px (right/bottom exclusive): "
                                                     "boxes intersecting it match.")] = None,
    label: Annotated[Optional[list[str]], typer.Option(help="Class name to keep (repeat for several).")] = None,
    min_score: Annotated[Optional[float], typer.Option(help="Keep detections with score >= this.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | parquet | geojson (QuPath detections, "
                                                      "one slide)")] = "table",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File to write (csv, parquet, geojson; "
                                                                          "csv and geojson go to stdout without it).")] = None,
    limit: Annotated[int, typer.Option(help="Rows shown with --format table.")] = 20,
) -> None:
    """Detections of a run by slide, region, label and score, read through the spatial index (row-group statistics)."""
    from gpupath.errors import GpupathError
    from gpupath.query import iter_query, parse_bbox, plan_query
    from gpupath.report.export import EXPORT_FORMATS, FILE_ONLY, export

    if fmt not in ("table", *EXPORT_FORMATS):
        raise _fail(f"--format must be table, {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    if limit < 0:
        raise _fail(f"--limit must be >= 0, got {limit}")
    if fmt in FILE_ONLY and output is None:
        raise _fail(f"--format {fmt} needs --output FILE")
    if output is not None and output.is_dir():
        raise _fail(f"--output {output}: is a folder; give a file name")
    if output is not None and not output.parent.is_dir():
        raise _fail(f"--output {output}: folder {output.parent} does not exist")
    limit = min(limit, 2**62)  # "all rows": Arrow slices take int64
    t0 = time.perf_counter()
    try:
        region = None if bbox is None else parse_bbox(bbox)
        plan = plan_query(out, slide=slide, bbox=region, label=label, min_score=min_score)
        if fmt == "geojson" and len(plan.slide_ids) > 1:
            raise _fail(f"--format geojson writes one slide's detections and {out} has {len(plan.slide_ids)}: "
                        f"give --slide ({', '.join(s[:12] for s in plan.slide_ids[:5])})")
        if fmt != "table":
            n = export(plan, fmt, output)
        else:
            shown, n = [], 0
            for batch in iter_query(plan):
                if len(shown) < limit:
                    shown += batch.slice(0, limit - len(shown)).to_pylist()
                n += batch.num_rows
    except (GpupathError, ValueError) as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:  # a damaged data page (the footer read fine), or the output's disk
        raise _fail(f"{out}: cannot read its detections or write the output ({exc})".replace("\n", " ")) from None
    stats = (f"{n} detections; searched {len(plan.slide_ids)} slide(s), read {plan.row_groups_read} of "
             f"{plan.row_groups_total} row groups ({plan.rows_read} rows) in {time.perf_counter() - t0:.3f} s")
    if fmt != "table":
        _say(err_console, stats + (f"; wrote {output}" if output is not None else ""))
        return
    table = Table(title=f"detections in {out}" + (f" ({n} rows, first {len(shown)})" if n > len(shown) else ""))
    for col in ("slide", "x0_px", "y0_px", "x1_px", "y1_px", "score", "label"):
        table.add_column(col, justify="left" if col in ("slide", "label") else "right")
    for row in shown:
        table.add_row(row["slide_id"][:12], *(f"{row[c]:.1f}" for c in ("x0_px", "y0_px", "x1_px", "y1_px")),
                      f"{row['score']:.3f}", str(row["label"]))
    out_console.print(table)
    _say(out_console, stats)


@app.command("bench")
def bench_cmd(
    slide: Annotated[Path, typer.Argument(help="Slide file (OpenSlide must open it: the baseline reads with it).")],
    device: Annotated[str, typer.Option(help="cpu | cuda | auto: where ours runs (the baseline is the CPU).")] = "cpu",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="JSON result; a Markdown table beside it (.md).")] = None,
    results_dir: Annotated[Optional[Path], typer.Option(help="Also write <date>-<machine>-<slide>.json/.md here "
                                                             "(e.g. bench/results).")] = None,
    work: Annotated[Optional[Path], typer.Option(help="Scratch folder for both sides' outputs (default: temporary).")] = None,
    tiatoolbox_python: Annotated[Optional[Path], typer.Option(help="Python of a venv with TIAToolbox: also run its "
                                                                   "tissue mask, tiling and Macenko as a peer.")] = None,
    tile: Annotated[int, typer.Option(help=_TILE_HELP)] = 256,
    overlap: Annotated[int, typer.Option(help="Overlap between neighbouring tiles, px at the target resolution.")] = 32,
    target_mpp: Annotated[float, typer.Option(help="µm/px of the tiles.")] = 0.5,
    batch_size: Annotated[int, typer.Option(help="Tiles per batch (both sides).")] = 32,
    min_tissue: Annotated[float, typer.Option(help="Minimum tissue fraction of a tile.")] = 0.05,
    mpp: Annotated[Optional[float], typer.Option(help="Level-0 µm/px to use instead of the slide's metadata.")] = None,
) -> None:
    """Time ours against a hand-written CPU baseline (OpenSlide, torchstain, ONNX Runtime, pyarrow) on one slide:
    per stage and end to end, peak memory, and the agreement of the two sides' detections."""
    from gpupath.bench import results_stem, run_bench, text_report, write_results
    from gpupath.errors import GpupathError
    from gpupath.pipeline import resolve_device

    try:
        dev = resolve_device(device)
        result = run_bench(slide, device=dev, work=work, tiatoolbox_python=None if tiatoolbox_python is None
                           else str(tiatoolbox_python), tile_px=tile, overlap_px=overlap, target_mpp=target_mpp,
                           batch_size=batch_size, min_tissue=min_tissue, mpp=mpp)
    except (GpupathError, ValueError, RuntimeError, OSError) as exc:
        raise _fail(f"{slide}: {exc}", 1) from None
    out_console.print(text_report(result), markup=False, highlight=False, soft_wrap=True)  # many lines, ours
    for path in ([out] if out else []) + ([results_dir / f"{results_stem(result)}.json"] if results_dir else []):
        written = write_results(result, path)
        _say(out_console, f"wrote {written[0]} and {written[1]}")


@app.command("serve")
def serve_cmd(
    source: Annotated[Path, typer.Argument(help="Run folder (run.json) or store (manifest.parquet).")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[Optional[str], typer.Option(help="Require this token (Authorization: Bearer, or ?token=).",
                                                 envvar="GPUPATH_SERVE_TOKEN")] = None,
    cache_mb: Annotated[int, typer.Option(help="Tile cache budget, MiB of encoded tiles.")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda: where tiles are decoded and resized.")] = "auto",
) -> None:
    """Serve the slides of a run or store: Deep Zoom tiles, detections per viewport and a viewer (read-only)."""
    from gpupath.errors import GpupathError
    from gpupath.pipeline import resolve_device
    from gpupath.serve import check_bind, load_source, serve

    try:
        if not 0 <= port <= 65535 or cache_mb < 0:
            raise ValueError(f"--port {port} / --cache-mb {cache_mb}: expected 0-65535 and >= 0")
        check_bind(host, token)
        src = load_source(source)
        dev = resolve_device(device)
    except (GpupathError, ValueError) as exc:
        raise _fail(str(exc)) from None
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    try:
        serve(src, host=host, port=port, token=token, cache_bytes=cache_mb * 2**20, device=dev,
              on_listening=lambda: _say(err_console, f"serving {len(src.slides)} slides of {source} on "
                                                     f"http://{shown}:{port}/ (device: {dev})"))
    except GpupathError as exc:  # the port is taken: said before any "serving" line
        raise _fail(str(exc), 1) from None


@app.command("evaluate")
def evaluate_cmd(
    dataset: Annotated[list[Path], typer.Argument(help="Annotation dataset folder(s): images/, centroids/ (x,y,class "
                                                       "CSV), meta.json (mpp), splits.json.")],
    split: Annotated[str, typer.Option(help="Split of splits.json to score (validation, train, ...) or 'all'.")] = "validation",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for wrapped slides, pipeline outputs "
                                                                  "and evaluation.json (default: evaluate-<dataset>).")] = None,
    engine: Annotated[str, typer.Option(help="Engine of the detector scored (as gpupath run).")] = "auto",
    model_card: Annotated[Optional[Path], typer.Option(help="YAML card of the detector scored (its model: the card's "
                                                            "'model' path; default: the shipped card).")] = None,
    stain: Annotated[Optional[list[str]], typer.Option(help="macenko | vahadane | none; repeat for one row each "
                                                            "(default macenko).")] = None,
    compare: Annotated[str, typer.Option(help="Comparison rows, comma-separated: nuclei_v1, classic, skimage-log "
                                              "('' for none).")] = "nuclei_v1,classic,skimage-log",
    class_map: Annotated[Optional[Path], typer.Option(help="Class map YAML (default: the shipped one).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images (a quick check).")] = None,
    card_metrics: Annotated[bool, typer.Option("--card-metrics", help="Write the figures into the scored model's "
                                                                      "card (metrics.validation).")] = False,
) -> None:
    """Score a detector against human nucleus centroids through the real pipeline: P / R / F1 pooled and per class."""
    from gpupath.detect.annotations import load_class_map
    from gpupath.errors import GpupathError
    from gpupath.evaluate import default_rows, evaluate_dataset, write_card_metrics
    from gpupath.pipeline import resolve_device

    try:
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        dev = resolve_device(device)
        cmap = load_class_map(class_map) if class_map else load_class_map()
        rows = default_rows(engine=engine, model_card=None if model_card is None else str(model_card),
                            stains=stain or ["macenko"], compare=[c.strip() for c in compare.split(",") if c.strip()])
    except (GpupathError, ValueError) as exc:
        raise _fail(str(exc)) from None
    for folder in dataset:
        if out is None:
            where = Path(f"evaluate-{folder.name}")
        else:
            where = out if len(dataset) == 1 else out / f"evaluate-{folder.name}"
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=False) as progress:
            tasks: dict[str, int] = {}

            def on_step(row: str, done: int, total: int, tasks: dict[str, int] = tasks, folder: Path = folder) -> None:
                if row not in tasks:
                    tasks[row] = progress.add_task(f"{folder.name}: {row}"[:60], total=total)
                progress.update(tasks[row], completed=done)

            try:
                record = evaluate_dataset(folder, rows=rows, out=where, split=split, class_map=cmap, device=dev,
                                          limit=limit, on_step=on_step)
            except (GpupathError, ValueError, OSError) as exc:
                raise _fail(str(exc) if str(folder) in str(exc) else f"{folder}: {exc}", 1) from None
        _print_evaluation(record)
        _say(out_console, f"wrote {where / 'evaluation.json'}")
        if card_metrics:
            from gpupath.detect.card import shipped_card

            card_path = model_card if model_card is not None else shipped_card().card_path
            write_card_metrics(Path(card_path), record)
            _say(out_console, f"figures written into {card_path}")


def _print_evaluation(record: dict) -> None:
    table = Table(title=f"{record['dataset']} ({record['split']}): {record['images']} images, {record['truths']} "
                        f"nuclei; pairs within 3 µm (6 µm)")
    for col in ("detector", "precision", "recall", "F1", "F1 6 µm", "class macro F1", "found", "s"):
        table.add_column(col, justify="left" if col == "detector" else "right")
    for r in record["rows"]:
        if "skipped" in r:
            table.add_row(r["row"], *(["-"] * 6), "", end_section=False)
            continue
        a, b = r["at_3um"], r["at_6um"]
        macro = "-" if a["class_macro_f1"] is None else f"{a['class_macro_f1']:.3f}"
        table.add_row(r["row"], f"{a['precision']:.3f}", f"{a['recall']:.3f}", f"{a['f1']:.3f}", f"{b['f1']:.3f}",
                      macro, str(a["found"]), f"{r['seconds']:.0f}")
    out_console.print(table)
    for r in record["rows"]:
        if "skipped" in r:
            _say(out_console, f"note: {r['row']} skipped: {r['skipped']}")
            continue
        per = r["at_3um"]["per_class"]
        if per:
            _say(out_console, f"{r['row']}: class F1 " + ", ".join(f"{k} {v['f1']:.3f}" for k, v in per.items()))
