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
]

STRICT_ENV = "GPUPATH_STRICT"


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
