"""``python -m gpupath.detect.train``: see :mod:`gpupath.detect.train`."""

from gpupath.detect.train import main

raise SystemExit(main())
