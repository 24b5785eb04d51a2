"""Detection: engines that find objects in tile batches, and level-0 box handling."""

from gpupath.detect.boxes import Detections, dedup_overlaps, to_global
from gpupath.detect.classic import ClassicParams, detect_nuclei

__all__ = ["Detections", "dedup_overlaps", "to_global", "ClassicParams", "detect_nuclei"]
