"""`python -m gpupath` runs the CLI."""

from gpupath.cli import app

app(prog_name="gpupath")
