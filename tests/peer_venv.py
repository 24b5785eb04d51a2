"""Peers that pin old dependencies run from their own venv under ``.cache/peers/`` (git-ignored),
built once from pins in pyproject.toml and rebuilt when the pins change. A build step that fails
(no PyPI, a wheel missing for this machine) skips the test, naming the step and pip's last line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest


def _run(cmd: list[str], what: str, peer_dir: Path, timeout_s: int) -> None:
    """Run one build step; skip, naming the step and pip's last words, if it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip(f"peer venv {peer_dir}: {what} timed out after {timeout_s} s (no network?)")
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        pytest.skip(f"peer venv {peer_dir}: {what} exited {done.returncode}: {tail[0]} (no network or PyPI?)")


def peer_python(peer_dir: Path, *, peer: str, pins: Sequence[str], imports: str, no_deps: Sequence[str] = (),
                timeout_s: int = 600) -> Path:
    """Python of the venv ``peer_dir`` holding ``no_deps`` (installed without their dependencies)
    and ``pins``; ``imports`` (e.g. ``"staintools, spams"``) must import in it."""
    python = peer_dir / "bin" / "python"
    marker = peer_dir / "gpupath-peer.json"
    want = {"peer": peer, "pins": list(pins)}
    if marker.is_file() and python.is_file():
        have = json.loads(marker.read_text())
        if {k: have.get(k) for k in want} == want:
            return python
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "venv", "--clear", str(peer_dir)], "python -m venv", peer_dir, timeout_s)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    for spec in no_deps:
        _run([*pip, "--no-deps", spec], f"pip install --no-deps {spec}", peer_dir, timeout_s)
    _run([*pip, *pins], f"pip install {' '.join(pins)}", peer_dir, timeout_s)
    _run([str(python), "-c", f"import {imports}"], f"import {imports}", peer_dir, timeout_s)
    marker.write_text(json.dumps({**want, "build_s": round(time.perf_counter() - t0, 1)}))
    return python
