"""Checks of reported timings that can fail for a real reason and never assert speed.

The pipeline (``gpupath.pipeline``) times a slide in stages. The slide's own stages (sha256, open,
tissue, stain_fit, ``tiles`` = the tile loop's wall time, dedup, write, report) run one after the
other on its thread, so they sum to at most the slide's seconds, and the slide's seconds exceed
that sum only by bookkeeping between stages (measured under 0.05 s on a 2-core machine; allowed:
``SLACK_S``). Inside the tile loop (``gpupath.tile_loop``) ``read``, ``normalize`` and ``detect``
are summed over the threads that ran them side by side (CPU workers, or a prefetch reader beside
the slide's thread): at most ``max(2, cores)`` threads (or the workers a test asked for), each inside
the loop's wall time. A stage's
CPU seconds (``*_cpu``) never exceed its wall seconds: one thread's for the loop stages, the
process's (at most one per core) for the slide's stages.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

PIPELINE_STAGES = frozenset({"sha256", "open", "tissue", "stain_fit", "tiles", "read", "normalize", "detect", "dedup",
                             "write"})
LOOP_STAGES = frozenset({"read", "normalize", "detect"})  # summed over the tile loop's threads
SLACK_S = 0.5     # untimed bookkeeping a slide's seconds may hold beyond its stages
EPS_S = 1e-6      # float sums of perf_counter differences
CPU_EPS_S = 1e-3  # a thread's CPU clock and the wall clock are read one after the other, not at once
PROCESS_CPU_SLACK_S = 0.02  # a process's CPU clock sums its threads' times, updated in scheduler steps


def assert_finite_seconds(value: object, what: str = "seconds") -> float:
    """A duration that is a finite, non-negative number (a missing key, None, NaN or inf fails)."""
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{what}: {value!r}"
    assert math.isfinite(value) and value >= 0, f"{what}: {value!r}"
    return float(value)


def assert_slide_seconds_match_stages(seconds: float, timings: Mapping[str, float], *,
                                      slack_s: float = SLACK_S, loop_threads: int | None = None) -> None:
    """A finished slide's ``seconds`` against its stage ``timings`` (see the module notes)."""
    assert PIPELINE_STAGES <= set(timings), f"stages missing: {sorted(PIPELINE_STAGES - set(timings))}"
    for stage, value in timings.items():
        assert_finite_seconds(value, f"timings[{stage!r}]")
    seconds = assert_finite_seconds(seconds)
    serial = sum(v for k, v in timings.items() if k not in LOOP_STAGES and not k.endswith("_cpu"))  # slide's stages
    assert serial <= seconds + EPS_S, f"stages on the slide's thread sum to {serial} s > the slide's {seconds} s"
    assert seconds <= serial + slack_s, f"the slide's {seconds} s exceed its stages ({serial} s) by more than {slack_s} s"
    threads = loop_threads or max(2, os.cpu_count() or 1)  # default: the auto schedule's most
    inside = sum(timings[k] for k in LOOP_STAGES)
    assert inside <= threads * timings["tiles"] + EPS_S, (
        f"read + normalize + detect = {inside} s > {threads} threads x the tile loop's {timings['tiles']} s")
    cores = os.cpu_count() or 1
    for key, cpu in timings.items():
        if not key.endswith("_cpu"):
            continue
        stage = key.removesuffix("_cpu")
        assert stage in timings, f"{key} without the stage's wall seconds"
        # a loop stage's CPU is one thread's; a slide stage's is the process's (all its threads)
        most = timings[stage] + CPU_EPS_S if stage in LOOP_STAGES else timings[stage] * cores + PROCESS_CPU_SLACK_S
        assert cpu <= most, f"{stage}: {cpu} CPU s > {most} s ({timings[stage]} wall s)"
