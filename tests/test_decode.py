"""Decoders: heatmap peaks and box lists -> boxes in tile px, checked on hand-made outputs."""

from __future__ import annotations

import numpy as np
import pytest

from gpupath.detect.decoders import BoxesOutput, HeatmapOutput, decode_boxes, decode_heatmap


def heat_outputs(n: int = 2, g: int = 16) -> dict[str, np.ndarray]:
    heat = np.zeros((n, 1, g, g), np.float32)
    size = np.full((n, 1, g, g), 5.0, np.float32)
    offset = np.full((n, 2, g, g), 0.5, np.float32)
    heat[0, 0, 3, 4] = 0.9           # cell (col 4, row 3)
    heat[0, 0, 3, 5] = 0.6           # its neighbour: not a local maximum
    offset[0, :, 3, 4] = (0.25, 0.75)
    size[0, 0, 3, 4] = 7.0
    heat[1, 0, 0, 15] = 0.7          # a border cell is a peak too
    heat[1, 0, 10, 10] = 0.3         # below the threshold
    return {"heatmap": heat, "size": size, "offset": offset}


def test_heatmap_peaks_become_boxes_at_cell_plus_offset() -> None:
    spec = HeatmapOutput(heatmap="heatmap", size="size", offset="offset", stride_px=4, threshold=0.5)
    got = decode_heatmap(heat_outputs(), spec)
    order = np.argsort(got.tile_index)
    np.testing.assert_array_equal(got.tile_index[order], [0, 1])
    cx, cy = (got.x0 + got.x1) / 2, (got.y0 + got.y1) / 2
    np.testing.assert_allclose(cx[order], [(4 + 0.25) * 4, (15 + 0.5) * 4])
    np.testing.assert_allclose(cy[order], [(3 + 0.75) * 4, (0 + 0.5) * 4])
    np.testing.assert_allclose((got.x1 - got.x0)[order], [14.0, 10.0])  # 2 x radius
    np.testing.assert_allclose(got.score[order], [0.9, 0.7], rtol=1e-6)
    assert got.label.dtype == np.int16 and (got.label == 0).all()


def test_heatmap_scale_maps_model_px_to_tile_px() -> None:
    spec = HeatmapOutput(heatmap="heatmap", size="size", offset="offset", stride_px=4, threshold=0.5)
    plain = decode_heatmap(heat_outputs(), spec)
    scaled = decode_heatmap(heat_outputs(), spec, scale_yx=(2.0, 0.5))  # model px per tile px
    np.testing.assert_allclose(scaled.x0, plain.x0 / 0.5)
    np.testing.assert_allclose(scaled.y1, plain.y1 / 2.0)


def test_heatmap_wh_size_and_classes_and_no_offset() -> None:
    heat = np.zeros((1, 3, 8, 8), np.float32)
    heat[0, 2, 5, 1] = 0.8
    size = np.zeros((1, 2, 8, 8), np.float32)
    size[0, :, 5, 1] = (6.0, 2.0)
    spec = HeatmapOutput(heatmap="h", size="s", size_kind="wh", stride_px=2, threshold=0.5)
    got = decode_heatmap({"h": heat, "s": size}, spec)
    assert len(got) == 1 and got.label[0] == 2
    np.testing.assert_allclose([got.x0[0], got.y0[0], got.x1[0], got.y1[0]], [0.0, 10.0, 6.0, 12.0])


def test_class_probabilities_label_each_peak_once() -> None:
    outs = heat_outputs()
    probs = np.zeros((2, 3, 16, 16), np.float32)
    probs[:, 0] = 1.0                  # class 0 everywhere ...
    probs[0, :, 3, 4] = (0.2, 0.1, 0.7)  # ... but the first peak's cell says class 2
    outs["classes"] = probs
    spec = HeatmapOutput(heatmap="heatmap", size="size", offset="offset", class_probs="classes", stride_px=4,
                         threshold=0.5)
    got = decode_heatmap(outs, spec)
    order = np.argsort(got.tile_index)
    np.testing.assert_array_equal(got.tile_index[order], [0, 1])   # one detection per peak, not per class
    np.testing.assert_array_equal(got.label[order], [2, 0])
    np.testing.assert_allclose(got.score[order], [0.9, 0.7], rtol=1e-6)  # the score is the heatmap's
    outs["classes"] = probs[:, :, :8]
    with pytest.raises(ValueError, match="same grid"):
        decode_heatmap(outs, spec)
    outs["heatmap"] = np.zeros((2, 3, 16, 16), np.float32)
    outs["classes"] = probs
    with pytest.raises(ValueError, match=r"must be \(N, 1, h, w\)"):
        decode_heatmap(outs, spec)


def test_heatmap_empty_and_bad_shapes() -> None:
    spec = HeatmapOutput(heatmap="heatmap", size="size", offset="offset", stride_px=4, threshold=0.95)
    assert len(decode_heatmap(heat_outputs(), spec)) == 0
    bad = heat_outputs()
    bad["size"] = bad["size"][:, :, :8]
    with pytest.raises(ValueError, match="size output"):
        decode_heatmap(bad, spec)
    with pytest.raises(KeyError, match="offset"):
        decode_heatmap({k: v for k, v in heat_outputs().items() if k != "offset"}, spec)


def box_outputs() -> dict[str, np.ndarray]:
    boxes = np.array([[[10, 20, 30, 60], [0, 0, 5, 5], [8, 8, 8, 9]],
                      [[1, 2, 3, 4], [50, 50, 70, 90], [0, 0, 0, 0]]], np.float32)
    scores = np.array([[0.9, 0.2, 0.9], [0.6, 0.8, 0.0]], np.float32)
    labels = np.array([[1, 0, 0], [0, 2, 0]], np.int64)
    return {"b": boxes, "s": scores, "l": labels}


def test_box_list_threshold_labels_and_empty_boxes() -> None:
    got = decode_boxes(box_outputs(), BoxesOutput(boxes="b", scores="s", labels="l", threshold=0.5),
                       input_hw=(100, 100))
    # kept: (0, 0) and (1, 0), (1, 1); (0, 2) is empty (x1 == x0), (0, 1) below threshold
    np.testing.assert_array_equal(got.tile_index, [0, 1, 1])
    np.testing.assert_allclose(got.x0, [10, 1, 50])
    np.testing.assert_allclose(got.y1, [60, 4, 90])
    np.testing.assert_array_equal(got.label, [1, 0, 2])


def test_box_list_cxcywh_normalized_and_scale() -> None:
    out = {"b": np.array([[[0.5, 0.25, 0.2, 0.1]]], np.float32), "s": np.array([[0.7]], np.float32)}
    spec = BoxesOutput(boxes="b", scores="s", box_format="cxcywh", box_units="normalized", threshold=0.5)
    got = decode_boxes(out, spec, input_hw=(200, 100), scale_yx=(2.0, 1.0))
    # input px: cx 50, cy 50, w 20, h 20 -> xyxy (40, 40, 60, 60); tile px: y / 2
    np.testing.assert_allclose([got.x0[0], got.y0[0], got.x1[0], got.y1[0]], [40, 20, 60, 30])
    assert got.label[0] == 0


def test_box_list_shape_errors() -> None:
    out = box_outputs()
    with pytest.raises(ValueError, match="must be"):
        decode_boxes({"b": out["b"][..., :3], "s": out["s"]}, BoxesOutput(boxes="b", scores="s"), input_hw=(1, 1))
    with pytest.raises(ValueError, match="labels"):
        decode_boxes({**out, "l": out["l"][:, :2]}, BoxesOutput(boxes="b", scores="s", labels="l"), input_hw=(1, 1))


def test_tied_neighbours_give_one_peak() -> None:
    # fp16 engines round neighbouring cells to the same score: one nucleus, one detection
    heat = np.zeros((1, 1, 8, 8), np.float32)
    heat[0, 0, 2, 2] = heat[0, 0, 2, 3] = heat[0, 0, 3, 3] = np.float16(0.8)
    heat[0, 0, 6, 6] = heat[0, 0, 6, 4] = 0.7  # two cells apart: two separate peaks, both kept
    out = {"h": heat, "s": np.full((1, 1, 8, 8), 3.0, np.float32)}
    got = decode_heatmap(out, HeatmapOutput(heatmap="h", size="s", stride_px=4, threshold=0.5))
    cx = np.sort((got.x0 + got.x1) / 2)
    np.testing.assert_allclose(cx, [(2 + 0.5) * 4, (4 + 0.5) * 4, (6 + 0.5) * 4])  # the earliest tied cell wins


@pytest.mark.gpu
def test_decoders_on_cupy_match_numpy() -> None:
    import cupy

    spec = HeatmapOutput(heatmap="heatmap", size="size", offset="offset", stride_px=4, threshold=0.5)
    rng = np.random.default_rng(0)
    out = heat_outputs(n=3, g=32)
    out["heatmap"] = rng.random(out["heatmap"].shape).astype(np.float32)
    host = decode_heatmap(out, spec)
    dev = decode_heatmap({k: cupy.asarray(v) for k, v in out.items()}, spec)
    for field in ("tile_index", "x0", "y0", "x1", "y1", "score", "label"):
        a, b = getattr(host, field), getattr(dev, field)
        order_a, order_b = np.lexsort((host.x0, host.y0, host.tile_index)), np.lexsort((dev.x0, dev.y0, dev.tile_index))
        np.testing.assert_allclose(a[order_a], b[order_b], rtol=1e-6)
    bspec = BoxesOutput(boxes="b", scores="s", labels="l", threshold=0.5)
    h = decode_boxes(box_outputs(), bspec, input_hw=(100, 100))
    d = decode_boxes({k: cupy.asarray(v) for k, v in box_outputs().items()}, bspec, input_hw=(100, 100))
    np.testing.assert_allclose(h.x0, d.x0)
    np.testing.assert_array_equal(h.label, d.label)
