"""Confidence intervals shared by the benchmarks (imported as a sibling: the scripts run from ``bench/``)."""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson 95% interval ``[low, high]`` of ``k`` successes in ``n`` trials (``[0, 0]`` when ``n = 0``)."""
    if n == 0:
        return [0.0, 0.0]
    p, denom = k / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]
