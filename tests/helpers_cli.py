"""Running the CLI as a user does (a subprocess) and reading what it printed and left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def gpupath(*args: str | Path, cwd: Path | None = None, timeout: float = 300,
            prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``python -m gpupath ARGS`` with output captured (``prefix``: a command that runs it, e.g. setpriv)."""
    return subprocess.run([*prefix, sys.executable, "-m", "gpupath", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def without_privileges() -> tuple[str, ...] | None:
    """A command prefix under which file permissions apply to this user: none needed for a normal user;
    for root, ``setpriv`` dropping every capability (root then reads only what its mode bits allow);
    None when root and no setpriv (a test of permissions cannot run)."""
    import os
    import shutil

    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    return (setpriv, "--bounding-set=-all", "--inh-caps=-all", "--") if setpriv else None


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def leftovers(out: Path) -> list[Path]:
    """Temporary files a crash or failure could have left behind."""
    return [p for p in out.rglob("*") if ".tmp-" in p.name]
