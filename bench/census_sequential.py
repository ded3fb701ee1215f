"""Benchmark: could the census stop a battery early? Rows each detector's decisions need, under two sequential rules.

Every head's label is decided on a seeded battery of ``n`` rows (and its null): score
(the mean of per-row scores in ``[0, 1]``) >= threshold and Welch z >= min_z. All heads
read one forward, so a battery could stop after ``k < n`` rows only when *every* head of
*every* detector that reads it has a settled decision. This measures, from the per-row
scores of the real census (the batteries and detectors as they run), the first ``k``
at which the **threshold part** of every head's decision is settled -- a necessary
condition (the z-part can only ask for more rows) -- under

* ``exact``: no completion of the remaining rows can change it (error rate 0):
  settled "yes" when ``S_k >= t n``, "no" when ``S_k + (n - k) < t n`` (``S_k`` the sum of
  the first ``k`` row scores);
* ``hoeffding``: an anytime-valid Hoeffding confidence sequence for the head's mean
  score at level ``alpha`` (union bound over ``k`` with ``alpha / (k (k + 1))``): radius
  ``sqrt(log(2 k (k + 1) / alpha) / (2 k))``; settled when the interval lies on one side of
  ``t``. (This decides on the head's expected score, so it may differ from the census's
  decision on the full battery; it is the rule the census would need to stop early with
  a stated error rate.)

The needle battery (``retrieval``, ``full_context``: 6 rows, thresholds 0.3 and 0.5) is
not run here (minutes per pass): under ``exact`` a head scoring 0 on every row is settled
only after ``k > n (1 - t)`` rows, 5 of 6 for retrieval; under ``hoeffding`` (alpha 0.05) not
within 6 rows at all (radius 0.787 at ``k = 6``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/census_sequential.py [--model smollm2-135m] [--alpha 0.05]
        [--record FILE]
"""

from __future__ import annotations

import argparse
import math

import torch
from harness import conditions, emit, load_model  # noqa: E402  (bench/ is on the path)

from lmatlas.census import measure
from lmatlas.census.registry import all_detectors

SKIP = ("retrieval", "full_context")  # the needle battery: see the module docstring


def settled_exact(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[layer, head]`` first row count ``k`` (1..n) after which the threshold part cannot change. ``scores``: ``[n, L, H]``."""
    n = scores.shape[0]
    sums = scores.cumsum(0)  # [n, L, H] S_k
    k = torch.arange(1, n + 1, dtype=scores.dtype).view(-1, 1, 1)
    done = (sums >= threshold * n) | (sums + (n - k) < threshold * n)
    return _first(done)


def settled_hoeffding(scores: torch.Tensor, threshold: float, alpha: float) -> torch.Tensor:
    """``[layer, head]`` first ``k`` at which an anytime Hoeffding interval lies on one side of ``threshold``."""
    n = scores.shape[0]
    k = torch.arange(1, n + 1, dtype=torch.float64).view(-1, 1, 1)
    means = scores.double().cumsum(0) / k
    radius = torch.sqrt(torch.log(2 * k * (k + 1) / alpha) / (2 * k))
    done = (means - radius >= threshold) | (means + radius < threshold)
    return _first(done)


def _first(done: torch.Tensor) -> torch.Tensor:
    """First index (1-based) along dim 0 where ``done`` holds; ``n`` when it never does (the full battery)."""
    n = done.shape[0]
    done = done.clone()
    done[-1] = True
    return (done.float().argmax(0) + 1).clamp_max(n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--record", default=None)
    args = parser.parse_args(argv)
    before = conditions()
    model = load_model(args.model)
    by_battery: dict[str, dict] = {}
    with measure.shared():
        for name, detector in sorted(all_detectors().items()):
            if name in SKIP:
                continue
            battery = detector.battery(model, 0)
            scores = torch.as_tensor(detector.score(model, battery)).float().cpu()  # [n, layer, head]
            key = str(battery.meta.get("kind"))  # detectors whose batteries share a kind read the same rows
            entry = by_battery.setdefault(key, {"content": measure.content_key(model, battery)[2][:12]})
            entry["rows"] = battery.n_examples
            exact = settled_exact(scores, detector.threshold)
            hoeff = settled_hoeffding(scores, detector.threshold, args.alpha)
            entry.setdefault("detectors", {})[name] = {
                "threshold": detector.threshold,
                "rows_needed_exact": int(exact.max()),
                "rows_needed_hoeffding": int(hoeff.max()),
                "heads_unsettled_before_last_row_exact": int((exact == battery.n_examples).sum()),
                "heads_unsettled_before_last_row_hoeffding": int((hoeff == battery.n_examples).sum()),
            }
    for entry in by_battery.values():
        for rule in ("exact", "hoeffding"):
            needed = max(d[f"rows_needed_{rule}"] for d in entry["detectors"].values())
            entry[f"rows_needed_{rule}"] = needed
            entry[f"rows_saved_{rule}"] = entry["rows"] - needed
    result = {
        "benchmark": "census_sequential",
        "model": args.model,
        "alpha": args.alpha,
        "hoeffding_radius_at_n": {
            n: round(math.sqrt(math.log(2 * n * (n + 1) / args.alpha) / (2 * n)), 3) for n in (6, 16, 48)
        },
        "batteries": by_battery,
    }
    emit(result, args.record, before)


if __name__ == "__main__":
    main()
