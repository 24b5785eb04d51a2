"""Many slides: one slide is one Dask task; resume after any crash; failures listed, never fatal.

Takes slide paths (files, folders of slides, or a store's manifest) and a :class:`RunParams`,
and returns one :class:`SlideResult` per slide, in the order given, while writing
``slides.parquet`` and ``run.json`` (progress: done, failed, resumed, left, tiles/s, ETA) after
every slide. Where slides run:

- ``workers=0``: in this process, one after another (a single slide runs like this by default);
- a ``distributed.LocalCluster`` sized to the machine (default for several slides): one worker
  process per GPU through dask-cuda's ``LocalCUDACluster`` on GPU nodes, else about one per two
  cores; each worker builds the detector once and keeps it for the slides it gets;
- ``scheduler="tcp://host:port"``: an existing Dask cluster (its workers need gpupath installed
  and must see the slide paths and the output folder).

Resume: a slide's partitions are vouched for by a completion marker written after them
(:func:`gpupath.results.write_marker`), keyed by :func:`gpupath.pipeline.results_key`
(parameters + model sha256 + version). A rerun skips slides whose marker matches and whose
partitions have the recorded sizes; anything else (a run killed mid-slide, other parameters)
is redone from scratch. One run writes to an output folder at a time (a lock file); stale
temporary files of a killed run are removed when the next run takes the folder.

A worker that dies mid-slide (out of memory, killed) costs that slide one attempt: Dask gives
the task to another worker (up to ``distributed.scheduler.allowed-failures`` times) and the
slide is redone from its start, so no slide is written twice or half.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import platform
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpupath._version import __version__
from gpupath.errors import ConfigError, unexpected
from gpupath.pipeline import RunParams, SlideResult, detector_record, process_slide
from gpupath.files import write_json_atomic
from gpupath.results import write_error, write_slides_table

log = logging.getLogger("gpupath.batch")

__all__ = ["run_batch", "expand_inputs", "store_slides", "StoreSlides", "check_scheduler", "dask_client",
           "SLIDE_SUFFIXES", "default_workers", "run_slides",
           "environment"]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
LOCK_NAME = ".gpupath.lock"


def expand_inputs(inputs: Sequence[str | Path], *, store: str | Path | StoreSlides | None = None) -> list[Path]:
    """Slide files from files, folders (their slide files, sorted; one file per DICOM folder) and a
    store (every slide of its manifest), as absolute paths (outputs name them, and ``serve`` or
    ``report`` may run from another folder). Duplicated paths are kept once.

    Raises
    ------
    ConfigError
        Only folders were given and none holds a slide file (the message names them).
    """
    out: list[Path] = []
    empty: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # every entry named like a slide but a folder: a broken link, a FIFO, ... is reported per slide, not
            # skipped without a word
            found = sorted(p for p in _listing(item) if p.suffix.lower() in SLIDE_SUFFIXES and not p.is_dir())
            dicom = [p for p in found if p.suffix.lower() == ".dcm"]
            out += [p for p in found if p.suffix.lower() != ".dcm"] + dicom[:1]  # a DICOM series opens by any file
            if not found:
                empty.append(item)
        else:
            out.append(item)  # missing files are reported per slide, with the others going on
    if empty and not out and store is None:
        where = "this folder" if len(empty) == 1 else "these folders"
        raise ConfigError(f"{', '.join(map(str, empty))}: no slide files in {where} "
                          f"(looked for {', '.join(sorted(SLIDE_SUFFIXES))})")
    if store is not None:  # a store folder, or its slides as store_slides read them already
        out += (store if isinstance(store, StoreSlides) else store_slides(store)).paths
    seen: set[Path] = set()
    kept = []
    for p in (Path(os.path.abspath(p)) for p in out):
        key = _resolved(p)
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


@dataclass(frozen=True, slots=True)
class StoreSlides:
    """A store's slides as a run reads them: their paths, the sha256 each must still have (absolute path
    -> hex, from the manifest), and one sentence per manifest row refused (a path outside the store)."""

    paths: list[Path]
    expected: dict[str, str]
    refused: list[str]


def store_slides(store: str | Path) -> StoreSlides:
    """The slides of a store's manifest, each inside the store's ``slides/`` folder.

    A row whose ``stored_path`` is absolute, climbs out with ``..`` or resolves (through links) outside
    the store is refused, not opened: a rewritten manifest must not make a run read ``/etc/passwd``.

    Raises
    ------
    ConfigError
        ``store`` is not a folder, or its manifest cannot be read.
    """
    from gpupath.ingest import read_manifest

    root = Path(store)
    if not root.is_dir():
        raise ConfigError(f"--store {root}: not a folder")
    slides_dir = _resolved(root / "slides")
    paths, expected, refused = [], {}, []
    for row in read_manifest(root).select(["stored_path", "sha256"]).to_pylist():
        rel, sha = str(row["stored_path"]), str(row["sha256"])
        path = Path(os.path.abspath(root / rel))
        inside = not Path(rel).is_absolute() and ".." not in Path(rel).parts and \
            _resolved(path).is_relative_to(slides_dir)
        if not inside:
            refused.append(f"--store {root}: manifest row {sha[:12]} points outside the store's slides/ "
                           f"({rel!r}); not read")
            continue
        paths.append(path)
        expected[str(path)] = sha
    return StoreSlides(paths=paths, expected=expected, refused=refused)


def _resolved(path: Path) -> Path:
    """The file a path names, for spotting duplicates; the path itself when it cannot be resolved (a symlink
    loop, a folder it may not enter): that slide then fails alone, with its reason, when it is opened."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's "Symlink loop"
        return path


def _listing(folder: Path) -> list[Path]:
    """A folder's entries; none (and the folder reported empty) when it cannot be listed."""
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def default_workers(n_slides: int) -> int:
    """About one worker process per two cores (each worker decodes and computes with its own threads)."""
    return max(1, min(n_slides, (os.cpu_count() or 1) // 2))


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the run; then remove temporary files a killed run left there."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"--out {out}: another gpupath run is writing to this folder") from None
        for stale in out.rglob("*.tmp-*"):  # no other run holds the folder: these are a dead run's
            with contextlib.suppress(OSError):
                stale.unlink()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Record:
    """slides.parquet and run.json of a run, rewritten atomically after every slide."""

    def __init__(self, out: Path, paths: Sequence[Path], params: RunParams, env: dict[str, Any]) -> None:
        self.out, self.paths, self.params, self.env = out, list(paths), params, env
        self.started = time.time()
        self.results: dict[int, SlideResult] = {}

    def progress(self) -> dict[str, Any]:
        done = list(self.results.values())
        elapsed = time.time() - self.started
        fresh = [r for r in done if not r.resumed]
        tiles = sum(r.n_tiles for r in fresh if r.status == "ok")
        left = len(self.paths) - len(done)
        per_slide = sum(r.seconds for r in fresh) / len(fresh) if fresh else None
        rate = len(fresh) / elapsed if fresh and elapsed > 0 else None
        return {
            "slides_total": len(self.paths), "slides_done": sum(r.status == "ok" for r in done),
            "slides_failed": sum(r.status != "ok" for r in done), "slides_resumed": sum(r.resumed for r in done),
            "slides_left": left, "tiles_done": tiles, "elapsed_s": elapsed,
            "tiles_per_s": tiles / elapsed if elapsed > 0 else 0.0,
            "eta_s": (left / rate) if rate else None, "mean_slide_s": per_slide,
        }

    def write(self, *, final: bool) -> dict[str, Any]:
        ordered = [self.results[i] for i in sorted(self.results)]
        rows = [{k: v for k, v in asdict(r).items() if k != "timings"} for r in ordered]
        write_slides_table(rows, self.out / "slides.parquet", provenance={"params": self.params.to_dict()})
        progress = self.progress()
        try:
            write_json_atomic({
                "gpupath_version": __version__, "started": self.started, "finished": time.time() if final else None,
                "params": self.params.to_dict(), "environment": self.env, **progress,
                "slides": [asdict(r) for r in ordered],
            }, self.out / "run.json")
        except OSError as exc:  # the disk full: one line (ResultsError); the earlier run.json stays whole
            raise write_error(self.out / "run.json", exc) from exc
        return progress


@functools.lru_cache(maxsize=2)
def _worker_detector(params: RunParams) -> Any:
    """The detector of a worker process, built on its first slide and kept (an engine build is slow)."""
    return params.make_detector()[0]


def _slide_task(path: str, out: str, params: RunParams, resume: bool, checksums: dict[str, str] | None,
                stored_sha256: str | None = None) -> SlideResult:
    """One Dask task: one slide, start to end, on a worker."""
    return process_slide(path, Path(out), params, detector=_worker_detector(params), resume=resume,
                         checksums=checksums, stored_sha256=stored_sha256)


def check_scheduler(address: str, *, timeout_s: float = 5.0) -> None:
    """ConfigError unless something accepts TCP connections at a ``tcp://host:port`` scheduler address
    (the Dask handshake itself follows in :func:`dask_client`; other protocols are left to it)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme != "tcp":
        return
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"--scheduler {address}: not a tcp://host:port address ({exc})") from None
    if not host or port is None:
        raise ConfigError(f"--scheduler {address}: not a tcp://host:port address")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"--scheduler {address}: cannot connect ({exc})") from None


def dask_client(stack: contextlib.ExitStack, scheduler: str | None, *, device: str, workers: int,
                on_note: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """A Dask client on ``scheduler``, or on a local cluster of ``workers`` processes (dask-cuda's
    LocalCUDACluster for ``device="cuda"`` when installed), closed with ``stack``; and what it is,
    for run.json (``kind``, ``address``). ConfigError when the scheduler does not answer."""
    from distributed import Client

    if scheduler is not None:
        try:
            client = stack.enter_context(Client(scheduler, timeout="20s"))
        except OSError as exc:
            raise ConfigError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        return client, {"kind": "scheduler", "address": scheduler}
    cluster = stack.enter_context(_make_cluster(device, workers, on_note))
    client = stack.enter_context(Client(cluster))
    return client, {"kind": type(cluster).__name__, "address": cluster.scheduler_address}


def _make_cluster(device: str, workers: int, on_note: Callable[[str], None]) -> Any:
    """A LocalCluster (dask-cuda's LocalCUDACluster on a GPU run when installed)."""
    if device == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            on_note("dask-cuda not installed: one worker on the current GPU (pip install dask-cuda for one per GPU)")
            workers = 1
        else:  # installed but failing to start is an error to see, not a quiet fallback
            return LocalCUDACluster(threads_per_worker=1, dashboard_address=None, silence_logs=40)
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=40)


def run_batch(paths: Sequence[str | Path], out_dir: str | Path, params: RunParams, *,
              workers: int | None = None, scheduler: str | None = None, resume: bool = True,
              checksums: dict[str, str] | None = None, stored: dict[str, str] | None = None,
              on_slide: Callable[[SlideResult], None] | None = None,
              on_tiles: Callable[[str, int, int], None] | None = None,
              on_note: Callable[[str], None] | None = None,
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> list[SlideResult]:
    """Process slides into ``out_dir``; see the module docstring.

    Parameters
    ----------
    paths : slide files (see :func:`expand_inputs` for folders and stores).
    out_dir : output folder (created; locked for the run).
    params : run parameters; the detector is built here first, so a model or engine that cannot
        run raises ConfigError before any slide.
    workers : 0 runs in this process; N > 0 starts a LocalCluster of N workers; None: in this
        process for one slide, else :func:`default_workers`.
    scheduler : address of an existing Dask scheduler (``workers`` is then ignored).
    resume : skip slides whose outputs are complete for the same results key.
    checksums : file name -> expected sha256 (a ``.sha256`` sidecar beside a slide counts too); a
        slide that differs fails before it is read.
    stored : absolute path -> the sha256 a store's manifest recorded at ingest (:func:`store_slides`);
        a stored slide whose bytes changed since fails before it is read.
    on_slide, on_tiles, on_note, on_progress : callbacks (per finished slide; per tile batch, in
        this process only; detector notes; progress figures after each slide).

    Returns
    -------
    One SlideResult per path, in the order of ``paths``.
    """
    note = on_note or (lambda _m: None)
    if scheduler is not None:
        check_scheduler(scheduler)  # seconds, before the detector is built (an engine build can take minutes)
    detector, notes = params.make_detector()
    for n in notes:
        note(n)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    paths = [Path(p) for p in paths]
    env = environment(params)
    env["detector"] = {**detector_record(detector), "notes": notes,
                       "preprocess": getattr(detector, "preprocess_name", None)}
    impl = getattr(detector, "engine_impl", None)
    if impl is not None and hasattr(impl, "cache_hit"):  # TensorRT: whether the plan came from the cache
        env["detector"]["tensorrt"] = {"cache_hit": impl.cache_hit, "plan": str(getattr(impl, "plan_path", ""))}
    in_process = scheduler is None and (workers == 0 or (workers is None and len(paths) <= 1))
    with _exclusive(out):
        record = _Record(out, paths, params, env)

        def finish(i: int, res: SlideResult) -> None:
            record.results[i] = res
            if on_slide is not None:
                on_slide(res)
            progress = record.write(final=False)
            if on_progress is not None:
                on_progress(progress)

        record.write(final=False)
        if in_process:
            env["executor"] = {"kind": "in-process"}
            for i, p in enumerate(paths):
                finish(i, process_slide(p, out, params, detector=detector, resume=resume, checksums=checksums,
                                        stored_sha256=(stored or {}).get(str(p)),
                                        on_tiles=None if on_tiles is None else
                                        (lambda done, total, _p=str(p): on_tiles(_p, done, total))))
        else:
            del detector, impl  # workers build their own; free this one's memory (a GPU engine) first
            _run_on_dask(paths, out, params, workers=workers, scheduler=scheduler, resume=resume,
                         checksums=checksums, stored=stored or {}, env=env, finish=finish, note=note)
        record.write(final=True)
        if params.reports:
            _write_index(out, note)
        return [record.results[i] for i in range(len(paths))]


def _write_index(out: Path, note: Callable[[str], None]) -> None:
    """index.html of the run (slides, counts, failures, parameters); a failure is a note, not an error."""
    from gpupath.report import build_index

    try:
        build_index(out)
    except Exception as exc:  # noqa: BLE001  the results are written; the index is a convenience
        unexpected(log, f"{out}: index.html", exc)
        note(f"index.html not written ({type(exc).__name__}: {exc}); rebuild with gpupath report {out}")


def _run_on_dask(paths: list[Path], out: Path, params: RunParams, *, workers: int | None, scheduler: str | None,
                 resume: bool, checksums: dict[str, str] | None, stored: dict[str, str], env: dict[str, Any],
                 finish: Callable[[int, SlideResult], None],
                 note: Callable[[str], None]) -> None:
    from distributed import as_completed

    with contextlib.ExitStack() as stack:
        client, env["executor"] = dask_client(stack, scheduler, device=params.device,
                                              workers=workers or default_workers(len(paths)), on_note=note)
        env["executor"]["workers"] = len(client.scheduler_info()["workers"])
        run_token = uuid.uuid4().hex[:8]
        index = {}
        futures = []
        for i, p in enumerate(paths):
            fut = client.submit(_slide_task, str(p), str(out), params, resume, checksums, stored.get(str(p)),
                                key=f"gpupath-{run_token}-{i}", pure=False)
            index[fut.key] = i
            futures.append(fut)
        for fut in as_completed(futures):
            i = index[fut.key]
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001  KilledWorker (the slide killed its workers) or a lost cluster
                res = SlideResult(path=str(paths[i]), error=f"{paths[i]}: {type(exc).__name__}: {exc}")
            finish(i, res)
            fut.release()


def environment(params: RunParams) -> dict[str, Any]:
    """Versions and machine facts recorded in run.json (a package that is absent is None)."""
    env: dict[str, Any] = {
        "gpupath": __version__, "python": platform.python_version(), "machine": platform.machine(),
        "processor": platform.processor(), "device": params.device,
    }
    for mod in ("numpy", "scipy", "pyarrow", "tifffile", "openslide", "cucim", "cupy", "onnxruntime"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001  optional package absent or broken: record that
            env[mod] = None
    return env


def run_slides(paths: Sequence[str | Path], out_dir: str | Path, params: RunParams, *,
               on_slide: Callable[[SlideResult], None] | None = None,
               on_tiles: Callable[[str, int, int], None] | None = None,
               on_note: Callable[[str], None] | None = None, resume: bool = True) -> list[SlideResult]:
    """Process slides one after another in this process (:func:`gpupath.batch.run_batch` with
    ``workers=0``); writes slides.parquet and run.json after each slide, resumes complete slides."""
    return run_batch(paths, out_dir, params, workers=0, resume=resume, on_slide=on_slide, on_tiles=on_tiles,
                     on_note=on_note)
