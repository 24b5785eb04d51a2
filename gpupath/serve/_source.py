"""What a server serves: the ok slides of a run folder (``run.json``) or every slide of a store
(``manifest.parquet``), each addressed by its id (sha256) and resolved to a file once, at start."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gpupath.errors import ConfigError

__all__ = ["SLIDE_ID_RE", "ServedSlide", "ServeSource", "load_source"]

SLIDE_ID_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class ServedSlide:
    """One slide the server may read: its id and the file it was resolved to at start."""

    slide_id: str                    # sha256, 64 lowercase hex digits
    path: Path = field(repr=False)   # never sent to clients
    name: str                        # file name (shown escaped)
    width_px: int | None             # level 0
    height_px: int | None
    mpp: float | None                # µm per level-0 px
    n_detections: int | None         # None: no detections (a store)


@dataclass(frozen=True, slots=True)
class ServeSource:
    """What a server serves: a run folder (with detections) or a store (slides only)."""

    kind: Literal["run", "store"]
    root: Path
    slides: dict[str, ServedSlide]


def load_source(path: str | Path) -> ServeSource:
    """The slides of a run folder (``run.json``) or a store (``manifest.parquet``).

    Raises
    ------
    ConfigError
        ``path`` is neither, or its table cannot be read.
    """
    root = Path(path)
    if (root / "run.json").is_file():
        try:
            run = json.loads((root / "run.json").read_text())
            records = list(run.get("slides") or [])
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{root / 'run.json'}: unreadable run record ({exc})") from None
        slides = {}
        for rec in records:
            sid = str(rec.get("slide_id") or "")
            if rec.get("status") != "ok" or not SLIDE_ID_RE.match(sid):
                continue
            p = Path(str(rec.get("path", "")))
            slides[sid] = ServedSlide(sid, p, p.name, rec.get("width_px"), rec.get("height_px"), rec.get("mpp"),
                                      int(rec.get("n_detections") or 0))
        return ServeSource("run", root, slides)
    from gpupath.ingest import MANIFEST_NAME, read_manifest

    if (root / MANIFEST_NAME).is_file():
        table = read_manifest(root)
        base = root.resolve()
        slides = {}
        for rec in table.to_pylist():
            sid = rec["sha256"]
            p = (base / rec["stored_path"]).resolve()
            if not SLIDE_ID_RE.match(sid) or not p.is_relative_to(base):
                continue  # a manifest row pointing outside the store is not served
            slides[sid] = ServedSlide(sid, p, Path(rec["original_path"]).name, rec["width_px"], rec["height_px"],
                                      rec["mpp"], None)
        return ServeSource("store", root, slides)
    raise ConfigError(f"{root}: neither a run folder (run.json) nor a store ({MANIFEST_NAME})")
