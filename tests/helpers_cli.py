"""Running the CLI as a user does (a subprocess) and reading what it printed and left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def gpupath(*args: str | Path, cwd: Path | None = None, timeout: float = 300,
            **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``python -m gpupath ARGS`` with output captured; ``kwargs`` go to subprocess.run (e.g. ``user``)."""
    return subprocess.run([sys.executable, "-m", "gpupath", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, **kwargs)  # type: ignore[call-overload]


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def leftovers(out: Path) -> list[Path]:
    """Temporary files a crash or failure could have left behind."""
    return [p for p in out.rglob("*") if ".tmp-" in p.name]
