"""Detection: engines that find objects in tile batches, model cards, decoding, and level-0 box handling."""

from gpupath.detect.boxes import Detections, boxes_to_global, dedup_overlaps
from gpupath.detect.card import ModelCard, load_card, shipped_card
from gpupath.detect.classic import ClassicParams, detect_nuclei
from gpupath.types import TileBoxes
from gpupath.detect.detector import ClassicDetector, Detector, LearnedDetector, make_detector

__all__ = [
    "Detections", "dedup_overlaps", "boxes_to_global", "ClassicParams", "detect_nuclei",
    "ModelCard", "load_card", "shipped_card", "TileBoxes", "Detector", "ClassicDetector", "LearnedDetector",
    "make_detector",
]
