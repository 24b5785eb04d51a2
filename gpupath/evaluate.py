"""``gpupath evaluate``: detectors against human nucleus centroids, through the real pipeline.

Each image of an annotation dataset (:mod:`gpupath.detect.annotations`) is wrapped as a slide —
a lossless (Deflate) tiled TIFF whose resolution tags give the image's µm/px from meta.json — and
run by :func:`gpupath.pipeline.process_slide` exactly as ``gpupath run`` runs a slide (tissue
mask, 256-px tiles at 0.5 µm/px with 32-px overlap, stain normalisation, the detector, level-0
mapping, overlap de-duplication, Parquet). Detection centres (box centres) are then paired with
the human centroids by :mod:`gpupath.detect.matching` (HoVer-Net's pairing, 3 µm and 6 µm) and
scored pooled over the images, overall and per class.

Rows of one evaluation: the detector asked for (``--engine``, ``--model-card``) once per
``--stain``, and the comparisons (``--compare``): ``nuclei_v1`` (the earlier shipped model),
``classic`` (``--engine classic``) and ``skimage-log`` — the twenty-line script a lab writes
with scikit-image (``rgb2hed`` + ``blob_log`` on the whole image, :func:`skimage_log_points`),
which runs on the image directly, not through the pipeline.

Writes ``OUT/evaluation.json`` (atomic) and, with ``card=``, the figures into a model card.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpupath._version import __version__
from gpupath.detect.annotations import AnnotatedImage, ClassMap, load_class_map, read_dataset, read_image
from gpupath.detect.card import MODELS_DIR, SHIPPED_MODEL
from gpupath.detect.matching import MatchCounts
from gpupath.errors import ConfigError

__all__ = ["EvalRow", "evaluate_dataset", "wrap_as_slide", "skimage_log_points", "COMPARISONS", "MATCH_UM",
           "write_card_metrics"]

MATCH_UM = (3.0, 6.0)
COMPARISONS = ("nuclei_v1", "classic", "skimage-log")
# scikit-image baseline settings, fixed before any validation image was seen: the classic detector's
# radius range (2.5-5.5 µm), skimage's blob_log with 5 scales; the threshold is the one of 0.05 - 0.3
# with the best F1 on the training split of BRCA-M2C and CoNSeP (bench/eval_log_baseline.py)
SKIMAGE_RADIUS_UM = (2.5, 5.5)
SKIMAGE_THRESHOLD = 0.1
SKIMAGE_ROW = "skimage-log"


@dataclass(frozen=True, slots=True)
class EvalRow:
    """One detector setting evaluated on every image."""

    name: str
    engine: str = "auto"                  # a pipeline engine, or "skimage-log"
    model_card: str | None = None
    stain: str = "macenko"


def wrap_as_slide(image: AnnotatedImage, folder: Path) -> Path:
    """The image as a tiled, Deflate-compressed TIFF with its µm/px in the resolution tags (written once)."""
    import tifffile

    from gpupath.files import atomic_path

    path = folder / f"{image.dataset}-{image.name}.tif"
    if path.is_file():
        return path
    rgb = read_image(image)
    px_per_cm = 1e4 / image.mpp
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp) as tif:
            tif.write(rgb, tile=(256, 256), photometric="rgb", compression="zlib", metadata=None,
                      resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    return path


def skimage_log_points(rgb: np.ndarray, mpp: float, *, threshold: float = SKIMAGE_THRESHOLD) -> np.ndarray:
    """(N, 2) nucleus centres (x, y, half-open px) by scikit-image's LoG on the hematoxylin channel.

    The script a lab writes: ``rgb2hed``, hematoxylin rescaled to [0, 1] between its 1st and 99.5th
    percentile, ``blob_log`` with sigmas for radii 2.5-5.5 µm (s = r / sqrt(2)).
    """
    from skimage.color import rgb2hed
    from skimage.exposure import rescale_intensity
    from skimage.feature import blob_log

    h = rgb2hed(rgb)[..., 0]
    lo, hi = np.percentile(h, (1, 99.5))
    h = rescale_intensity(h, in_range=(lo, hi), out_range=(0.0, 1.0))
    r0, r1 = (r / mpp / math.sqrt(2.0) for r in SKIMAGE_RADIUS_UM)
    blobs = blob_log(h, min_sigma=r0, max_sigma=r1, num_sigma=5, threshold=threshold)
    return np.c_[blobs[:, 1] + 0.5, blobs[:, 0] + 0.5] if len(blobs) else np.zeros((0, 2))


def _pipeline_detector(row: EvalRow, device: str):  # noqa: ANN202
    from gpupath.pipeline import RunParams

    params = RunParams(stain=row.stain, engine=row.engine, model_card=row.model_card, reports=False,  # type: ignore[arg-type]
                       device=device)  # type: ignore[arg-type]
    detector, _ = params.make_detector()
    return params, detector


def _pipeline_points(slide: Path, run_dir: Path, params: Any, detector: Any, classes: tuple[str, ...]
                     ) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    from gpupath.pipeline import process_slide
    from gpupath.results import slide_part_paths

    res = process_slide(slide, run_dir, params, detector=detector, resume=False)
    if res.status != "ok":
        raise ConfigError(f"{slide}: the pipeline failed ({res.error})")
    t = pq.read_table(slide_part_paths(run_dir, res.slide_id)["detections"], columns=["x0_px", "y0_px", "x1_px",
                                                                                      "y1_px", "label"])
    xy = np.c_[(t.column("x0_px").to_numpy() + t.column("x1_px").to_numpy()) / 2,
               (t.column("y0_px").to_numpy() + t.column("y1_px").to_numpy()) / 2]
    index = {name: i for i, name in enumerate(classes)}
    names = t.column("label").to_pylist()
    return xy, np.array([index.get(n, -1) for n in names], np.int64)


def _row_json(row: EvalRow, counts: dict[float, MatchCounts], classes: tuple[str, ...], seconds: float,
              detector: Any | None, class_aware: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"row": row.name, "engine": detector.engine if detector else row.engine,
                           "model": detector.name if detector else SKIMAGE_ROW,
                           "model_sha256": detector.model_sha256 if detector else "", "stain": row.stain,
                           "seconds": round(seconds, 2)}
    for um, c in counts.items():
        s = c.scores(classes if class_aware else ())
        if not class_aware:
            s["per_class"], s["class_macro_f1"] = None, None
        out[f"at_{um:g}um"] = s
    return out


def evaluate_dataset(dataset: str | Path, *, rows: Sequence[EvalRow], out: Path, split: str | None = "validation",
                     class_map: ClassMap | None = None, device: str = "cpu", limit: int | None = None,
                     on_step: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Every row on every image of ``dataset``'s ``split``; returns (and writes) the evaluation record.

    Parameters
    ----------
    dataset : annotation dataset folder.
    rows : detector settings (pipeline engines or ``skimage-log``).
    out : folder for the wrapped slides, each row's pipeline outputs and ``evaluation.json``.
    split : ``validation``, ``train``, ... or None / ``all``.
    class_map : dataset classes -> model classes (default: the shipped map).
    limit : only the first ``limit`` images (a quick check).
    on_step : ``(row name, images done, images)`` after each image.
    """
    from gpupath.files import write_json_atomic

    class_map = class_map or load_class_map()
    images = read_dataset(dataset, split=split, class_map=class_map)[:limit]
    if not images:
        raise ConfigError(f"{dataset}: no images in split {split!r}")
    slides = [wrap_as_slide(im, out / "slides") for im in images]
    results = []
    for row in rows:
        if row.engine == SKIMAGE_ROW and not _has_skimage():
            results.append({"row": row.name, "skipped": "scikit-image is not installed (pip install "
                                                         "'gpupath[evaluate]')"})
            continue
        counts = {um: MatchCounts(len(class_map.classes)) for um in MATCH_UM}
        t0, detector = time.perf_counter(), None
        if row.engine == SKIMAGE_ROW:
            params = None
        else:
            params, detector = _pipeline_detector(row, device)
        class_aware = detector is not None and set(detector.classes) <= set(class_map.classes)
        for i, (image, slide) in enumerate(zip(images, slides, strict=True)):
            if detector is None:
                xy, label = skimage_log_points(read_image(image), image.mpp), None
                label = np.full(len(xy), -1, np.int64)
            else:
                xy, label = _pipeline_points(slide, out / "runs" / _slug(row.name), params, detector, class_map.classes)
            for um, c in counts.items():
                c.add(np.c_[image.x_px, image.y_px], image.label, xy, label, max_px=um / image.mpp)
            if on_step:
                on_step(row.name, i + 1, len(images))
        results.append(_row_json(row, counts, class_map.classes, time.perf_counter() - t0, detector, class_aware))
    record = {"dataset": Path(dataset).name, "path": str(Path(dataset).resolve()), "split": split or "all",
              "images": len(images), "truths": int(sum(len(im) for im in images)), "classes": list(class_map.classes),
              "class_map": class_map.source,
              "match": ("HoVer-Net pairing: Hungarian assignment over all truth x detection distances, pairs "
                        "farther than the radius dropped; detection centre = box centre; pooled over images"),
              "radius_um": list(MATCH_UM), "gpupath_version": __version__,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "rows": results}
    write_json_atomic(record, out / "evaluation.json")
    return record


def _has_skimage() -> bool:
    import importlib.util

    return importlib.util.find_spec("skimage") is not None


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def default_rows(*, engine: str, model_card: str | None, stains: Sequence[str], compare: Sequence[str]
                 ) -> list[EvalRow]:
    """The asked-for detector once per stain, then the comparisons (at the first stain)."""
    unknown = [c for c in compare if c not in COMPARISONS]
    if unknown:
        raise ConfigError(f"--compare takes {', '.join(COMPARISONS)}, got {', '.join(unknown)}")
    label = Path(model_card).stem if model_card else ("classic" if engine == "classic" else SHIPPED_MODEL)
    rows = [EvalRow(f"{label} stain={s}", engine, model_card, s) for s in stains]
    for c in compare:
        if c == "nuclei_v1" and label != "nuclei_v1":
            rows.append(EvalRow(f"nuclei_v1 stain={stains[0]}", "onnxruntime", str(MODELS_DIR / "nuclei_v1.yaml"),
                                stains[0]))
        elif c == "classic" and engine != "classic":
            rows.append(EvalRow(f"classic stain={stains[0]}", "classic", None, stains[0]))
        elif c == SKIMAGE_ROW:
            rows.append(EvalRow(SKIMAGE_ROW, SKIMAGE_ROW, None, "none"))
    return rows


def write_card_metrics(card_path: Path, record: dict[str, Any]) -> None:
    """Put an evaluation's figures under ``metrics.validation.<dataset>`` of a card (atomic rewrite)."""
    import yaml

    from gpupath.files import atomic_path

    text = card_path.read_text(encoding="utf-8")
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    card = yaml.safe_load(text)
    metrics = card.setdefault("metrics", {})
    if not isinstance(metrics.get("validation"), dict):
        metrics["validation"] = {}
    metrics["validation"][record["dataset"]] = {
        "split": record["split"], "images": record["images"], "nuclei": record["truths"], "match": record["match"],
        "date": record["date"],
        "rows": {r["row"]: {
            "f1_3um": round(r["at_3um"]["f1"], 4), "precision_3um": round(r["at_3um"]["precision"], 4),
            "recall_3um": round(r["at_3um"]["recall"], 4), "f1_6um": round(r["at_6um"]["f1"], 4),
            "found": r["at_3um"]["found"],
            "class_macro_f1_3um": None if r["at_3um"]["class_macro_f1"] is None else
            round(r["at_3um"]["class_macro_f1"], 4),
            "class_f1_3um": None if r["at_3um"]["per_class"] is None else
            {k: round(v["f1"], 4) for k, v in r["at_3um"]["per_class"].items()}}
            for r in record["rows"] if "skipped" not in r}}
    with atomic_path(card_path) as tmp:
        tmp.write_text(header + yaml.safe_dump(card, sort_keys=False, allow_unicode=True, width=110), encoding="utf-8")
