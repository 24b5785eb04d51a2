"""Tile server + viewer over a run folder or a store (see :mod:`gpupath.serve.app`)."""

from gpupath.serve._protocol import BODY_TIMEOUT_S, HEADER_TIMEOUT_S
from gpupath.serve._tiles import DziGeometry, TileCache, render_tile
from gpupath.serve.app import (
                               DEFAULT_CACHE_BYTES,
                               SLIDE_ID_RE,
                               ServedSlide,
                               ServeSource,
                               check_bind,
                               create_app,
                               is_loopback,
                               load_source,
                               serve,
                               serve_in_thread,
)

__all__ = ["DziGeometry", "TileCache", "render_tile", "ServedSlide", "ServeSource", "load_source", "create_app",
           "check_bind", "is_loopback", "serve", "serve_in_thread", "SLIDE_ID_RE", "DEFAULT_CACHE_BYTES",
           "HEADER_TIMEOUT_S", "BODY_TIMEOUT_S"]
