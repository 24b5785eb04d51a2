"""The routes of ``gpupath serve`` (see :mod:`gpupath.serve.app` for the list and the security
rules): per-app state, the token middleware, and one handler method per route."""

from __future__ import annotations

import hmac
import html
import logging
import math
import re
import threading
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gpupath.errors import GpupathError, ResultsError, SlideReadError, one_line
from gpupath.serve._source import SLIDE_ID_RE, ServedSlide, ServeSource
from gpupath.serve._tiles import TILE_FORMATS, DziGeometry, Overview, TileCache, TileTooCostly, build_overview, render_tile

log = logging.getLogger("gpupath.serve")
MAX_OVERVIEWS = 4  # slides whose overview (<= 12 MiB each) is kept

__all__ = ["AppState", "Handlers", "TokenMiddleware", "security_headers", "density", "TOKEN_COOKIE",
           "MAX_BOXES_LIMIT", "DENSITY_CELLS"]

MAX_BOXES_LIMIT = 20_000
DENSITY_CELLS = 64          # density grid: cells along the longer side of the viewport
STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "gpupath_token"


class AppState:
    """Per-app slides, open handles, the tile cache and counters (``reads``: slide reads done)."""

    def __init__(self, source: ServeSource, cache_bytes: int, device: Literal["cpu", "cuda"],
                 tile_format: str, quality: int) -> None:
        self.source = source
        self.cache = TileCache(cache_bytes)
        self.device = device
        self.tile_format = tile_format
        self.quality = quality
        self.reads = 0
        self.opens = 0
        self._open: dict[str, tuple[Any, DziGeometry, threading.Lock]] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._overviews: OrderedDict[str, Overview] = OrderedDict()  # the last MAX_OVERVIEWS slides' overviews
        self._building: dict[str, threading.Lock] = {}
        self.overviews_built = 0

    def overview(self, slide_id: str) -> Overview:
        """The slide's :class:`Overview`, built once (concurrent asks wait for the one build), the last
        MAX_OVERVIEWS kept."""
        with self._lock:
            building = self._building.setdefault(slide_id, threading.Lock())
        with building:
            with self._lock:
                if slide_id in self._overviews:
                    self._overviews.move_to_end(slide_id)
                    return self._overviews[slide_id]
            slide, geom, lock = self.slide(slide_id)
            ov = build_overview(slide, geom, lock)
            with self._lock:
                self._overviews[slide_id] = ov
                self.overviews_built += 1
                while len(self._overviews) > MAX_OVERVIEWS:
                    self._overviews.popitem(last=False)
            return ov

    def slide(self, slide_id: str) -> tuple[Any, DziGeometry, threading.Lock]:
        """The open slide, its geometry and its read lock; opened once, after its file's sha256 is checked
        against the id the run or store recorded (SlideReadError when the file changed since: its tiles
        would not be the image its detections were found on). Other slides open meanwhile."""
        with self._lock:
            if slide_id in self._open:
                return self._open[slide_id]
            opening = self._opening.setdefault(slide_id, threading.Lock())
        with opening:
            with self._lock:
                if slide_id in self._open:
                    return self._open[slide_id]
            from gpupath.files import sha256_file
            from gpupath.slide import open_slide

            path = self.source.slides[slide_id].path
            try:
                sha = sha256_file(path)
            except OSError as exc:
                raise SlideReadError(f"{path}: cannot read it: {exc.strerror or exc}") from None
            if sha != slide_id:
                raise SlideReadError(f"{path}: changed since it was recorded: sha256 {sha}, the record says {slide_id}")
            slide = open_slide(path)
            w, h = slide.dimensions
            with self._lock:
                self._open[slide_id] = (slide, DziGeometry(int(w), int(h)), threading.Lock())
                self.opens += 1
                return self._open[slide_id]

    def geometry(self, slide_id: str) -> DziGeometry:
        s = self.source.slides[slide_id]
        if s.width_px and s.height_px:
            return DziGeometry(int(s.width_px), int(s.height_px))
        return self.slide(slide_id)[1]


def security_headers(kind: str = "app") -> dict[str, str]:
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'" if kind == "report" else
           "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
           "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY"}


def density(x0: Any, y0: Any, x1: Any, y1: Any, bbox: tuple[float, float, float, float]) -> dict[str, Any]:
    """Counts of box centres on a grid over ``bbox`` (level-0 px), row-major."""
    import numpy as np

    bx0, by0, bx1, by1 = bbox
    cell_px = max(bx1 - bx0, by1 - by0) / DENSITY_CELLS
    nx = max(1, math.ceil((bx1 - bx0) / cell_px))
    ny = max(1, math.ceil((by1 - by0) / cell_px))
    cx = np.clip(((np.asarray(x0) + np.asarray(x1)) / 2 - bx0) // cell_px, 0, nx - 1).astype(np.int64)
    cy = np.clip(((np.asarray(y0) + np.asarray(y1)) / 2 - by0) // cell_px, 0, ny - 1).astype(np.int64)
    counts = np.bincount(cy * nx + cx, minlength=nx * ny)
    return {"x0": bx0, "y0": by0, "cell_px": cell_px, "nx": nx, "ny": ny, "counts": counts.tolist()}


class TokenMiddleware:
    """With a secret, every HTTP request carries it (Bearer header, ``?token=`` or the cookie that a
    ``?token=`` request sets for the page's own requests); constant-time compare; 401 otherwise."""

    def __init__(self, app: Any, secret: bytes | None = None) -> None:
        self.app = app
        self.secret = secret

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.secret is not None:
            req = Request(scope)
            auth = req.headers.get("authorization", "")
            from_query = req.query_params.get("token", "")
            given = (auth[7:] if auth.lower().startswith("bearer ") else
                     from_query or urllib.parse.unquote(req.cookies.get(TOKEN_COOKIE, "")))  # the cookie is quoted
            if not hmac.compare_digest(given.encode(), self.secret):
                resp = PlainTextResponse("401 unauthorized: token required", status_code=401,
                                         headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
            if from_query:
                # the page's own script, tile and link requests carry no token: a cookie does it for them
                async def send_with_cookie(message: Any) -> None:
                    if message["type"] == "http.response.start":
                        value = urllib.parse.quote(from_query, safe="")  # a header is Latin-1: any token fits quoted
                        cookie = f"{TOKEN_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict"
                        message.setdefault("headers", []).append((b"set-cookie", cookie.encode("latin-1")))
                    await send(message)

                await self.app(scope, receive, send_with_cookie)
                return
        await self.app(scope, receive, send)


def not_found(what: str = "not found") -> Response:
    return PlainTextResponse(f"404 {what}", status_code=404)


def int_param(req: Request, name: str) -> int | None:
    text = req.path_params.get(name, "")
    if not re.fullmatch(r"[0-9]{1,9}", text):
        return None
    return int(text)


def parse_viewport(q: Any, slide: ServedSlide) -> tuple[tuple[float, float, float, float], float, int]:
    """(bbox clamped to the slide plus a margin, min_score, max_boxes) of a detections request; ValueError
    or KeyError when a value is missing, not finite, out of range or the box is empty."""
    bbox = tuple(float(q[k]) for k in ("x0", "y0", "x1", "y1"))
    min_score = float(q.get("min_score", "0"))
    max_boxes = int(q.get("max_boxes", "2000"))
    if not (all(math.isfinite(v) for v in (*bbox, min_score)) and bbox[2] > bbox[0] and bbox[3] > bbox[1]
            and 0 <= max_boxes <= MAX_BOXES_LIMIT):
        raise ValueError
    # clamp to the slide (plus a margin for boxes straddling its edge): finite extents, no overflow
    w0, h0 = slide.width_px or 1e9, slide.height_px or 1e9
    bbox = (max(bbox[0], -1e6), max(bbox[1], -1e6), min(bbox[2], w0 + 1e6), min(bbox[3], h0 + 1e6))
    if not (bbox[2] - bbox[0] >= 1e-3 and bbox[3] - bbox[1] >= 1e-3):
        raise ValueError
    return bbox, min_score, max_boxes


def detections_payload(root: Path, sid: str, bbox: tuple[float, float, float, float], min_score: float,
                       max_boxes: int) -> dict[str, Any]:
    """The viewport's boxes ``[x0, y0, x1, y1, score, label index]``, or a density grid past ``max_boxes``;
    ``labels``: every class of the slide in label-index order, ``colours``: the overlay's, ``#rrggbb``."""
    import pyarrow as pa

    from gpupath.query import RESULT_SCHEMA, iter_query, plan_query
    from gpupath.report.colours import colour_hex, label_colours

    plan = plan_query(root, slide=sid, bbox=bbox, min_score=min_score if min_score > 0 else None)
    t = pa.Table.from_batches(list(iter_query(plan)), schema=RESULT_SCHEMA)
    cols = {c: t.column(c).to_numpy() for c in ("x0_px", "y0_px", "x1_px", "y1_px", "score")}
    # every class of the slide's detections (from the file metadata, so also in an empty viewport),
    # in label-index order, with the colour the overlay, report and GeoJSON give it
    names = [str(n) for n in plan.label_names]
    label = t.column("label").combine_chunks() if t.num_rows else None
    stored = [str(v) for v in label.dictionary.to_pylist()] if label is not None else []
    names += [n for n in stored if n not in names]
    colours = [colour_hex(rgb) for rgb in label_colours(names).values()]
    if t.num_rows > max_boxes:
        return {"mode": "density", "labels": names, "colours": colours, "n": t.num_rows,
                "grid": density(cols["x0_px"], cols["y0_px"], cols["x1_px"], cols["y1_px"], bbox)}
    remap = [names.index(n) for n in stored]   # the stored dictionary's codes -> index into names
    idx = [remap[k] for k in label.indices.to_numpy(zero_copy_only=False).tolist()] if label is not None else []
    boxes = [[round(float(a), 1), round(float(b), 1), round(float(c), 1), round(float(d), 1),
              round(float(s), 3), int(k)]
             for a, b, c, d, s, k in zip(cols["x0_px"], cols["y0_px"], cols["x1_px"], cols["y1_px"],
                                         cols["score"], idx)]
    return {"mode": "boxes", "labels": names, "colours": colours, "n": t.num_rows, "boxes": boxes}


def home_page(source: ServeSource) -> str:
    rows = []
    for s in source.slides.values():
        sid = html.escape(s.slide_id)
        count = "–" if s.n_detections is None else f"{s.n_detections:,}"
        dims = f"{s.width_px} x {s.height_px}" if s.width_px else ""
        report = (f' · <a href="reports/{sid}.html">report</a>'
                  if source.kind == "run" and (source.root / "reports" / f"{s.slide_id}.html").is_file() else "")
        rows.append(f'<tr><td><a href="viewer#slide={sid}">{html.escape(s.name)}</a>{report}</td>'
                    f'<td>{html.escape(dims)}</td><td class="n">{html.escape(count)}</td>'
                    f'<td><code>{sid[:12]}</code></td></tr>')
    title = html.escape(f"gpupath serve: {source.root.resolve().name}")
    run_index = ' · <a href="index.html">run report</a>' if (source.root / "index.html").is_file() else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            '<style>body{font-family:system-ui,sans-serif;margin:16px 24px}td{padding:2px 10px}'
            '.n{text-align:right}</style></head><body>'
            f'<h1>{title}</h1><p><a href="viewer">viewer</a>{run_index}</p>'
            '<table><tr><th>slide</th><th>px</th><th>detections</th><th>id</th></tr>'
            f'{"".join(rows)}</table></body></html>')


def _viewer_link(sid: str) -> str:
    return (f'<p style="font-family:system-ui,sans-serif"><a href="../viewer#slide={html.escape(sid)}">'
            'open in the viewer</a></p>')


class Handlers:
    """The routes of one app over one :class:`AppState` (every slide id is checked before any use)."""

    def __init__(self, st: AppState) -> None:
        self.st = st
        self.source = st.source
        self.warned: set[str] = set()

    def routes(self) -> list[Route]:
        return [
            Route("/", self.home), Route("/viewer", self.viewer), Route("/static/viewer.js", self.viewer_js),
            Route("/api/slides", self.api_slides),
            Route("/dzi/{slide_id}.dzi", self.dzi),
            Route("/dzi/{slide_id}_files/{level}/{col}_{row}.{fmt}", self.tile),
            Route("/api/detections/{slide_id}", self.detections),
            Route("/reports/{slide_id}.html", self.report), Route("/index.html", self.run_index),
        ]

    def unreadable(self, slide_id: str, exc: Exception) -> Response:
        """404 for a slide whose file cannot be read now; the reason (with its path) goes to the server's
        log once per slide, never to the client (the API names slides by id only)."""
        if slide_id not in self.warned:
            self.warned.add(slide_id)
            log.warning("slide %s: %s", slide_id, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return not_found("slide file not readable on the server")

    def known(self, slide_id: str) -> bool:
        return bool(SLIDE_ID_RE.match(slide_id)) and slide_id in self.source.slides

    async def home(self, req: Request) -> Response:
        return HTMLResponse(home_page(self.source), headers=security_headers())

    async def viewer(self, req: Request) -> Response:
        return FileResponse(STATIC / "viewer.html", media_type="text/html", headers=security_headers())

    async def viewer_js(self, req: Request) -> Response:
        return FileResponse(STATIC / "viewer.js", media_type="text/javascript", headers=security_headers())

    async def api_slides(self, req: Request) -> Response:
        out = []
        for s in self.source.slides.values():
            g = self.st.geometry(s.slide_id) if s.width_px else None
            out.append({"id": s.slide_id, "name": s.name, "width_px": s.width_px, "height_px": s.height_px,
                        "mpp": s.mpp, "n_detections": s.n_detections,
                        "dzi": None if g is None else {"tile_px": g.tile_px, "overlap_px": g.overlap_px,
                                                       "max_level": g.max_level, "format": self.st.tile_format}})
        return JSONResponse({"kind": self.source.kind, "slides": out}, headers=security_headers())

    async def dzi(self, req: Request) -> Response:
        sid = req.path_params["slide_id"]
        if not self.known(sid):
            return not_found("unknown slide")
        try:
            g = await run_in_threadpool(self.st.geometry, sid)
        except GpupathError as exc:
            return self.unreadable(sid, exc)
        return Response(g.xml(self.st.tile_format), media_type="application/xml", headers=security_headers())

    async def tile(self, req: Request) -> Response:
        st, sid, fmt = self.st, req.path_params["slide_id"], req.path_params["fmt"]
        level, col, row = int_param(req, "level"), int_param(req, "col"), int_param(req, "row")
        if not self.known(sid):
            return not_found("unknown slide")
        if fmt != st.tile_format or level is None or col is None or row is None:
            return not_found("no such tile")
        try:
            g = await run_in_threadpool(st.geometry, sid)
        except GpupathError as exc:
            return self.unreadable(sid, exc)
        if not g.valid(level, col, row):
            return not_found("no such tile")
        key = (sid, level, col, row, fmt)
        data = st.cache.get(key)
        if data is None:
            def work() -> bytes:
                slide, geom, lock = st.slide(sid)
                st.reads += 1
                return render_tile(slide, geom, level, col, row, fmt=fmt, quality=st.quality, device=st.device,
                                   lock=lock, overview=lambda: st.overview(sid))
            try:
                data = await run_in_threadpool(work)
            except TileTooCostly as exc:
                return PlainTextResponse(f"404 {exc}", status_code=404)
            except GpupathError as exc:  # the slide file moved, vanished or cannot be decoded
                return self.unreadable(sid, exc)
            st.cache.put(key, data)
        headers = {**security_headers(), "Cache-Control": "private, max-age=3600"}
        return Response(data, media_type=TILE_FORMATS[fmt], headers=headers)

    async def detections(self, req: Request) -> Response:
        sid = req.path_params["slide_id"]
        if not self.known(sid):
            return not_found("unknown slide")
        if self.source.kind != "run":
            return JSONResponse({"mode": "boxes", "labels": [], "colours": [], "n": 0, "boxes": []},
                                headers=security_headers())
        try:
            bbox, min_score, max_boxes = parse_viewport(req.query_params, self.source.slides[sid])
        except (KeyError, ValueError):
            return PlainTextResponse("400 expected x0<x1, y0<y1 (level-0 px), min_score, "
                                     f"0 <= max_boxes <= {MAX_BOXES_LIMIT}", status_code=400)
        try:
            payload = await run_in_threadpool(detections_payload, self.source.root, sid, bbox, min_score, max_boxes)
        except (OSError, ValueError, ResultsError) as exc:  # a damaged partition (pyarrow: OSError/ArrowInvalid)
            if sid not in self.warned:
                self.warned.add(sid)
                log.warning("slide %s: detections unreadable: %s", sid, one_line(str(exc).splitlines()[0] if str(exc)
                                                                                 else type(exc).__name__))
            return PlainTextResponse("503 this slide's detections cannot be read on the server (damaged file)",
                                     status_code=503)
        return JSONResponse(payload, headers=security_headers())

    async def report(self, req: Request) -> Response:
        sid = req.path_params["slide_id"]
        if self.source.kind != "run" or not self.known(sid):
            return not_found("unknown slide")
        path = self.source.root / "reports" / f"{sid}.html"   # sid: 64 hex digits of a known slide
        if not path.is_file():
            return not_found("no report")
        page = await run_in_threadpool(path.read_text, "utf-8")
        page = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + _viewer_link(sid), page, count=1)
        return HTMLResponse(page, headers=security_headers("report"))

    async def run_index(self, req: Request) -> Response:
        path = self.source.root / "index.html"
        if self.source.kind != "run" or not path.is_file():
            return not_found()
        page = await run_in_threadpool(path.read_text, "utf-8")

        def add_link(m: re.Match[str]) -> str:
            sid = m.group(2)
            return m.group(0) + (f' · <a href="viewer#slide={sid}">viewer</a>' if sid in self.source.slides else "")

        page = re.sub(r'<a href="(reports/([0-9a-f]{64})\.html)">.*?</a>', add_link, page)
        return HTMLResponse(page, headers=security_headers("report"))
