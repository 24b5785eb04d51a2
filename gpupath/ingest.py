"""Slide identity and ingest: streaming SHA-256, verified copies into a content-addressed store.

:func:`sha256_file` gives the slide id used throughout a run (Parquet partitions, provenance):
the hex SHA-256 of the file's bytes, computed in bounded memory.

:func:`ingest` copies slides into a store, hashing while it copies, and admits a slide only
when its copy is whole: the hash matches the expected one (``--checksums`` file in
``sha256sum`` format, or a ``<source>.sha256`` sidecar), the copy opens as a slide and decodes,
and its content is not in the store already. Layout of a store::

    manifest.parquet                       one row per stored slide (MANIFEST_SCHEMA)
    slides/<sha256>/<name>                 the slide file (read-only); <sha256> = sha256_file of it
    slides/<sha256>/<stem>/...             .mrxs: its companion folder, beside it
    slides/<sha256>/<folder>/<files>       DICOM series given as a folder: the folder, whole
    .incoming/<random>/                    staging; a unit is renamed into slides/ only once verified
    .lock                                  held by the one ingest writing to the store

``<sha256>`` hashes the file the pipeline opens (a DICOM folder: its first ``.dcm`` in sorted
order), so it equals the ``slide_id`` of a run over the stored copy. Stored names come only from
the file system (plain base names); names in checksum files only look hashes up. CPU only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpupath._version import __version__
from gpupath.errors import ConfigError, GpupathError, SlideReadError, unexpected
from gpupath.files import atomic_path, fsync_path, sha256_file
from gpupath.slide import check_slide_file, tiff_truncation

__all__ = ["MANIFEST_NAME", "MANIFEST_SCHEMA", "IngestResult", "ingest", "read_checksums", "read_manifest",
           "sha256_file"]

log = logging.getLogger("gpupath.ingest")

_COPY_CHUNK_BYTES = 1 << 20
_PROBE_PX = 64  # edge of the regions decoded to prove a copy is a readable slide
MANIFEST_NAME = "manifest.parquet"
MANIFEST_VERSION = "1"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_GNU_LINE = re.compile(r"(\\?)([0-9a-fA-F]{64}) ([ *])(.+)")   # sha256sum: "<hex>  <name>" or "<hex> *<name>"
_BSD_LINE = re.compile(r"SHA256 \((.+)\) = ([0-9a-fA-F]{64})")  # sha256sum --tag / shasum
MANIFEST_SCHEMA = pa.schema([
    pa.field("sha256", pa.string(), nullable=False),          # of the file to open = slide_id of a run on it
    pa.field("original_path", pa.string(), nullable=False),   # absolute, as given (symlinks not resolved)
    pa.field("stored_path", pa.string(), nullable=False),     # relative to the store, '/'-separated: the file to open
    pa.field("size_bytes", pa.int64(), nullable=False),       # all files of the unit
    pa.field("n_files", pa.int32(), nullable=False),
    pa.field("vendor", pa.string()),
    pa.field("width_px", pa.int64()),                         # level 0
    pa.field("height_px", pa.int64()),
    pa.field("level_count", pa.int32()),
    pa.field("mpp", pa.float64()),                            # level-0 µm/px from the metadata; null when unknown
    pa.field("verified_by", pa.string()),                     # checksum file the hashes matched; null: none given
    pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("files", pa.list_(pa.struct([                   # every file of the unit, main first; path
        ("path", pa.string()), ("sha256", pa.string()), ("size_bytes", pa.int64())]))),  # relative to slides/<sha>/
])


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What became of one source given to :func:`ingest`."""

    source: str                                # as given
    status: Literal["stored", "already", "rejected"]   # already: the same bytes are in the store (kept, not copied)
    sha256: str | None = None                  # of the main file, when it was read whole
    stored_path: str | None = None             # absolute path of the stored file to open (stored, already)
    reason: str | None = None                  # why it was rejected, or which stored slide it already is; one line
    warning: str | None = None                 # stored, but something to know (e.g. no mpp)
    verified_by: str | None = None             # checksums file or sidecar the copy matched (None: none given)


class _Already(SlideReadError):
    """A unit whose every file is in the store already (same bytes): nothing to copy, nothing wrong."""

    def __init__(self, message: str, sha256: str, stored_path: str) -> None:
        super().__init__(message)
        self.sha256 = sha256
        self.stored_path = stored_path


class _Rejected(SlideReadError):
    """A unit refused after its main file was hashed: the result still names the hash."""

    def __init__(self, message: str, sha256: str) -> None:
        super().__init__(message)
        self.sha256 = sha256


# ---------------------------------------------------------------------------------------- checksums
@dataclass(slots=True)
class _Checksums:
    """Parsed checksum lines: name -> hex, and the names refused with why."""

    origin: str                                # the file it came from, for messages and provenance
    base: Path                                 # folder relative names are resolved against
    entries: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # name -> why its entry is ignored
    bare: str | None = None                    # a sidecar's lone hex (no name)

    def lookup(self, src: Path, unit_rel: str) -> str | None:
        """Expected hex of ``src`` (stored as ``unit_rel``), None when not listed: by path relative to
        the checksum file's folder, path in the unit (``x/Data0.dat``), else base name if its hash is unique."""
        keys = [unit_rel]
        with contextlib.suppress(ValueError):
            keys.insert(0, Path(os.path.abspath(src)).relative_to(os.path.abspath(self.base)).as_posix())
        for key in keys:
            if key in self.entries:
                return self.entries[key]
        found = {hex_ for name, hex_ in self.entries.items() if _base_name(name) == src.name}
        if len(found) > 1:
            raise SlideReadError(f"{self.origin} lists {len(found)} different sha256 for files named {src.name!r}; "
                                 "list it by its path relative to the checksum file")
        return found.pop() if found else None


def _base_name(name: str) -> str:
    return re.split(r"[\\/]", name)[-1]


def _escapes(name: str) -> bool:  # absolute ('/', '\\', 'C:') or with a '..' part
    return re.match(r"[/\\]|[A-Za-z]:", name) is not None or ".." in re.split(r"[\\/]", name)


def _parse_checksums(text: str, origin: str, base: Path, *, allow_bare: bool) -> _Checksums:
    table = _Checksums(origin=origin, base=base)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if allow_bare and _HEX64.fullmatch(line.strip()):
            table.bare = line.strip().lower()
            continue
        if m := _GNU_LINE.fullmatch(line):
            escaped, hex_, _, name = m.groups()
            if escaped:  # GNU escapes names holding '\' or a newline
                name = re.sub(r"\\(.)", lambda e: {"n": "\n", "r": "\r"}.get(e.group(1), e.group(1)), name)
        elif m := _BSD_LINE.fullmatch(line):
            name, hex_ = m.groups()
        else:
            table.problems.append(f"line {number}: not a sha256sum line: {line[:80]!r}")
            continue
        name, hex_ = name.removeprefix("./"), hex_.lower()
        problem = (f"line {number}: name {name!r} escapes (absolute or '..' part); entry ignored" if _escapes(name)
                   else f"line {number}: {name!r} listed again with another sha256; both ignored"
                   if table.entries.get(name, hex_) != hex_ else None)
        if problem:
            table.problems.append(problem)
            table.refused[name] = problem
            table.entries.pop(name, None)
        elif name not in table.refused:
            table.entries[name] = hex_
    return table


def _load_checksums(path: Path, *, allow_bare: bool) -> _Checksums:
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise ConfigError(f"{path}: checksum file not found") from None
    except OSError as exc:  # a folder, no permission...
        raise ConfigError(f"{path}: unreadable as a checksum file ({exc.strerror or exc})") from None
    return _parse_checksums(text, str(path), path.parent, allow_bare=allow_bare)


def read_checksums(path: str | os.PathLike[str]) -> tuple[dict[str, str], list[str]]:
    """Read a ``sha256sum``-format file.

    Parameters
    ----------
    path : file of lines ``<64 hex>  <name>`` (text mode) or ``<64 hex> *<name>`` (binary mode),
        GNU ``\\``-escaped names, or ``SHA256 (<name>) = <64 hex>`` (``--tag``). Blank lines and
        ``#`` comments are skipped.

    Returns
    -------
    entries : name as written (``./`` removed) -> lowercase hex.
    problems : one line per refused line: unparsable, a name that escapes (absolute, or with a
        ``..`` part; never used), or a name listed twice with different hashes (both dropped).

    Raises
    ------
    ConfigError
        The file is missing or unreadable.
    """
    table = _load_checksums(Path(path), allow_bare=False)
    return dict(table.entries), list(table.problems)


# ---------------------------------------------------------------------------------------- units
_Files = list[tuple[Path, str]]  # (source file, path within slides/<sha>/), the file to open first


def _folder_files(folder: Path) -> _Files:
    """The files of a flat folder as (path, ``<folder name>/<file name>``), sorted by name."""
    out: _Files = []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            raise SlideReadError(f"{folder}: holds subfolder {path.name!r}; a slide's folder holds files only")
        if not path.exists() or not stat.S_ISREG(path.stat().st_mode):
            raise SlideReadError(f"{path}: broken link or not a regular file, inside a slide's folder")
        out.append((path, f"{folder.name}/{path.name}"))
    return out


def _unit_of(src: Path) -> tuple[_Files, str | None]:
    """The files a source stands for and a warning, or :class:`SlideReadError` naming why it is no slide."""
    if src.name in ("", ".", ".."):
        raise SlideReadError(f"{src}: base name {src.name!r} is not a plain file name; name the file or folder itself")
    if not src.exists() and not src.is_symlink():
        raise SlideReadError(f"{src}: no such file or folder")
    if not src.is_dir():
        check_slide_file(src)  # a broken link or a loop, not a regular file, empty, or unreadable
    if src.is_dir():
        if src.with_name(src.name + ".mrxs").is_file():
            raise SlideReadError(f"{src}: companion folder of {src.name}.mrxs; ingest the .mrxs (it brings its folder)")
        files = _folder_files(src)
        dicom = [(path, rel) for path, rel in files if path.suffix.lower() == ".dcm"]
        if not dicom:
            raise SlideReadError(f"{src}: folder without .dcm files; a folder is ingested only as a DICOM series "
                                 "(slide files are given one by one)")
        # DICOM exports hold .dcm files, often a DICOMDIR and files without a suffix; anything else
        # (another slide, a README) means this is a folder of files, not one series
        other = [rel for path, rel in files if path.suffix and path.suffix.lower() != ".dcm"]
        if other:
            shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
            raise SlideReadError(f"{src}: not one DICOM series: it also holds {shown}; give slide files one by one, "
                                 "or a folder of one series' .dcm files")
        for path, _ in files:
            check_slide_file(path)  # every file of the series is read
        return [dicom[0], *(f for f in files if f != dicom[0])], None
    if src.name.endswith(".sha256"):
        raise SlideReadError(f"{src}: a checksum sidecar, not a slide (it is read beside its slide)")
    if src.suffix.lower() == ".mrxs":
        companion = src.with_name(src.stem)
        if not companion.is_dir():
            raise SlideReadError(f"{src}: MIRAX companion folder {companion.name}/ missing beside it")
        files = [(src, src.name), *_folder_files(companion)]
        for path, _ in files[1:]:
            check_slide_file(path)
        return files, None
    warning = None
    if src.suffix.lower() == ".dcm" and (n := sum(p.suffix.lower() == ".dcm" for p in src.parent.iterdir()) - 1) > 0:
        warning = (f"{n} other .dcm file(s) beside it were not copied; if they are one DICOM series, ingest the "
                   f"folder {src.parent} to keep it whole")
    return [(src, src.name)], warning


# ---------------------------------------------------------------------------------------- copy + checks
def _copy_hashing(src: Path, dst: Path) -> tuple[str, int]:
    """Copy ``src`` to the new file ``dst`` in 1 MiB chunks, hashing the bytes copied; fsync. (hex, bytes)."""
    digest = hashlib.sha256()
    buf = bytearray(_COPY_CHUNK_BYTES)
    view = memoryview(buf)  # slices without copying
    n_bytes = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size_at_open = os.fstat(fin.fileno()).st_size
        while n := fin.readinto(buf):
            digest.update(view[:n])
            fout.write(view[:n])
            n_bytes += n
        fout.flush()
        os.fsync(fout.fileno())
        if n_bytes != size_at_open or os.fstat(fin.fileno()).st_size != size_at_open:
            raise SlideReadError(f"{src}: changed while being copied ({size_at_open} bytes at open, "
                                 f"{n_bytes} read); copy it again once it is complete")
    return digest.hexdigest(), n_bytes


def _no_info(record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO


def _check_slide(path: Path) -> dict[str, Any]:
    """Open ``path`` as a slide, decode a corner of its smallest and largest level; its manifest facts."""
    from gpupath.slide import open_slide

    problem = tiff_truncation(path)
    if problem:
        raise SlideReadError(f"{path}: {problem}")
    quiet = logging.getLogger("gpupath.slide")
    quiet.addFilter(_no_info)  # its backend notes would name the staging path; the result says what matters
    try:
        slide = open_slide(path)
    finally:
        quiet.removeFilter(_no_info)
    with slide:
        lowest = slide.level_count - 1
        w, h = slide.level_dimensions[lowest]
        slide.read_rgb((0, 0), lowest, (min(w, _PROBE_PX), min(h, _PROBE_PX)))
        w, h = slide.dimensions
        pw, ph = min(w, _PROBE_PX), min(h, _PROBE_PX)
        slide.read_rgb((w - pw, h - ph), 0, (pw, ph))  # the far corner: often the last tile written
        return {"vendor": slide.vendor, "width_px": int(w), "height_px": int(h),
                "level_count": int(slide.level_count), "mpp": slide.mpp}


# ---------------------------------------------------------------------------------------- store
def _check_store(store: Path) -> None:
    if store.exists() and not store.is_dir():
        raise ConfigError(f"--store {store}: exists and is not a folder")


def read_manifest(store: str | os.PathLike[str]) -> pa.Table:
    """The manifest of a store: one row per stored slide (:data:`MANIFEST_SCHEMA`).

    Returns an empty table with the schema when the store or its manifest does not exist yet.

    Raises
    ------
    ConfigError
        ``store`` is a file, or its manifest cannot be read as a manifest.
    """
    store = Path(store)
    _check_store(store)
    path = store / MANIFEST_NAME
    if not path.exists():
        return MANIFEST_SCHEMA.empty_table()
    try:
        table = pq.read_table(path)
        return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA).replace_schema_metadata(table.schema.metadata)
    except (pa.ArrowException, KeyError, OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable store manifest ({exc}); the store was not touched") from None


def _write_manifest(store: Path, table: pa.Table) -> None:
    table = table.replace_schema_metadata({"gpupath.version": __version__,
                                           "gpupath.manifest_version": MANIFEST_VERSION})
    with atomic_path(store / MANIFEST_NAME) as tmp:
        pq.write_table(table, tmp)


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    """Hold ``store/.lock`` (one writer per store); clear what a killed ingest left in staging."""
    import fcntl

    store.mkdir(parents=True, exist_ok=True)
    fd = os.open(store / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"--store {store}: another gpupath ingest is writing to it ({store / '.lock'} is "
                              "held); wait for it to finish") from None
        incoming = store / ".incoming"
        if incoming.is_symlink():
            raise ConfigError(f"{incoming}: is a link; the staging folder must be a real folder inside the store")
        incoming.mkdir(exist_ok=True)
        for stale in incoming.iterdir():  # staging of an ingest that was killed: never in slides/
            log.info("%s: removing staging left by an interrupted ingest", stale)
            _remove(stale)
        for stale in store.glob(f".{MANIFEST_NAME}.tmp-*"):
            stale.unlink()
        (store / "slides").mkdir(exist_ok=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _expectations(unit: _Files, src: Path,
                  checksums: _Checksums | None) -> tuple[dict[str, tuple[str, str]], str | None]:
    """Expected (hex, checksum file) per path in the unit, and the files they came from; refuses a
    unit whose main file a checksum file in play (``--checksums``, sidecar) does not list."""
    tables = [] if checksums is None else [checksums]
    sidecar = Path(f"{src}.sha256")
    if sidecar.is_file():
        table = _load_checksums(sidecar, allow_bare=True)
        if table.problems:
            raise SlideReadError(f"sidecar {sidecar}: {table.problems[0]}")
        if table.bare is not None:
            table.entries.setdefault(unit[0][1], table.bare)
        tables.append(table)
    expected: dict[str, tuple[str, str]] = {}
    for table in tables:
        for path, rel in unit:
            want = table.lookup(path, rel)
            if want is not None and (have := expected.setdefault(rel, (want, table.origin)))[0] != want:
                raise SlideReadError(f"{rel}: {table.origin} lists sha256 {want}, {have[1]} lists {have[0]}")
        if unit[0][1] not in expected:
            why = next((p for name, p in table.refused.items() if _base_name(name) == unit[0][0].name), None)
            raise SlideReadError(f"not listed in {table.origin}" + (f" ({why})" if why else "")
                                 + "; nothing to verify the copy against")
    return expected, (", ".join(t.origin for t in tables) or None)


def _stage(unit: _Files, stage: Path, expected: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """Copy the unit's files into ``stage`` hashing them; refuse at the first hash that differs from the expected."""
    copied: list[dict[str, Any]] = []
    for path, rel in unit:
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        hex_, n_bytes = _copy_hashing(path, stage / rel)
        copied.append({"path": rel, "sha256": hex_, "size_bytes": n_bytes})
        if rel in expected and expected[rel][0] != hex_:
            what = "" if rel == unit[0][1] else f" for {rel}"
            raise _Rejected(f"sha256 mismatch{what}: expected {expected[rel][0]}, got {hex_} "
                            f"(expected value from {expected[rel][1]})", copied[0]["sha256"])
    return copied


def _duplicate(manifest: pa.Table, sha: str, copied: list[dict[str, Any]]) -> str | None:
    """Why a unit whose main file hashes to ``sha`` cannot enter the store, or None."""
    known = manifest.filter(pc.equal(manifest["sha256"], sha))
    if not known.num_rows:
        return None
    row = known.slice(0, 1).to_pylist()[0]
    if sorted(f["sha256"] for f in row["files"]) == sorted(f["sha256"] for f in copied):  # names may differ
        raise _Already(f"already in the store: same bytes as {row['original_path']} (stored as {row['stored_path']})",
                       sha, row["stored_path"])
    return (f"main file identical to that of {row['original_path']} (stored as {row['stored_path']}) but its other "
            "files differ; one store id cannot hold both")


def _seal(stage: Path, final: Path) -> None:
    """Make the staged files read-only, fsync them in, and rename the staging folder to ``final``."""
    for dirpath, _, names in os.walk(stage):
        for name in names:
            os.chmod(os.path.join(dirpath, name), 0o444)  # content-addressed: never edited in place
        fsync_path(Path(dirpath))
    if final.exists():  # renamed in by an ingest killed before its manifest row: never recorded, so replaced
        orphan = stage.parent / f"orphan-{uuid.uuid4().hex}"
        os.replace(final, orphan)
        _remove(orphan)
    os.replace(stage, final)
    fsync_path(final.parent)


def _ingest_one(src: Path, store: Path, manifest: pa.Table,
                checksums: _Checksums | None) -> tuple[IngestResult, pa.Table]:
    from gpupath.slide import mpp_plausible

    unit, warning = _unit_of(src)
    expected, verified_by = _expectations(unit, src, checksums)
    stage = store / ".incoming" / uuid.uuid4().hex
    stage.mkdir()
    try:
        copied = _stage(unit, stage, expected)
        sha = copied[0]["sha256"]
        if duplicate := _duplicate(manifest, sha, copied):
            raise _Rejected(duplicate, sha)
        try:
            facts = _check_slide(stage / unit[0][1])
        except Exception as exc:  # noqa: BLE001  (any reader failure rejects this copy; the batch goes on)
            unexpected(log, str(unit[0][0]), exc)
            text = str(exc).replace(str(stage / unit[0][1]), str(unit[0][0])).removeprefix(f"{unit[0][0]}: ")
            raise _Rejected(text if isinstance(exc, GpupathError) else f"{type(exc).__name__}: {text}", sha) from None
        final = store / "slides" / sha
        _seal(stage, final)
    finally:
        if stage.exists():
            _remove(stage)
    row = {"sha256": sha, "original_path": os.path.abspath(src), "stored_path": f"slides/{sha}/{unit[0][1]}",
           "size_bytes": sum(f["size_bytes"] for f in copied), "n_files": len(copied), **facts,
           "verified_by": verified_by, "ingested_at": dt.datetime.now(dt.UTC), "files": copied}
    updated = pa.concat_tables([manifest, pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA)])
    try:
        _write_manifest(store, updated)
    except BaseException:  # take the folder back out of slides/ unless the new manifest made it in after all
        written = store / MANIFEST_NAME
        if not written.exists() or sha not in pq.read_table(written, columns=["sha256"])["sha256"].to_pylist():
            os.replace(final, store / ".incoming" / f"unrecorded-{sha}")  # removed by the next ingest
        raise
    mpp = facts["mpp"]
    warnings = [warning] if warning else []
    if mpp is None:
        warnings.append("no mpp in the metadata (stored with mpp null; `gpupath run` will need --mpp)")
    elif not mpp_plausible(mpp):
        warnings.append(f"metadata says {mpp:.4g} µm/px, not a microscope scan (`gpupath run` will need --mpp)")
    return IngestResult(source=str(src), status="stored", sha256=sha, stored_path=str((final / unit[0][1]).absolute()),
                        warning="; ".join(warnings) or None, verified_by=verified_by), updated


def ingest(sources: Sequence[str | os.PathLike[str]], store: str | os.PathLike[str], *,
           checksums: str | os.PathLike[str] | None = None,
           on_result: Callable[[IngestResult], None] | None = None) -> list[IngestResult]:
    """Copy slides into a content-addressed store, verified, with a manifest row for each.

    Parameters
    ----------
    sources : slide files; an ``.mrxs`` brings its companion folder; a folder is taken as one
        DICOM series (its files kept whole; the first ``.dcm`` in sorted order is the file to open).
    store : store folder (created when missing); see the module docstring for its layout.
    checksums : ``sha256sum``-format file; every source's main file must be listed in it
        (looked up by path relative to this file, path within the unit, or unique base name).
        Independently, a ``<source>.sha256`` sidecar (bare hex, or ``sha256sum`` lines) is
        checked whenever it exists.
    on_result : called with each result as soon as its source is done.

    Returns
    -------
    One :class:`IngestResult` per source, in order. A rejected source (missing, empty, not a
    slide, undecodable, truncated, hash mismatch, not listed in ``checksums``, a folder that is
    not one DICOM series) leaves nothing in the store; the others go on. A source whose bytes are
    in the store already (stored before, or earlier in this call) is ``already``: nothing is
    copied and nothing is wrong, so a nightly re-ingest of a scanner folder passes.

    Raises
    ------
    ConfigError
        ``store`` is a file or is held by another ingest, ``checksums`` is missing or
        unreadable, or the existing manifest is unreadable.

    Notes
    -----
    Each unit is copied into ``.incoming/<random>/`` with a streaming SHA-256 (1 MiB chunks,
    fsync), checked, made read-only and renamed into ``slides/<sha256>/`` in one step; the
    manifest is then rewritten under a temporary name and renamed. A crash never leaves part of
    a unit under ``slides/`` nor loses a manifest row; staging is cleared by the next ingest, and
    a folder renamed in just before a crash, without its row yet, is replaced when re-ingested.
    """
    store = Path(store)
    _check_store(store)
    table = None
    if checksums is not None:
        table = _load_checksums(Path(checksums), allow_bare=False)
        for problem in table.problems:
            log.warning("%s: %s", checksums, problem)
    results: list[IngestResult] = []
    with _locked(store):
        manifest = read_manifest(store)  # under the lock: no other ingest writes it meanwhile
        for source in sources:
            src = Path(source)
            try:
                result, manifest = _ingest_one(src, store, manifest, table)
            except _Already as same:
                result = IngestResult(source=str(source), status="already", sha256=same.sha256,
                                      stored_path=str((store / same.stored_path).absolute()), reason=str(same))
            except Exception as exc:  # noqa: BLE001  (one source's failure is its result; the batch goes on)
                unexpected(log, str(source), exc)
                reason = str(exc).removeprefix(f"{src}: ")
                if not isinstance(exc, GpupathError):
                    reason = f"{type(exc).__name__}: {reason}"
                result = IngestResult(source=str(source), status="rejected", sha256=getattr(exc, "sha256", None),
                                      reason=reason)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results
