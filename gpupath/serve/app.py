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

import errno
import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gpupath.errors import ConfigError
from gpupath.serve._routes import AppState, Handlers, TokenMiddleware
from gpupath.serve._source import SLIDE_ID_RE, ServedSlide, ServeSource, load_source
from gpupath.serve._tiles import TILE_FORMATS

log = logging.getLogger("gpupath.serve")

__all__ = ["ServedSlide", "ServeSource", "load_source", "create_app", "serve", "serve_in_thread", "BackgroundServer",
           "check_bind", "is_loopback",
           "SLIDE_ID_RE", "DEFAULT_CACHE_BYTES"]

DEFAULT_CACHE_BYTES = 256 * 2**20


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
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    if tile_format not in TILE_FORMATS:
        raise ValueError(f"tile_format {tile_format!r}: expected one of {sorted(TILE_FORMATS)}")
    if not isinstance(source, ServeSource):
        source = load_source(source)
    st = AppState(source, cache_bytes, device, tile_format, quality)
    app = Starlette(routes=Handlers(st).routes(),
                    middleware=[Middleware(TokenMiddleware, secret=token.encode() if token else None)])
    # no "/viewer/" -> "/viewer" redirects: Starlette builds them from the Host header, so a forged Host
    # would send the browser to another site; an unknown path is a 404
    app.router.redirect_slashes = False
    app.state.gp = st
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening (ConfigError, one line, when the port is taken or the
    address is not this machine's): bound before anything says "serving"."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"--host {host}: not an address to bind ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "in use by another program" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port}: {reason}") from None
    return sock


def serve(source: str | Path, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          cache_bytes: int = DEFAULT_CACHE_BYTES, device: Literal["cpu", "cuda"] = "cpu",
          on_listening: Any = None) -> None:
    """Run :func:`create_app` under uvicorn until interrupted (ConfigError: unsafe bind, bad source, a port
    in use). ``on_listening()`` is called once the socket listens, before the first request."""
    import uvicorn

    check_bind(host, token)
    app = create_app(source, token=token, cache_bytes=cache_bytes, device=device)
    sock = listening_socket(host, port)
    if on_listening is not None:
        on_listening()
    server = uvicorn.Server(uvicorn_config(app))
    server.run(sockets=[sock])


def uvicorn_config(app: Any, **kwargs: Any) -> Any:
    """uvicorn's settings for our server: its h11 protocol with deadlines on half-sent requests
    (:class:`gpupath.serve._protocol.DeadlineH11Protocol`), no server header, warnings only."""
    import uvicorn

    from gpupath.serve._protocol import DeadlineH11Protocol

    return uvicorn.Config(app, http=DeadlineH11Protocol, log_level="warning", server_header=False, **kwargs)


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
    import socket
    import time

    import uvicorn

    check_bind(host, token)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="gpupath-serve")
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return BackgroundServer(server, thread, host, sock.getsockname()[1])
