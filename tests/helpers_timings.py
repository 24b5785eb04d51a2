"""Checks of reported timings that can fail for a real reason and never assert speed.

The pipeline (``gpupath.pipeline``) times a slide in stages. Every stage but ``read`` runs on the
slide's own thread, one after the other, so those stages sum to at most the slide's seconds; ``read``
runs on the one prefetch thread, also inside them. The slide's seconds exceed the sum of all stages
only by untimed steps: the wait for a batch whose decoding already counted as ``read``, and the
bookkeeping between stages (measured under 0.05 s on a 2-core machine; allowed: ``SLACK_S``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

PIPELINE_STAGES = frozenset({"sha256", "open", "tissue", "stain_fit", "read", "normalize", "detect", "dedup", "write"})
SLACK_S = 0.5     # untimed bookkeeping a slide's seconds may hold beyond its stages
EPS_S = 1e-6      # float sums of perf_counter differences


def assert_finite_seconds(value: object, what: str = "seconds") -> float:
    """A duration that is a finite, non-negative number (a missing key, None, NaN or inf fails)."""
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{what}: {value!r}"
    assert math.isfinite(value) and value >= 0, f"{what}: {value!r}"
    return float(value)


def assert_slide_seconds_match_stages(seconds: float, timings: Mapping[str, float], *,
                                      slack_s: float = SLACK_S) -> None:
    """A finished slide's ``seconds`` against its stage ``timings`` (see the module notes)."""
    assert PIPELINE_STAGES <= set(timings), f"stages missing: {sorted(PIPELINE_STAGES - set(timings))}"
    for stage, value in timings.items():
        assert_finite_seconds(value, f"timings[{stage!r}]")
    seconds = assert_finite_seconds(seconds)
    serial = sum(v for k, v in timings.items() if k != "read")
    assert serial <= seconds + EPS_S, f"stages on the slide's thread sum to {serial} s > the slide's {seconds} s"
    assert timings["read"] <= seconds + EPS_S, f"read {timings['read']} s > the slide's {seconds} s"
    assert seconds <= serial + timings["read"] + slack_s, (
        f"the slide's {seconds} s exceed its stages ({serial + timings['read']} s) by more than {slack_s} s")
