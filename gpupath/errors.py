"""One exception hierarchy for gpupath.

Every error a user can hit names the file, the thing and the value, and says what was
expected, so one line in a batch log is enough to act on.
"""

from __future__ import annotations

__all__ = [
    "GpupathError",
    "SlideReadError",
    "MetadataError",
    "ConfigError",
    "KernelError",
    "NoTissueError",
    "ResultsError",
]


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
