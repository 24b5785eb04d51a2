"""Annotation datasets: the folder format, splits, the class map, and every malformed-input path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpupath.detect.annotations import load_class_map, read_dataset, read_image
from gpupath.errors import ConfigError
from conftest import nuclei_dataset


def make_dataset(root: Path, *, rows: dict[str, str], mpp: object = 0.5, splits: dict | None = None) -> Path:
    """A dataset folder with one 32 x 24 image per entry of ``rows`` (CSV text after the header)."""
    (root / "images").mkdir(parents=True)
    (root / "centroids").mkdir()
    for name, body in rows.items():
        Image.fromarray(np.full((24, 32, 3), 200, np.uint8)).save(root / "images" / f"{name}.png")
        (root / "centroids" / f"{name}.csv").write_text("x,y,class\n" + body, encoding="utf-8")
    (root / "meta.json").write_text(json.dumps({"mpp": mpp}), encoding="utf-8")
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    return root


def test_shared_datasets_read_with_their_splits_and_counts() -> None:
    # figures of ../shared/data/nuclei-train/README.md
    for name, n_train, n_val, nuclei_train, nuclei_val in (("brca_m2c", 92, 23, 22_445, 6_623),
                                                            ("consep", 27, 14, 15_555, 8_776)):
        root = nuclei_dataset(name)
        train, val = read_dataset(root, split="train"), read_dataset(root, split="validation")
        assert (len(train), len(val)) == (n_train, n_val)
        assert (sum(map(len, train)), sum(map(len, val))) == (nuclei_train, nuclei_val)
        assert not {i.name for i in train} & {i.name for i in val}
        assert all(0.49 < i.mpp < 0.51 for i in train + val)
        labels = np.concatenate([i.label for i in train])
        assert set(np.unique(labels)) == {0, 1, 2}  # every dataset class reaches a model class


def test_points_move_to_half_open_pixels_and_classes_map(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "lab", rows={"a": "3,4,lymphocyte\n10.5,2,spindle_or_misc\n"})
    (im,) = read_dataset(root)
    np.testing.assert_allclose(im.x_px, [3.5, 11.0])
    np.testing.assert_allclose(im.y_px, [4.5, 2.5])
    classes = load_class_map().classes
    assert [classes[i] for i in im.label] == ["inflammatory", "stromal"]
    assert read_image(im).shape == (24, 32, 3) and im.mpp == 0.5


def test_a_lab_class_map_with_per_dataset_overrides(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "my_lab", rows={"a": "1,1,tumour\n2,2,lymphocyte\n"})
    cmap = tmp_path / "map.yaml"
    cmap.write_text("classes: [immune, tumour]\nmap: {lymphocyte: immune}\ndatasets: {my_lab: {tumour: tumour}}\n")
    (im,) = read_dataset(root, class_map=load_class_map(cmap))
    np.testing.assert_array_equal(im.label, [1, 0])


@pytest.mark.parametrize(("rows", "match"), [
    ({"a": "1,1,mitosis\n"}, r"a\.csv:2: class 'mitosis' of dataset 'lab' is not in the class map"),
    ({"a": "one,1,lymphocyte\n"}, r"a\.csv:2: x, y must be numbers"),
    ({"a": "nan,1,lymphocyte\n"}, r"a\.csv:2: x, y must be finite"),
])
def test_bad_rows_name_the_file_line_and_problem(tmp_path: Path, rows: dict, match: str) -> None:
    root = make_dataset(tmp_path / "lab", rows=rows)
    with pytest.raises(ConfigError, match=match):
        read_dataset(root)


def _no_meta(root: Path) -> None:
    (root / "meta.json").unlink()


def _bad_header(root: Path) -> None:
    (root / "centroids" / "a.csv").write_text("col,row,kind\n1,1,x\n")


def _no_csv(root: Path) -> None:
    (root / "centroids" / "a.csv").unlink()


def test_a_folder_that_is_no_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an annotation dataset"):
        read_dataset(tmp_path)


@pytest.mark.parametrize("mpp, damage, match", [
    pytest.param("half", None, "no usable mpp for image 'a'", id="mpp-not-a-number"),
    pytest.param(0.5, _no_meta, "no meta.json", id="no-meta"),
    pytest.param(0.5, _bad_header, "header must be x,y,class", id="csv-header"),
    pytest.param(0.5, _no_csv, r"a\.csv: missing", id="csv-missing"),
])
def test_bad_datasets_are_refused_naming_the_problem(tmp_path: Path, mpp: object,
                                                     damage: Callable[[Path], None] | None, match: str) -> None:
    root = make_dataset(tmp_path / "lab", rows={"a": "1,1,lymphocyte\n"}, mpp=mpp)
    if damage is not None:
        damage(root)
    with pytest.raises(ConfigError, match=match):
        read_dataset(root)


def test_splits_inside_the_folder_and_their_errors(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "lab", rows={"a": "1,1,lymphocyte\n", "b": ""},
                        splits={"train": ["a"], "validation": ["b"]})
    assert [i.name for i in read_dataset(root, split="validation")] == ["b"]
    assert len(read_dataset(root, split="all")) == 2
    with pytest.raises(ConfigError, match="no split 'test' in splits.json"):
        read_dataset(root, split="test")
    (root / "splits.json").write_text(json.dumps({"train": ["a", "zzz"]}))
    with pytest.raises(ConfigError, match="lists 1 image.*'zzz'"):
        read_dataset(root, split="train")
    (root / "splits.json").unlink()
    assert len(read_dataset(root, split="train")) == 2  # no splits: everything is training data
    with pytest.raises(ConfigError, match="no splits.json, so there is no 'validation' split"):
        read_dataset(root, split="validation")


def test_class_map_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "map.yaml"
    for text, match in (("classes: []\n", "needs 'classes"), ("classes: [a, a]\n", "repeat a name"),
                        ("classes: [a]\nmap: {x: b}\n", r"maps to \['b'\]"), ("classes: [a]\nextra: 1\n", "unknown key"),
                        ("classes: [a\n", "cannot read the class map")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_class_map(bad)
