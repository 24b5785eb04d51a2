"""gpupath: GPU-native whole-slide image pipeline."""

from gpupath._version import __version__

__all__ = ["__version__"]
