"""Human nucleus annotations on image tiles: the folder format, splits and the class map.

A dataset is one folder (the format of ``../shared/data/nuclei-train/``; a lab adds its own
annotations in the same shape)::

    <dataset>/images/<name>.png       RGB (any Pillow format: .png, .tif, .jpg)
    <dataset>/centroids/<name>.csv    header "x,y,class", one row per nucleus, image px with the
                                      centre of pixel c at c (the datasets' convention)
    <dataset>/meta.json               {"mpp": 0.5, "per_image": {"<name>": {"mpp": 0.5002}, ...}}

and optionally ``splits.json`` beside the dataset folders (``{"<dataset>": {"train": [names],
"validation": [names]}}``) or inside it (``{"train": [...], "validation": [...]}``). Without
splits every image is in the ``all`` split (and in ``train``).

Points come back in the half-open pixel convention of the rest of gpupath (pixel c covers
``[c, c + 1)``, so a centroid at pixel c is at ``c + 0.5``).

The class map (YAML, one file: ``gpupath/detect/models/class_map.yaml`` is the shipped one)
turns each dataset's class names into the model's classes::

    classes: [inflammatory, epithelial, stromal]   # the model's classes, in output order
    map:                                           # dataset class -> model class, any dataset
      lymphocyte: inflammatory
      tumor_epithelial: epithelial
    datasets:                                      # optional per-dataset overrides
      my_lab: {tumour: epithelial}

A class the map does not name stops with one line naming the file and the class.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpupath.errors import ConfigError

__all__ = ["AnnotatedImage", "ClassMap", "load_class_map", "read_dataset", "read_image", "dataset_splits",
           "SHIPPED_CLASS_MAP", "IMAGE_SUFFIXES"]

SHIPPED_CLASS_MAP = Path(__file__).parent / "models" / "class_map.yaml"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass(frozen=True, slots=True)
class AnnotatedImage:
    """One annotated image: where it is, its resolution and its nuclei."""

    dataset: str
    name: str
    path: Path
    mpp: float              # µm per image px
    x_px: np.ndarray        # (N,) float64, image px, half-open convention (pixel c spans [c, c + 1))
    y_px: np.ndarray        # (N,) float64
    label: np.ndarray       # (N,) int16, model class index (ClassMap.classes)

    def __len__(self) -> int:
        return int(self.x_px.shape[0])


@dataclass(frozen=True, slots=True)
class ClassMap:
    """Dataset class names -> model class index."""

    classes: tuple[str, ...]
    mapping: dict[str, str]
    per_dataset: dict[str, dict[str, str]]
    source: str

    def index(self, dataset: str, name: str, *, where: str) -> int:
        target = self.per_dataset.get(dataset, {}).get(name, self.mapping.get(name))
        if target is None:
            raise ConfigError(f"{where}: class {name!r} of dataset {dataset!r} is not in the class map "
                              f"{self.source} (add it under map: or datasets: {dataset}:)")
        return self.classes.index(target)


def load_class_map(path: str | Path = SHIPPED_CLASS_MAP) -> ClassMap:
    """Read and check a class-map YAML file (see the module docstring)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the class map ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list) or not raw["classes"]:
        raise ConfigError(f"{path}: a class map needs 'classes: [name, ...]'")
    classes = tuple(str(c) for c in raw["classes"])
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{path}: classes repeat a name: {list(classes)}")
    unknown_keys = set(raw) - {"classes", "map", "datasets", "why"}
    if unknown_keys:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown_keys)} (allowed: classes, map, datasets, why)")
    mapping = {str(k): str(v) for k, v in (raw.get("map") or {}).items()}
    per_dataset = {str(d): {str(k): str(v) for k, v in (m or {}).items()} for d, m in (raw.get("datasets") or {}).items()}
    for where, m in [("map", mapping), *((f"datasets.{d}", m) for d, m in per_dataset.items())]:
        bad = sorted(v for v in m.values() if v not in classes)
        if bad:
            raise ConfigError(f"{path}: {where} maps to {bad}, which are not among classes {list(classes)}")
    return ClassMap(classes, mapping, per_dataset, str(path))


def dataset_splits(root: Path) -> dict[str, list[str]] | None:
    """The dataset's splits (split name -> image names) from ``splits.json`` inside or beside it."""
    for candidate, key in ((root / "splits.json", None), (root.parent / "splits.json", root.name)):
        if not candidate.is_file():
            continue
        try:
            raw = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{candidate}: cannot read the splits ({exc})") from None
        part = raw.get(key) if key is not None else raw
        if key is not None and part is None:
            continue
        if not isinstance(part, dict):
            raise ConfigError(f"{candidate}: splits must map a split name to a list of image names")
        return {k: [str(n) for n in v] for k, v in part.items() if isinstance(v, list)}
    return None


def _meta(root: Path) -> dict[str, Any]:
    path = root / "meta.json"
    if not path.is_file():
        raise ConfigError(f"{root}: no meta.json (it gives the µm per pixel: {{\"mpp\": 0.5}})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return meta


def _image_mpp(meta: dict[str, Any], name: str, path: Path) -> float:
    per = (meta.get("per_image") or {}).get(name) or {}
    mpp = per.get("mpp", meta.get("mpp"))
    if not isinstance(mpp, (int, float)) or not 0.05 <= float(mpp) <= 20:
        raise ConfigError(f"{path}: no usable mpp for image {name!r} (meta.json 'mpp' or per_image.{name}.mpp, "
                          f"µm per pixel), got {mpp!r}")
    return float(mpp)


def _read_centroids(path: Path, dataset: str, class_map: ClassMap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, ys, labels = [], [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"x", "y", "class"} <= set(reader.fieldnames):
                raise ConfigError(f"{path}: header must be x,y,class, got {reader.fieldnames}")
            for row_no, row in enumerate(reader, start=2):
                try:
                    x, y = float(row["x"]), float(row["y"])
                except (TypeError, ValueError):
                    raise ConfigError(f"{path}:{row_no}: x, y must be numbers, got {row['x']!r}, {row['y']!r}") from None
                if not (np.isfinite(x) and np.isfinite(y)):
                    raise ConfigError(f"{path}:{row_no}: x, y must be finite")
                xs.append(x)
                ys.append(y)
                labels.append(class_map.index(dataset, (row["class"] or "").strip(), where=f"{path}:{row_no}"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    # pixel-centre-at-c -> half-open pixels (pixel c spans [c, c + 1))
    return np.asarray(xs, np.float64) + 0.5, np.asarray(ys, np.float64) + 0.5, np.asarray(labels, np.int16)


def read_dataset(root: str | Path, *, split: str | None = None,
                 class_map: ClassMap | None = None) -> list[AnnotatedImage]:
    """The annotated images of one dataset folder (of one split, or all).

    Parameters
    ----------
    root : the dataset folder (``images/``, ``centroids/``, ``meta.json``).
    split : ``train``, ``validation``, ... from ``splits.json``; None or ``all``: every image.
    class_map : dataset classes -> model classes (default: the shipped map).

    Raises
    ------
    ConfigError
        Missing folders or meta.json, an unknown split or class, a malformed CSV, an image
        listed in the split but absent.
    """
    root = Path(root)
    class_map = class_map or load_class_map()
    if not (root / "images").is_dir() or not (root / "centroids").is_dir():
        raise ConfigError(f"{root}: not an annotation dataset (needs images/ and centroids/ folders)")
    meta = _meta(root)
    images = {p.stem: p for p in sorted((root / "images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    names = sorted(images)
    if split not in (None, "all"):
        splits = dataset_splits(root)
        if splits is None:
            if split != "train":
                raise ConfigError(f"{root}: no splits.json, so there is no {split!r} split (use --split all)")
        elif split not in splits:
            raise ConfigError(f"{root}: no split {split!r} in splits.json (has {', '.join(sorted(splits))})")
        else:
            names = splits[split]
            missing = [n for n in names if n not in images]
            if missing:
                raise ConfigError(f"{root}: split {split!r} lists {len(missing)} image(s) not in images/, "
                                  f"e.g. {missing[0]!r}")
    out = []
    for name in names:
        csv_path = root / "centroids" / f"{name}.csv"
        if not csv_path.is_file():
            raise ConfigError(f"{csv_path}: missing (every image needs its centroids CSV)")
        x, y, label = _read_centroids(csv_path, root.name, class_map)
        out.append(AnnotatedImage(root.name, name, images[name], _image_mpp(meta, name, images[name]), x, y, label))
    return out


def read_image(image: AnnotatedImage) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an annotated image."""
    from PIL import Image

    try:
        with Image.open(image.path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise ConfigError(f"{image.path}: cannot read the image ({exc})") from None
