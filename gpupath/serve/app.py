"""Read-only tile server and viewer over the slides of a run folder or a store (Starlette ASGI app).

Takes a run folder (``run.json``: the slides with status ``ok`` and their detections) or a store
(``manifest.parquet`` of ``gpupath ingest``: its slides, no detections) and serves, for those
slides only, addressed by slide id (sha256, 64 hex digits; never by path):

``/``                                   slide list (HTML, every string escaped)
``/viewer``                             the pan/zoom viewer (``#slide=<id>&level=<L>&x=&y=``)
``/api/slides``                         JSON: id, name, dims, mpp, counts, DZI geometry
``/dzi/{id}.dzi``                       Deep Zoom descriptor
``/dzi/{id}_files/{level}/{col}_{row}.{jpeg|png}``   tiles (:mod:`gpupath.serve._tiles`)
``/api/detections/{id}?x0=&y0=&x1=&y1=&min_score=&max_boxes=``   level-0 px viewport: boxes
                                        ``[x0, y0, x1, y1, score, label index]``, or a density grid when
                                        more than ``max_boxes`` match; ``labels`` (every class of the
                                        slide, in label-index order) and ``colours`` (``#rrggbb`` each,
                                        the overlay's colours)
``/reports/{id}.html``, ``/index.html`` the run's HTML reports, with links into the viewer

Security: only GET/HEAD; ids are matched against ``^[0-9a-f]{64}$`` and then looked up in the
table built at start (no path is ever built from a request); tile coordinates are checked
against the pyramid before any read; with a token every request needs ``Authorization: Bearer
<token>`` or ``?token=<token>`` (constant-time compare). :func:`check_bind` refuses a
non-loopback host without a token. Tiles are cached in an LRU bounded in bytes.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gpupath.errors import ConfigError, GpupathError
from gpupath.serve._tiles import TILE_FORMATS, DziGeometry, TileCache, TileTooCostly, render_tile

log = logging.getLogger("gpupath.serve")

__all__ = ["ServedSlide", "ServeSource", "load_source", "create_app", "serve", "serve_in_thread", "BackgroundServer", "check_bind", "is_loopback",
           "SLIDE_ID_RE", "DEFAULT_CACHE_BYTES"]

SLIDE_ID_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_CACHE_BYTES = 256 * 2**20
MAX_BOXES_LIMIT = 20_000
DENSITY_CELLS = 64          # density grid: cells along the longer side of the viewport
STATIC = Path(__file__).parent / "static"


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
    from gpupath.ingest import MANIFEST_NAME, read_manifest  # noqa: PLC0415

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


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local connections (127.0.0.0/8, ::1, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse (ConfigError) to bind a non-loopback ``host`` without a token."""
    if not is_loopback(host) and not token:
        raise ConfigError(f"--host {host} accepts connections from other machines: pass --token (or bind 127.0.0.1)")


class _State:
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
        self._lock = threading.Lock()

    def slide(self, slide_id: str) -> tuple[Any, DziGeometry, threading.Lock]:
        with self._lock:
            if slide_id not in self._open:
                from gpupath.slide import open_slide  # noqa: PLC0415

                slide = open_slide(self.source.slides[slide_id].path)
                w, h = slide.dimensions
                self._open[slide_id] = (slide, DziGeometry(int(w), int(h)), threading.Lock())
                self.opens += 1
            return self._open[slide_id]

    def geometry(self, slide_id: str) -> DziGeometry:
        s = self.source.slides[slide_id]
        if s.width_px and s.height_px:
            return DziGeometry(int(s.width_px), int(s.height_px))
        return self.slide(slide_id)[1]


TOKEN_COOKIE = "gpupath_token"


def _security_headers(kind: str = "app") -> dict[str, str]:
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'" if kind == "report" else
           "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
           "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY"}


def _density(x0: Any, y0: Any, x1: Any, y1: Any, bbox: tuple[float, float, float, float]) -> dict[str, Any]:
    """Counts of box centres on a grid over ``bbox`` (level-0 px), row-major."""
    import numpy as np  # noqa: PLC0415

    bx0, by0, bx1, by1 = bbox
    cell_px = max(bx1 - bx0, by1 - by0) / DENSITY_CELLS
    nx = max(1, math.ceil((bx1 - bx0) / cell_px))
    ny = max(1, math.ceil((by1 - by0) / cell_px))
    cx = np.clip(((np.asarray(x0) + np.asarray(x1)) / 2 - bx0) // cell_px, 0, nx - 1).astype(np.int64)
    cy = np.clip(((np.asarray(y0) + np.asarray(y1)) / 2 - by0) // cell_px, 0, ny - 1).astype(np.int64)
    counts = np.bincount(cy * nx + cx, minlength=nx * ny)
    return {"x0": bx0, "y0": by0, "cell_px": cell_px, "nx": nx, "ny": ny, "counts": counts.tolist()}


def create_app(source: ServeSource | str | Path, *, token: str | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
               device: Literal["cpu", "cuda"] = "cpu", tile_format: str = "jpeg", quality: int = 80) -> Any:
    """The Starlette app serving ``source`` (see the module docstring for routes and security).

    Parameters
    ----------
    source : a :class:`ServeSource`, or a run folder / store path for :func:`load_source`.
    token : when set, every request must carry it (``Authorization: Bearer`` or ``?token=``).
    cache_bytes : budget of the tile LRU, bytes of encoded tiles.
    device : ``cuda`` decodes and resizes tiles on the GPU.
    tile_format : ``jpeg`` or ``png`` (the DZI descriptor's format).
    quality : JPEG quality.

    The app's ``state.gp`` holds the cache and counters (``reads``, ``opens``).
    """
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.concurrency import run_in_threadpool  # noqa: PLC0415
    from starlette.middleware import Middleware  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import (  # noqa: PLC0415
        FileResponse,
        HTMLResponse,
        JSONResponse,
        PlainTextResponse,
        Response,
    )
    from starlette.routing import Route  # noqa: PLC0415

    if tile_format not in TILE_FORMATS:
        raise ValueError(f"tile_format {tile_format!r}: expected one of {sorted(TILE_FORMATS)}")
    if not isinstance(source, ServeSource):
        source = load_source(source)
    st = _State(source, cache_bytes, device, tile_format, quality)
    secret = token.encode() if token else None

    class TokenMiddleware:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and secret is not None:
                req = Request(scope)
                auth = req.headers.get("authorization", "")
                from_query = req.query_params.get("token", "")
                given = (auth[7:] if auth.lower().startswith("bearer ") else
                         from_query or req.cookies.get(TOKEN_COOKIE, ""))
                if not hmac.compare_digest(given.encode(), secret):
                    resp = PlainTextResponse("401 unauthorized: token required", status_code=401,
                                             headers={"WWW-Authenticate": "Bearer"})
                    await resp(scope, receive, send)
                    return
                if from_query:
                    # the page's own script, tile and link requests carry no token: a cookie does it for them
                    async def send_with_cookie(message: Any) -> None:
                        if message["type"] == "http.response.start":
                            cookie = f"{TOKEN_COOKIE}={from_query}; Path=/; HttpOnly; SameSite=Strict"
                            message.setdefault("headers", []).append((b"set-cookie", cookie.encode("latin-1")))
                        await send(message)

                    await self.app(scope, receive, send_with_cookie)
                    return
            await self.app(scope, receive, send)

    def not_found(what: str = "not found") -> Response:
        return PlainTextResponse(f"404 {what}", status_code=404)

    warned: set[str] = set()

    def unreadable(slide_id: str, exc: Exception) -> Response:
        """404 for a slide whose file cannot be read now; the reason (with its path) goes to the server's
        log once per slide, never to the client (the API names slides by id only)."""
        if slide_id not in warned:
            warned.add(slide_id)
            log.warning("slide %s: %s", slide_id, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return not_found("slide file not readable on the server")

    def known(slide_id: str) -> bool:
        return bool(SLIDE_ID_RE.match(slide_id)) and slide_id in source.slides

    def int_param(req: Request, name: str) -> int | None:
        text = req.path_params.get(name, "")
        if not re.fullmatch(r"[0-9]{1,9}", text):
            return None
        return int(text)

    async def home(req: Request) -> Response:
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
        page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
                '<style>body{font-family:system-ui,sans-serif;margin:16px 24px}td{padding:2px 10px}'
                '.n{text-align:right}</style></head><body>'
                f'<h1>{title}</h1><p><a href="viewer">viewer</a>{run_index}</p>'
                '<table><tr><th>slide</th><th>px</th><th>detections</th><th>id</th></tr>'
                f'{"".join(rows)}</table></body></html>')
        return HTMLResponse(page, headers=_security_headers())

    async def viewer(req: Request) -> Response:
        return FileResponse(STATIC / "viewer.html", media_type="text/html", headers=_security_headers())

    async def viewer_js(req: Request) -> Response:
        return FileResponse(STATIC / "viewer.js", media_type="text/javascript", headers=_security_headers())

    async def api_slides(req: Request) -> Response:
        out = []
        for s in source.slides.values():
            g = st.geometry(s.slide_id) if s.width_px else None
            out.append({"id": s.slide_id, "name": s.name, "width_px": s.width_px, "height_px": s.height_px,
                        "mpp": s.mpp, "n_detections": s.n_detections,
                        "dzi": None if g is None else {"tile_px": g.tile_px, "overlap_px": g.overlap_px,
                                                       "max_level": g.max_level, "format": st.tile_format}})
        return JSONResponse({"kind": source.kind, "slides": out}, headers=_security_headers())

    async def dzi(req: Request) -> Response:
        sid = req.path_params["slide_id"]
        if not known(sid):
            return not_found("unknown slide")
        try:
            g = await run_in_threadpool(st.geometry, sid)
        except GpupathError as exc:
            return unreadable(sid, exc)
        return Response(g.xml(st.tile_format), media_type="application/xml", headers=_security_headers())

    async def tile(req: Request) -> Response:
        sid = req.path_params["slide_id"]
        fmt = req.path_params["fmt"]
        level, col, row = int_param(req, "level"), int_param(req, "col"), int_param(req, "row")
        if not known(sid):
            return not_found("unknown slide")
        if fmt != st.tile_format or level is None or col is None or row is None:
            return not_found("no such tile")
        try:
            g = await run_in_threadpool(st.geometry, sid)
        except GpupathError as exc:
            return unreadable(sid, exc)
        if not g.valid(level, col, row):
            return not_found("no such tile")
        key = (sid, level, col, row, fmt)
        data = st.cache.get(key)
        if data is None:
            def work() -> bytes:
                slide, geom, lock = st.slide(sid)
                st.reads += 1
                return render_tile(slide, geom, level, col, row, fmt=fmt, quality=st.quality, device=st.device,
                                   lock=lock)
            try:
                data = await run_in_threadpool(work)
            except TileTooCostly as exc:
                return PlainTextResponse(f"404 {exc}", status_code=404)
            except GpupathError as exc:  # the slide file moved, vanished or cannot be decoded
                return unreadable(sid, exc)
            st.cache.put(key, data)
        headers = {**_security_headers(), "Cache-Control": "private, max-age=3600"}
        return Response(data, media_type=TILE_FORMATS[fmt], headers=headers)

    async def detections(req: Request) -> Response:
        sid = req.path_params["slide_id"]
        if not known(sid):
            return not_found("unknown slide")
        if source.kind != "run":
            return JSONResponse({"mode": "boxes", "labels": [], "colours": [], "n": 0, "boxes": []},
                                headers=_security_headers())
        q = req.query_params
        try:
            bbox = tuple(float(q[k]) for k in ("x0", "y0", "x1", "y1"))
            min_score = float(q.get("min_score", "0"))
            max_boxes = int(q.get("max_boxes", "2000"))
            if not (all(math.isfinite(v) for v in (*bbox, min_score)) and bbox[2] > bbox[0] and bbox[3] > bbox[1]
                    and 0 <= max_boxes <= MAX_BOXES_LIMIT):
                raise ValueError
            # clamp to the slide (plus a margin for boxes straddling its edge): finite extents, no overflow
            w0, h0 = source.slides[sid].width_px or 1e9, source.slides[sid].height_px or 1e9
            bbox = (max(bbox[0], -1e6), max(bbox[1], -1e6), min(bbox[2], w0 + 1e6), min(bbox[3], h0 + 1e6))
            if not (bbox[2] - bbox[0] >= 1e-3 and bbox[3] - bbox[1] >= 1e-3):
                raise ValueError
        except (KeyError, ValueError):
            return PlainTextResponse("400 expected x0<x1, y0<y1 (level-0 px), min_score, "
                                     f"0 <= max_boxes <= {MAX_BOXES_LIMIT}", status_code=400)

        def work() -> dict[str, Any]:
            import pyarrow as pa  # noqa: PLC0415

            from gpupath.query import RESULT_SCHEMA, iter_query, plan_query  # noqa: PLC0415
            from gpupath.report.overlay import colour_hex, label_colours  # noqa: PLC0415

            plan = plan_query(source.root, slide=sid, bbox=bbox, min_score=min_score if min_score > 0 else None)
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
                        "grid": _density(cols["x0_px"], cols["y0_px"], cols["x1_px"], cols["y1_px"], bbox)}
            remap = [names.index(n) for n in stored]   # the stored dictionary's codes -> index into names
            idx = [remap[k] for k in label.indices.to_numpy(zero_copy_only=False).tolist()] if label is not None else []
            boxes = [[round(float(a), 1), round(float(b), 1), round(float(c), 1), round(float(d), 1),
                      round(float(s), 3), int(k)]
                     for a, b, c, d, s, k in zip(cols["x0_px"], cols["y0_px"], cols["x1_px"], cols["y1_px"],
                                                 cols["score"], idx)]
            return {"mode": "boxes", "labels": names, "colours": colours, "n": t.num_rows, "boxes": boxes}

        return JSONResponse(await run_in_threadpool(work), headers=_security_headers())

    def _viewer_link(sid: str) -> str:
        return (f'<p style="font-family:system-ui,sans-serif"><a href="../viewer#slide={html.escape(sid)}">'
                'open in the viewer</a></p>')

    async def report(req: Request) -> Response:
        sid = req.path_params["slide_id"]
        if source.kind != "run" or not known(sid):
            return not_found("unknown slide")
        path = source.root / "reports" / f"{sid}.html"   # sid: 64 hex digits of a known slide
        if not path.is_file():
            return not_found("no report")
        page = await run_in_threadpool(path.read_text, "utf-8")
        page = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + _viewer_link(sid), page, count=1)
        return HTMLResponse(page, headers=_security_headers("report"))

    async def run_index(req: Request) -> Response:
        path = source.root / "index.html"
        if source.kind != "run" or not path.is_file():
            return not_found()
        page = await run_in_threadpool(path.read_text, "utf-8")

        def add_link(m: re.Match[str]) -> str:
            sid = m.group(2)
            return m.group(0) + (f' · <a href="viewer#slide={sid}">viewer</a>' if sid in source.slides else "")

        page = re.sub(r'<a href="(reports/([0-9a-f]{64})\.html)">.*?</a>', add_link, page)
        return HTMLResponse(page, headers=_security_headers("report"))

    routes = [
        Route("/", home), Route("/viewer", viewer), Route("/static/viewer.js", viewer_js),
        Route("/api/slides", api_slides),
        Route("/dzi/{slide_id}.dzi", dzi),
        Route("/dzi/{slide_id}_files/{level}/{col}_{row}.{fmt}", tile),
        Route("/api/detections/{slide_id}", detections),
        Route("/reports/{slide_id}.html", report), Route("/index.html", run_index),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(TokenMiddleware)])
    app.state.gp = st
    return app


def serve(source: str | Path, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          cache_bytes: int = DEFAULT_CACHE_BYTES, device: Literal["cpu", "cuda"] = "cpu") -> None:
    """Run :func:`create_app` under uvicorn until interrupted (ConfigError: unsafe bind, bad source)."""
    import uvicorn  # noqa: PLC0415

    check_bind(host, token)
    app = create_app(source, token=token, cache_bytes=cache_bytes, device=device)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)


@dataclass
class BackgroundServer:
    """A uvicorn server running in a daemon thread (tests and benchmarks); ``stop()`` ends it."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> BackgroundServer:
    """Start ``app`` under uvicorn in a thread on ``host:port`` (0: a free port) and wait until it listens."""
    import socket  # noqa: PLC0415
    import time  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    check_bind(host, token)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", server_header=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="gpupath-serve")
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return BackgroundServer(server, thread, host, sock.getsockname()[1])
