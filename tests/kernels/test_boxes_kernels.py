"""Centre-ownership kernel vs its NumPy twin and vs gpupath.detect.boxes.own_by_centre.

Runs the Numba kernel under the CUDA simulator on NumPy arrays (no GPU), and on CuPy arrays when a
GPU is present (``gpu`` mark). Tolerance everywhere: exact (the same float64 operations in the same
order, then integer comparisons).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpupath.detect.boxes as boxes_stage
from conftest import data_file
from gpupath.detect.boxes import Detections, GridLayout, boxes_to_global
from gpupath.types import TileBoxes
from gpupath.detect.classic import ClassicParams, detect_nuclei
from gpupath.slide import open_slide
from conftest import Backend
from helpers_boxes import ALL_TILES, seen_by_tiles
from kernel_helpers import assert_compiles_for_gpu
from gpupath_kernels.boxes import own_by_centre, own_by_centre_ref

STRIDE, OVERLAP = 448.0, 64.0   # level-0 px; boundaries at 32 + 448 k


def random_case(rng: np.random.Generator, m: int, n_cols: int, n_rows: int) -> dict[str, np.ndarray]:
    """Centres over (and a little beyond) the grid, each reported by its owner or a neighbour;
    a quarter of them exactly on an ownership boundary or a margin's edge."""
    cx = rng.uniform(-50, STRIDE * n_cols + 50, m)
    cy = rng.uniform(-50, STRIDE * n_rows + 50, m)
    on_line = rng.random(m) < 0.25
    k = rng.integers(0, max(n_cols, n_rows) + 1, m)
    cx[on_line] = k[on_line] * STRIDE + OVERLAP / 2 + rng.choice([-5.0, 0.0, 5.0], int(on_line.sum()))
    col = np.clip(np.floor(cx / STRIDE) + rng.integers(-1, 2, m), 0, n_cols - 1).astype(np.int64)
    row = np.clip(np.floor(cy / STRIDE) + rng.integers(-1, 2, m), 0, n_rows - 1).astype(np.int64)
    processed = (rng.random((n_rows, n_cols)) < 0.7).astype(np.uint8)
    return {"cx": cx, "cy": cy, "col": col, "row": row, "processed": processed}


def run_both(backend: Backend, case: dict[str, np.ndarray], margin: float) -> None:
    kw = {"stride_l0": STRIDE, "overlap_l0": OVERLAP, "margin_l0_px": margin}
    keep, look = own_by_centre(*(backend.put(case[k]) for k in ("cx", "cy", "col", "row")),
                               processed=backend.put(case["processed"]), **kw)
    want_keep, want_look = own_by_centre_ref(case["cx"], case["cy"], case["col"], case["row"],
                                             processed=case["processed"], **kw)
    keep, look = backend.get(keep), backend.get(look)
    assert keep.dtype == bool and look.dtype == bool
    np.testing.assert_array_equal(keep, want_keep)  # exact
    np.testing.assert_array_equal(look, want_look)


@pytest.mark.parametrize("m, n_cols, n_rows", [(0, 1, 1), (1, 1, 1), (5, 3, 2), (300, 4, 5)])  # 300 > one block
@pytest.mark.parametrize("margin", [0.0, 5.0])
def test_masks_match_twin(backend: Backend, m: int, n_cols: int, n_rows: int, margin: float) -> None:
    case = random_case(np.random.default_rng(m + n_cols), m, n_cols, n_rows)
    run_both(backend, case, margin)


def test_non_contiguous_inputs(backend: Backend) -> None:
    case = random_case(np.random.default_rng(11), 80, 4, 3)
    strided = {k: v[::2] for k, v in case.items() if k != "processed"}
    strided["processed"] = np.asfortranarray(case["processed"])[:, ::-1]
    assert not strided["cx"].flags.c_contiguous and not strided["processed"].flags.c_contiguous
    run_both(backend, strided, 5.0)


def test_twin_is_the_stage() -> None:
    """The twin on a bitmap answers as gpupath.detect.boxes.own_by_centre on the set of tiles."""
    rng = np.random.default_rng(2)
    processed = ALL_TILES - {(1, 0), (2, 2)}
    seen = seen_by_tiles(rng.uniform(0, 1800, (120, 2)), rng=rng, jitter=0.4, processed=processed)
    bitmap = np.zeros((4, 4), np.uint8)
    for c, r in processed:
        bitmap[r, c] = 1
    layout = GridLayout(stride_l0=STRIDE, overlap_l0=OVERLAP, processed=bitmap.astype(bool))
    kept, look = boxes_stage.own_by_centre(seen, layout, margin_l0_px=5.0)
    keep, look_all = own_by_centre_ref(seen.cx.astype(np.float64), seen.cy.astype(np.float64),
                                       np.rint(seen.tile_x / STRIDE), np.rint(seen.tile_y / STRIDE),
                                       stride_l0=STRIDE, overlap_l0=OVERLAP, processed=bitmap, margin_l0_px=5.0)
    np.testing.assert_array_equal(seen.take(np.flatnonzero(keep)).cx, kept.cx)
    np.testing.assert_array_equal(look_all[keep], look)


def real_detections() -> tuple[Detections, GridLayout]:
    """Classic detections on a 3 x 3 grid of overlapping 64 px tiles of the CMU-1 crop (level 0)."""
    slide = open_slide(data_file("cmu-1-small-region.svs"))
    size, stride = 64, 48
    origins = [(1000 + c * stride, 1200 + r * stride) for r in range(3) for c in range(3)]
    tiles = np.stack([slide.read_rgb(o, 0, (size, size)) for o in origins])
    found = detect_nuclei(tiles, mpp=0.5, params=ClassicParams(radius_um=(1.5, 3.0), n_scales=2, threshold=0.05))
    ox = np.array([o[0] for o in origins], np.int64) - 1000  # grid origin at (0, 0)
    oy = np.array([o[1] for o in origins], np.int64) - 1200
    boxes = TileBoxes.from_centres(tile_index=found.tile_index, cx_px=found.cx_px, cy_px=found.cy_px,
                                   half_w_px=found.radius_px, half_h_px=found.radius_px, score=found.score,
                                   label=np.zeros(len(found.score), np.int16))
    det = boxes_to_global(boxes, origin_x=ox.astype(float), origin_y=oy.astype(float), tile_x=ox, tile_y=oy,
                          l0_per_px=1.0)
    processed = np.ones((3, 3), bool)
    processed[1, 1] = False  # the middle tile was not read
    return det, GridLayout(stride_l0=stride, overlap_l0=size - stride, processed=processed)


def test_kernel_on_real_detections_is_the_stage(backend: Backend) -> None:
    """The ownership kernel (simulator on NumPy, or CuPy on a GPU) fed with real classic detections, its
    inputs built here from the grid (not by the stage), keeps what the stage's host path keeps.

    The stage's own device branch (``_own_by_centre_device``) runs only on CuPy detections: no real
    host run reaches it, so it is test_stage_on_cupy_detections's (``gpu`` mark), not patched here."""
    det, layout = real_detections()
    assert len(det) >= 10
    host_kept, host_look = boxes_stage.own_by_centre(det, layout, margin_l0_px=2.0)
    assert 0 < len(host_kept) < len(det)  # the overlaps saw some nuclei twice
    stride = 48  # real_detections' grid: 64 px tiles every 48 px, origins at multiples of 48
    assert layout.stride_l0 == stride and not (det.tile_x % stride).any() and not (det.tile_y % stride).any()
    bitmap = np.ones((3, 3), np.uint8)
    bitmap[1, 1] = 0  # the one tile real_detections leaves out
    keep, look = own_by_centre(*(backend.put(a) for a in (det.cx.astype(np.float64), det.cy.astype(np.float64),
                                                           det.tile_x // stride, det.tile_y // stride)),
                               stride_l0=48.0, overlap_l0=16.0, processed=backend.put(bitmap), margin_l0_px=2.0)
    keep, look = backend.get(keep), backend.get(look)
    np.testing.assert_array_equal(det.take(np.flatnonzero(keep)).cx, host_kept.cx)
    np.testing.assert_array_equal(det.take(np.flatnonzero(keep)).tile_x, host_kept.tile_x)
    np.testing.assert_array_equal(look[keep], host_look)


@pytest.mark.parametrize("kwargs, match", [
    ({"cy": np.zeros(3)}, "one length"),
    ({"processed": np.zeros((0, 2), np.uint8)}, "non-empty"),
    ({"processed": np.zeros(4, np.uint8)}, "bitmap"),
    ({"stride_l0": 0.0}, "stride_l0 > 0"),
    ({"margin_l0_px": -1.0}, "margin_l0_px >= 0"),
])
def test_bad_input(kwargs: dict[str, Any], match: str) -> None:
    args = {"cx": np.zeros(2), "cy": np.zeros(2), "col": np.zeros(2, np.int64), "row": np.zeros(2, np.int64),
            "stride_l0": STRIDE, "overlap_l0": OVERLAP, "processed": np.ones((2, 2), np.uint8)} | kwargs
    with pytest.raises(ValueError, match=match):
        own_by_centre(args.pop("cx"), args.pop("cy"), args.pop("col"), args.pop("row"), **args)


def brute_force_ownership(cx: np.ndarray, cy: np.ndarray, col: np.ndarray, row: np.ndarray, processed: np.ndarray,
                          *, stride: float, overlap: float, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """keep, look by scanning each tile's owned interval (no floor, no clip): tile k owns
    [k * stride + overlap / 2, (k + 1) * stride + overlap / 2), the first from -inf, the last to +inf."""
    n_rows, n_cols = processed.shape

    def interval(k: int, n: int) -> tuple[float, float]:
        return (-np.inf if k == 0 else k * stride + overlap / 2,
                np.inf if k == n - 1 else (k + 1) * stride + overlap / 2)

    def owner(v: float, n: int) -> int:
        (k,) = [k for k in range(n) if interval(k, n)[0] <= v < interval(k, n)[1]]
        return k

    keep, look = np.zeros(len(cx), bool), np.zeros(len(cx), bool)
    for i, (x, y, c, r) in enumerate(zip(cx.tolist(), cy.tolist(), col.tolist(), row.tolist())):
        oc, orow = owner(x, n_cols), owner(y, n_rows)
        owned = (oc, orow) == (c, r)
        (xlo, xhi), (ylo, yhi) = interval(c, n_cols), interval(r, n_rows)
        near = not owned and margin > 0 and xlo <= x + margin and x - margin < xhi and ylo <= y + margin \
            and y - margin < yhi  # within the margin of the reporting tile's owned area
        orphan = processed[orow, oc] == 0
        keep[i], look[i] = owned or near or orphan, near or orphan
    return keep, look


@pytest.mark.parametrize("margin", [0.0, 5.0])
def test_twin_is_brute_force(margin: float) -> None:
    """The twin (every kernel test's reference) against interval scans, with centres on boundaries and margin edges."""
    case = random_case(np.random.default_rng(5), 400, 4, 5)
    keep, look = own_by_centre_ref(case["cx"], case["cy"], case["col"], case["row"], stride_l0=STRIDE,
                                   overlap_l0=OVERLAP, processed=case["processed"], margin_l0_px=margin)
    want_keep, want_look = brute_force_ownership(case["cx"], case["cy"], case["col"], case["row"], case["processed"],
                                                 stride=STRIDE, overlap=OVERLAP, margin=margin)
    assert 0 < want_keep.sum() < len(want_keep) and (want_look & ~want_keep).sum() == 0
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_array_equal(look, want_look)


def test_bench_case_runs_its_twin() -> None:
    from gpupath_kernels.boxes import bench_cases

    (case,) = bench_cases()
    args = case.make_input(np.random.default_rng(0), 10_000)
    cx, cy, col, row, processed = args
    assert cx.shape == (100,) and processed.shape == (64, 64)  # one detection per 100 px, a 64 x 64 grid
    keep, look = case.run_twin(*args)
    want_keep, want_look = brute_force_ownership(cx, cy, col, row, processed, stride=448.0, overlap=64.0, margin=5.0)
    assert 0 < want_keep.sum() < 100 and want_look.any()  # the case has dropped, kept and looked-at detections
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_array_equal(look, want_look)
    # bytes moved, counted from the arrays themselves: the four per-detection inputs read, and the two
    # masks written as one byte per detection (the 4 KiB grid bitmap, read through the cache, is not counted)
    written = np.empty(len(cx), np.uint8).nbytes * 2
    assert case.bytes_moved(args) == sum(a.nbytes for a in (cx, cy, col, row)) + written


_PTX_BODY = """    from gpupath_kernels import boxes
    f64, i64 = T.Array(T.float64, 1, "A"), T.Array(T.int64, 1, "A")
    for idx64 in (False, True):
        ptx, _ = cuda.compile_ptx(boxes._own_kernel(idx64).py_func, (f64, f64, i64, i64, T.float64, T.float64,
                                  T.float64, T.Array(T.uint8, 2, "A"), T.uint8[::1], T.uint8[::1]), cc=(9, 0))
        assert "div.rn.f64" in ptx, "IEEE division, as NumPy"
    print("OK")
"""


def test_kernel_compiles_for_the_gpu() -> None:
    """Type inference and PTX for sm_90 (the simulator runs Python and checks no types)."""
    assert_compiles_for_gpu(_PTX_BODY)


@pytest.mark.gpu
def test_stage_on_cupy_detections() -> None:
    import cupy
    from dataclasses import fields

    det, layout = real_detections()
    host_kept, host_look = boxes_stage.own_by_centre(det, layout, margin_l0_px=2.0)
    dev_det = Detections(*(cupy.asarray(getattr(det, f.name)) for f in fields(Detections)))
    kept, look = boxes_stage.own_by_centre(dev_det, layout, margin_l0_px=2.0)
    assert isinstance(kept.cx, cupy.ndarray) and isinstance(look, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(kept.cx), host_kept.cx)
    np.testing.assert_array_equal(cupy.asnumpy(look), host_look)
