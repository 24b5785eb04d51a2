"""Many slides on a real Dask cluster: bad slides listed, good ones done once, workers and whole
runs killed mid-way, resume, an external scheduler. All processes here are real; nothing is mocked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import data_file
from helpers_timings import EPS_S, assert_finite_seconds, assert_slide_seconds_match_stages
from gpupath.batch import expand_inputs, run_batch
from gpupath.ingest import sha256_file
from gpupath.pipeline import RunParams, process_slide
from gpupath.results import marker_path
from gpupath.synthetic import SyntheticSpec, write_synthetic_slide
from gpupath.tiling import TileSpec

distributed = pytest.importorskip("distributed", reason="dask.distributed is a gpupath dependency")

PARAMS = RunParams(tile=TileSpec(overlap_px=32), engine="onnxruntime", read_workers=1)  # what the CLI runs


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("batch")
    paths = []
    for seed in range(4):
        path = folder / f"slide-{seed}.svs"
        write_synthetic_slide(path, SyntheticSpec(width_px=3072, height_px=3072, mpp=0.25, seed=40 + seed), workers=1)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(slides: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Detections per slide from an in-process run (what every cluster run must reproduce)."""
    out = tmp_path_factory.mktemp("reference")
    detector, _ = PARAMS.make_detector()
    return {p.name: process_slide(p, out, PARAMS, detector=detector).n_detections for p in slides}


def slide_open_in(pid: int, slides: dict[str, str]) -> str | None:
    """The path (a key of ``slides``) of a slide file process ``pid`` holds open, or None (Linux /proc)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:  # the process is gone
        return None
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:  # closed while listed
            continue
        if target in slides:
            return target
    return None


def group_members(pgid: int) -> list[str]:
    """``pid command`` of the live (not zombie) processes in process group ``pgid`` (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(f"{stat.parent.name} {text[text.index('(') + 1:text.rindex(')')]}")
    return members


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name]


def check_outputs(out: Path, good: list[Path], reference: dict[str, int]) -> list[dict]:
    """Every good slide once in slides.parquet, ok, with one detections partition of the reference size."""
    rows = pq.read_table(out / "slides.parquet").to_pylist()
    by_path = {}
    for row in rows:
        assert row["path"] not in by_path, f"{row['path']} listed twice"
        by_path[row["path"]] = row
    for p in good:
        row = by_path[str(p)]
        assert row["status"] == "ok", row["error"]
        assert row["n_detections"] == reference[p.name], p.name
        parts = list((out / "detections" / f"slide_id={row['slide_id']}").iterdir())
        assert [x.name for x in parts] == ["part-0.parquet"]
        assert pq.read_table(parts[0]).num_rows == reference[p.name]
    assert not leftovers(out)
    return rows


def test_local_cluster_batch_with_bad_slides(slides: list[Path], reference: dict[str, int], tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(data_file("cmu-1-small-region.svs").read_bytes()[:50_000])
    mismatched = tmp_path / "mismatched.svs"
    shutil.copy(slides[0], mismatched)
    (tmp_path / "mismatched.svs.sha256").write_text("0" * 64 + "  mismatched.svs\n")
    batch = [*slides, truncated, mismatched]
    results = run_batch(batch, tmp_path / "out", PARAMS, workers=2)
    by_name = {Path(r.path).name: r for r in results}
    assert [Path(r.path).name for r in results] == [p.name for p in batch]  # in the order given
    assert by_name["truncated.svs"].status == "failed" and "truncated.svs" in by_name["truncated.svs"].error
    assert "sha256 mismatch" in by_name["mismatched.svs"].error
    rows = check_outputs(tmp_path / "out", slides, reference)
    assert len(rows) == len(batch)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["environment"]["executor"] == {**run["environment"]["executor"], "kind": "LocalCluster", "workers": 2}
    assert (run["slides_done"], run["slides_failed"], run["slides_left"]) == (4, 2, 0)
    assert run["finished"] is not None
    ok = [s for s in run["slides"] if s["status"] == "ok"]
    assert len(ok) == len(slides)
    # tiles done: the good slides' tile tables, counted row by row (the failed slides wrote none)
    written = {s["slide_id"]: pq.read_table(tmp_path / "out" / "tiles" / f"slide_id={s['slide_id']}").num_rows
               for s in ok}
    assert [s["n_tiles"] for s in ok] == list(written.values()) and run["tiles_done"] == sum(written.values())
    # the rate is the tiles done over the run's elapsed seconds, and the run lasted that long
    elapsed = assert_finite_seconds(run["elapsed_s"], "elapsed_s")
    assert run["tiles_per_s"] == pytest.approx(run["tiles_done"] / elapsed, rel=1e-9)
    assert run["finished"] - run["started"] >= elapsed
    assert run["mean_slide_s"] == pytest.approx(sum(s["seconds"] for s in run["slides"]) / len(batch), rel=1e-9)
    for s in ok:  # each slide's seconds: its stages', within the run (on workers, 2 slides at a time)
        assert_slide_seconds_match_stages(s["seconds"], s["timings"])
        assert s["seconds"] <= elapsed + EPS_S


def test_a_worker_killed_mid_slide_costs_one_attempt(slides: list[Path], reference: dict[str, int],
                                                     tmp_path: Path) -> None:
    killed: list[tuple[int, str]] = []  # (worker pid, the slide it had open)
    out = tmp_path / "out"
    slide_ids = {str(p.resolve()): sha256_file(p) for p in slides}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        pids = list(client.run(os.getpid).values())

        def kill_a_busy_worker() -> None:
            # no fixed sleep: kill a worker once it holds a slide file open (inside process_slide, from
            # the checksum to the last write) and that slide is not done yet
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                for pid in pids:
                    slide = slide_open_in(pid, slide_ids)
                    if slide is not None and not marker_path(out, slide_ids[slide]).exists():
                        os.kill(pid, signal.SIGKILL)
                        killed.append((pid, slide))
                        break
                time.sleep(0.02)  # polling interval of the condition above

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        results = run_batch(slides, out, PARAMS, scheduler=cluster.scheduler_address)
        killer.join()
    assert killed, "no worker was killed mid-slide within 120 s: the test did not test anything"
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    check_outputs(out, slides, reference)


def _gpupath(*args: str | Path, **kw: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpupath", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_whole_run_killed_then_resumed(slides: list[Path], reference: dict[str, int], tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = slides[0].parent
    proc = _gpupath("run", folder, "--out", out, "--device", "cpu", "--engine", "onnxruntime", "--workers", "2",
                    start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "done").glob("*.json")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        done_before = {p.name for p in (out / "done").glob("*.json")}
        assert 0 < len(done_before) < len(slides), "kill came too late to test resume"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its cluster, mid-way, without a chance to clean up
        proc.wait()
    # no fixed sleep: wait until every process of the killed run (its workers too) is gone and has let
    # go of the output folder's lock, or fail naming the survivors
    deadline = time.monotonic() + 60
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_alive(proc.pid), f"processes of the killed run outlived it by 60 s: {group_members(proc.pid)}"
    rerun = _gpupath("run", folder, "--out", out, "--device", "cpu", "--engine", "onnxruntime", "--workers", "2")
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    run = json.loads((out / "run.json").read_text())
    resumed = {Path(s["path"]).name for s in run["slides"] if s["resumed"]}
    assert len(resumed) >= len(done_before), (resumed, done_before)  # done slides were not redone
    assert run["slides_done"] == len(slides) and run["slides_failed"] == 0
    check_outputs(out, slides, reference)


def test_existing_scheduler_and_worker_processes(slides: list[Path], reference: dict[str, int],
                                                 tmp_path: Path) -> None:
    # `python -m` rather than the `dask` script beside sys.executable: an install with --target (the device
    # proof's /tmp/gpupath-site) puts the scripts elsewhere
    scheduler = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    worker = [sys.executable, "-m", "distributed.cli.dask_worker"]
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([*scheduler, "--scheduler-file", str(sched_file), "--port", "0",
                               "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        procs.append(subprocess.Popen([*worker, address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        run = _gpupath("run", *slides[:2], "--out", tmp_path / "out", "--device", "cpu", "--engine", "onnxruntime",
                       "--scheduler", address)
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
        record = json.loads((tmp_path / "out" / "run.json").read_text())
        assert record["environment"]["executor"]["kind"] == "scheduler"
        assert record["environment"]["executor"]["address"] == address
        check_outputs(tmp_path / "out", slides[:2], reference)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)


def test_a_scheduler_that_does_not_answer_is_a_config_error(slides: list[Path], tmp_path: Path) -> None:
    run = _gpupath("run", slides[0], "--out", tmp_path / "out", "--device", "cpu", "--scheduler",
                   "tcp://127.0.0.1:9")
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2 and "--scheduler tcp://127.0.0.1:9: cannot connect" in stderr
    assert "Connection refused" in stderr  # the probe's words: refused at once, not after the client's 20 s timeout
    from gpupath.batch import check_scheduler
    from gpupath.errors import ConfigError

    with pytest.raises(ConfigError, match="not a tcp://host:port address"):
        check_scheduler("tcp://nohost")


def test_an_output_folder_in_use_is_refused(slides: list[Path], tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".gpupath.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(Exception, match="another gpupath run is writing to this folder"):
            run_batch(slides[:1], out, PARAMS, workers=0)


def test_changed_parameters_redo_a_slide_and_redo_forces_it(slides: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    (first,) = run_batch(slides[:1], out, PARAMS, workers=0)
    (again,) = run_batch(slides[:1], out, PARAMS, workers=0)
    assert not first.resumed and again.resumed and again.n_detections == first.n_detections
    other = RunParams(tile=TileSpec(overlap_px=32), engine="onnxruntime", read_workers=1, stain="none")
    (changed,) = run_batch(slides[:1], out, other, workers=0)
    assert not changed.resumed
    (forced,) = run_batch(slides[:1], out, other, workers=0, resume=False)
    assert not forced.resumed
    # a partition changed behind the marker's back is not vouched for
    part = next((out / "detections").rglob("part-0.parquet"))
    part.write_bytes(part.read_bytes()[:-10])
    (redone,) = run_batch(slides[:1], out, other, workers=0)
    assert not redone.resumed and pq.read_table(part).num_rows == redone.n_detections


def test_relative_paths_are_recorded_absolute_and_empty_folders_named(slides: list[Path], tmp_path: Path) -> None:
    # outputs name their slides: serve and report may run from another folder than the run did
    shutil.copy(slides[0], tmp_path / "here.svs")
    (tmp_path / "empty").mkdir()
    run = _gpupath("run", "here.svs", "--out", "out", "--device", "cpu", "--engine", "classic", "--no-reports",
                   cwd=tmp_path)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    (row,) = pq.read_table(tmp_path / "out" / "slides.parquet").to_pylist()
    assert row["path"] == str(tmp_path / "here.svs")
    assert json.loads((tmp_path / "out" / "run.json").read_text())["slides"][0]["path"] == str(tmp_path / "here.svs")
    empty = _gpupath("run", "empty", "--out", "out2", "--device", "cpu", cwd=tmp_path)
    _, stderr = empty.communicate(timeout=120)
    assert empty.returncode == 2 and "error: empty: no slide files in this folder (looked for .bif, .dcm" in stderr


def test_expand_inputs_folders_and_duplicates(slides: list[Path], tmp_path: Path) -> None:
    folder = slides[0].parent
    got = expand_inputs([folder, slides[0]])
    assert got == sorted(p for p in folder.iterdir() if p.suffix == ".svs")


def test_ingest_then_run_the_store_with_checksums(slides: list[Path], reference: dict[str, int],
                                                  tmp_path: Path) -> None:
    import hashlib

    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in slides[:2]))
    ingest = _gpupath("ingest", *slides[:2], "--store", tmp_path / "store", "--checksums", sums)
    _, stderr = ingest.communicate(timeout=300)
    assert ingest.returncode == 0, stderr
    run = _gpupath("run", "--store", tmp_path / "store", "--out", tmp_path / "out", "--device", "cpu",
                   "--engine", "onnxruntime", "--workers", "0", "--checksums", sums)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    rows = pq.read_table(tmp_path / "out" / "slides.parquet").to_pylist()
    manifest = pq.read_table(tmp_path / "store" / "manifest.parquet").to_pylist()
    assert sorted(r["slide_id"] for r in rows) == sorted(m["sha256"] for m in manifest)  # one id for a slide
    assert sorted(r["n_detections"] for r in rows) == sorted(reference[p.name] for p in slides[:2])
    # a slide missing from the checksums file is not read
    run = _gpupath("run", slides[2], "--out", tmp_path / "out2", "--device", "cpu", "--engine", "onnxruntime",
                   "--checksums", sums)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1 and "not listed in the checksums file" in stderr


@pytest.mark.gpu
def test_dask_cuda_cluster_gives_the_in_process_gpu_detections(slides: list[Path], tmp_path: Path) -> None:
    """On a GPU node a batch runs on dask-cuda's LocalCUDACluster (one worker per GPU) and every slide
    gets exactly the detections of an in-process run on the same GPU."""
    pytest.importorskip("dask_cuda", reason="dask-cuda (gpu extra) not installed")
    params = RunParams(tile=TileSpec(overlap_px=32), device="cuda", read_workers=1)
    in_process = {Path(r.path).name: r.n_detections
                  for r in run_batch(slides[:2], tmp_path / "in-process", params, workers=0)}
    results = run_batch(slides[:2], tmp_path / "cluster", params, workers=1)
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    record = json.loads((tmp_path / "cluster" / "run.json").read_text())
    assert record["environment"]["executor"]["kind"] == "LocalCUDACluster"
    assert {Path(r.path).name: r.n_detections for r in results} == in_process
    check_outputs(tmp_path / "cluster", slides[:2], in_process)
