"""One exception hierarchy for gpupath.

Every error a user can hit names the file, the thing and the value, and says what was
expected, so one line in a batch log is enough to act on.

Broad guards (one slide, one source, one report, one engine tried by ``auto``) keep a batch going
whatever fails inside them. A :class:`GpupathError` there is an expected failure: one line. Anything
else is a bug or a failure nobody foresaw: :func:`unexpected` logs it at WARNING with its traceback,
and under the test suite (``GPUPATH_STRICT=1``, set by tests/conftest.py) raises it again, so a bug
fails a test instead of passing as a failed slide.
"""

from __future__ import annotations

import logging
import os

__all__ = [
    "GpupathError",
    "SlideReadError",
    "MetadataError",
    "ConfigError",
    "KernelError",
    "NoTissueError",
    "ResultsError",
    "STRICT_ENV",
    "unexpected",
    "one_line",
]

STRICT_ENV = "GPUPATH_STRICT"

# every character that ends or moves a terminal line, or drives the terminal: C0 and C1 controls, DEL, and
# Unicode's line and paragraph separators; mapped to a visible escape
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: object) -> str:
    """``text`` as one printable line: newlines, carriage returns, tabs, escape sequences and every other
    control character shown as backslash escapes (``a\nb`` -> ``a\\nb``), so a file name cannot end a
    message or forge the next one. The one printer of names in messages (CLI lines, table cells, logs)."""
    return str(text).translate(_CONTROL)


class GpupathError(Exception):
    """Base class of every error raised on purpose by gpupath."""


class SlideReadError(GpupathError):
    """A slide file is missing, empty, not a slide, or its pixels cannot be decoded."""


class MetadataError(GpupathError):
    """A slide lacks metadata a stage needs (e.g. microns per pixel)."""


class ConfigError(GpupathError, ValueError):
    """Parameters that cannot work together (e.g. overlap >= tile size)."""


class KernelError(GpupathError):
    """A device kernel failed to compile or launch."""


class NoTissueError(GpupathError):
    """The tissue mask of a slide is empty: there is nothing to tile."""


class ResultsError(GpupathError):
    """A run folder's outputs are missing, not gpupath's, or of a schema version this gpupath does not read."""


def unexpected(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """Inside a broad guard: log a non-GpupathError ``exc`` at WARNING with its traceback (``what``: the
    file or item it cost), and raise it again when ``GPUPATH_STRICT=1``. A GpupathError passes silently
    (the guard reports its one line)."""
    if isinstance(exc, GpupathError):
        return
    logger.warning("%s: unexpected %s: %s", what, type(exc).__name__, exc, exc_info=exc)
    if os.environ.get(STRICT_ENV) == "1":
        raise exc
