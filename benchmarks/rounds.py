"""Side-by-side timing shared by the multi-rank benchmarks."""

from __future__ import annotations

import time


def checked_rounds(variants: dict, reference, repeats: int, barrier) -> dict[str, list[float]]:
    """Check every variant's output within 1e-5 (relative to the reference's
    scale), then time them in `repeats` rounds, each running every variant once,
    in turn, after `barrier()`, so that machine noise hits them alike."""
    for name, fn in variants.items():  # also the warm-up
        out = fn()
        error = ((out - reference).abs().max() / reference.abs().max()).item()
        if error > 1e-5:
            raise SystemExit(f"{name}: logits differ from one rank's by {error:.2e}")
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            barrier()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
