"""The fit / held-out split of the corpus windows: rules are fitted on one half and scored on the other.

Windows (not positions) are split, so a held-out score never sees a position whose
neighbours were fitted on. The split is a seeded shuffle of the window indices: the first
half fits, the rest is held out. Fewer than ``MIN_WINDOWS`` windows is refused before any
compute (the bootstrap resamples held-out windows: it needs several).
"""

from __future__ import annotations

import hashlib

import torch

from lmatlas.errors import InputError

MIN_FIT = 4
MIN_HELDOUT = 4
MIN_WINDOWS = MIN_FIT + MIN_HELDOUT


def check_windows(n_windows: int) -> None:
    """Refuse a corpus too small for a held-out split, saying how many windows it needs."""
    if n_windows < MIN_WINDOWS:
        raise InputError(
            f"The corpus has {n_windows} window(s); labels need at least {MIN_WINDOWS} ({MIN_FIT} to fit the "
            f"rules, {MIN_HELDOUT} held out to score them). Pass a longer --corpus (or more corpus_sequences)."
        )


def fit_windows(n_windows: int, seed: int = 0) -> torch.Tensor:
    """``[n_windows]`` bool: ``True`` for the windows the rules are fitted on (half, rounded up)."""
    check_windows(n_windows)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    fit = torch.zeros(n_windows, dtype=torch.bool)
    fit[order[: (n_windows + 1) // 2]] = True
    return fit


def corpus_hash(windows: torch.Tensor) -> str:
    """A short hash of the token windows a label was computed from (stored with every label)."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
