"""``python -m gpupath.train``: see :mod:`gpupath.train`."""

from gpupath.train import main

raise SystemExit(main())
