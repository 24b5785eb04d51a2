"""Convert many slides: one :func:`convert_slide` per slide, in this process or as Dask tasks."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpupath.convert._core import convert_slide
from gpupath.convert._resume import convert_key, converted_before
from gpupath.convert._tiles import ConvertParams, ConvertResult
from gpupath.errors import ConfigError, GpupathError


@dataclass(frozen=True, slots=True)
class ConvertOutcome:
    """One slide of :func:`convert_slides`: its result, or the one-line reason it failed."""

    source: Path
    out: Path
    result: ConvertResult | None = None
    error: str = ""
    resumed: bool = False   # ``out`` was already this conversion (same source bytes and settings): kept


def _convert_task(src: str, out: str, params: ConvertParams, resume: bool = True) -> ConvertOutcome:
    """One slide, start to end (a Dask task on a worker, or a call in this process); with ``resume``
    an output that already is this conversion is kept (its source is hashed, never decoded)."""
    from gpupath.files import sha256_file

    try:
        sha = sha256_file(src)
        if resume and (before := converted_before(out, convert_key(sha, params))) is not None:
            return ConvertOutcome(Path(src), Path(out), result=before, resumed=True)
        return ConvertOutcome(Path(src), Path(out), result=convert_slide(src, out, params, source_sha256=sha))
    except (GpupathError, ValueError, OSError) as exc:
        return ConvertOutcome(Path(src), Path(out), error=str(exc).splitlines()[0] if str(exc) else repr(exc))


def output_name(src: str | os.PathLike[str]) -> str:
    """``<name>.ome.tif`` for a slide file: every suffix dropped (``a.ome.tif`` -> ``a.ome.tif``)."""
    return Path(src).name.split(".")[0] + ".ome.tif"


def convert_slides(inputs: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                   params: ConvertParams | None = None, *, store: str | os.PathLike[str] | None = None,
                   workers: int | None = None, scheduler: str | None = None, resume: bool = True,
                   on_slide: Callable[[ConvertOutcome], None] | None = None) -> list[ConvertOutcome]:
    """Convert many slides to ``out_dir/<name>.ome.tif``, one Dask task per slide, as ``run`` batches.

    Parameters
    ----------
    inputs : slide files and folders of slides (expanded as :func:`gpupath.batch.expand_inputs`).
    out_dir : output folder (created).
    params : as :func:`convert_slide`.
    store : a store folder whose every slide is converted too.
    workers : 0 converts in this process, one slide after another; otherwise the size of a
        ``distributed.LocalCluster`` (default about one worker per two cores).
    scheduler : ``tcp://host:port`` of an existing Dask cluster instead of a local one.
    resume : keep an output that already is this conversion (same source sha256, settings and
        gpupath version, read from its OME-XML; see :mod:`gpupath.convert._resume`); False converts again.
    on_slide : called with each outcome as it completes.

    Returns
    -------
    list of ConvertOutcome, in input order; failures carry their reason and never stop the others.

    Raises
    ------
    ConfigError
        Two inputs would write the same output name, or the store is not a folder.
    """
    from gpupath.batch import default_workers, expand_inputs

    params = params or ConvertParams()
    paths = expand_inputs([Path(p) for p in inputs], store=store)
    out = Path(out_dir)
    names = [output_name(p) for p in paths]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"{out}: several inputs would be written as {', '.join(clash)}; convert them separately")
    jobs = [(str(p), str(out / n)) for p, n in zip(paths, names)]
    outcomes: list[ConvertOutcome | None] = [None] * len(jobs)
    n_workers = default_workers(len(jobs)) if workers is None else workers
    if scheduler is None and (n_workers == 0 or len(jobs) <= 1):
        for i, (src, dst) in enumerate(jobs):
            outcomes[i] = _convert_task(src, dst, params, resume)
            if on_slide is not None:
                on_slide(outcomes[i])  # type: ignore[arg-type]
        return outcomes  # type: ignore[return-value]
    from distributed import as_completed

    from gpupath.batch import dask_client

    with contextlib.ExitStack() as stack:
        # the CPU cluster whatever params.device: each task picks its device itself (pick_device)
        client, _ = dask_client(stack, scheduler, device="cpu", workers=n_workers, on_note=lambda _m: None)
        token = uuid.uuid4().hex[:8]
        futures = {client.submit(_convert_task, src, dst, params, resume, key=f"gpupath-convert-{token}-{i}", pure=False): i
                   for i, (src, dst) in enumerate(jobs)}
        for fut in as_completed(list(futures)):
            i = futures[fut]
            try:
                outcome = fut.result()
            except Exception as exc:  # noqa: BLE001  KilledWorker (the slide killed its workers) or a lost cluster
                outcome = ConvertOutcome(Path(jobs[i][0]), Path(jobs[i][1]), error=f"{type(exc).__name__}: {exc}")
            outcomes[i] = outcome
            if on_slide is not None:
                on_slide(outcome)
    return outcomes  # type: ignore[return-value]
