"""``python -m gpupath.bench --side ours|baseline|tiatoolbox --job JOB --result OUT``: one child of ``gpupath bench``."""

from gpupath.bench._sides import main

raise SystemExit(main())
