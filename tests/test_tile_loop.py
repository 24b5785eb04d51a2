"""The tile loop's schedules (gpupath.tile_loop): results that do not depend on how batches are spread over
threads, the cores each CPU worker gets, and the stage times each schedule reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers_timings import assert_slide_seconds_match_stages
from gpupath.errors import ConfigError
from gpupath.pipeline import RunParams, process_slide
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide
from gpupath.tile_loop import cpu_share
from gpupath.tiling import TileSpec


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loop") / "loop-3k.svs"
    write_synthetic_slide(path, SyntheticSpec(width_px=3072, height_px=3072, mpp=0.25, seed=21))
    return path


def _table(out: Path, slide_id: str, kind: str) -> dict[str, list]:
    return pq.read_table(out / kind / f"slide_id={slide_id}" / "part-0.parquet").to_pydict()


@pytest.mark.parametrize("engine", ["onnxruntime", "classic"])
def test_workers_do_not_change_results(slide: Path, tmp_path: Path, engine: str) -> None:
    """1, 2 and 3 CPU workers over batches of 4 tiles (several batches in flight at once): the same
    detections and tiles Parquet, row for row, as batches come back in grid order."""
    tables = []
    for workers in (1, 2, 3):
        params = RunParams(tile=TileSpec(tile_px=256, overlap_px=32), engine=engine, batch_size=4, cpu_workers=workers,
                           reports=False)
        res = process_slide(slide, tmp_path / f"w{workers}", params, resume=False)
        assert res.status == "ok", res.error
        assert res.n_tiles > 12 and res.n_detections > 100  # several batches per worker
        assert_slide_seconds_match_stages(res.seconds, res.timings, loop_threads=max(2, workers))
        assert {"read_cpu", "normalize_cpu", "detect_cpu", "tiles_cpu"} <= set(res.timings)
        tables.append((_table(tmp_path / f"w{workers}", res.slide_id, "detections"),
                       _table(tmp_path / f"w{workers}", res.slide_id, "tiles")))
    for det, tiles in tables[1:]:
        assert det == tables[0][0] and tiles == tables[0][1]


def test_prefetch_schedule_for_an_engine_that_is_not_reentrant(slide: Path, tmp_path: Path) -> None:
    """torch is not called side by side: one reader thread ahead of the detecting thread, wall times only
    (its threads' CPU cannot be told apart), the same tiles as the workers' schedule."""
    pytest.importorskip("torch")
    base = dict(tile=TileSpec(tile_px=256, overlap_px=32), batch_size=8, reports=False, precision="fp32")
    torch_run = process_slide(slide, tmp_path / "torch", RunParams(engine="torch", **base), resume=False)
    ort_run = process_slide(slide, tmp_path / "ort", RunParams(engine="onnxruntime", **base), resume=False)
    assert torch_run.status == ort_run.status == "ok", (torch_run.error, ort_run.error)
    assert_slide_seconds_match_stages(torch_run.seconds, torch_run.timings)
    assert not {"read_cpu", "normalize_cpu", "detect_cpu"} & set(torch_run.timings)
    assert _table(tmp_path / "torch", torch_run.slide_id, "tiles") == _table(tmp_path / "ort", ort_run.slide_id, "tiles")
    # the same fp32 weights on two engines: nearly the same nuclei
    a, b = (np.asarray(_table(tmp_path / d, r.slide_id, "detections")["x0_px"]) for d, r in
            (("torch", torch_run), ("ort", ort_run)))
    assert abs(len(a) - len(b)) <= 0.01 * len(b)


@pytest.mark.parametrize("workers, cores, want", [(0, 2, (2, 1)), (0, 1, (1, 1)), (0, 16, (4, 4)), (0, 6, (4, 1)),
                                                  (3, 2, (3, 1)), (2, 16, (2, 8))])
def test_cpu_share(workers: int, cores: int, want: tuple[int, int]) -> None:
    assert cpu_share(workers, cores) == want


def test_negative_workers_refused() -> None:
    with pytest.raises(ConfigError, match="cpu_workers must be >= 0"):
        RunParams(cpu_workers=-1)
