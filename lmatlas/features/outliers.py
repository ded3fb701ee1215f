"""Outlier positions kept apart while training: rows whose norm is over ``ratio`` x the median norm.

Some positions past the first are attention sinks too (a newline or a separator the model parks
attention on): their residual norm is tens to a hundred times the median. One such row holds
more variance than thousands of ordinary ones, so in a training batch it decides the FVU loss
and its gradient, and the data scale computed with it shrinks every ordinary row. Training
therefore leaves them out at read time (the harvest files are not changed) and evaluation
reports the FVU both ways (:func:`lmatlas.features.evaluate.reconstruction`).

A :class:`NormLimit` is fitted once on a sample of each site the dictionary reads or writes
(``[rows, d]``) and then masks every batch: a row is kept when its norm is at most ``ratio``
times the sample's median norm at every site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class NormLimit:
    """The largest norm kept per site (``limits``, in the data's units), ``ratio`` x each site's median."""

    ratio: float
    limits: tuple[float, ...]

    @classmethod
    def fit(cls, samples: Sequence[torch.Tensor], ratio: float | None) -> "NormLimit":
        """From one ``[rows, d]`` sample per site; ``ratio`` ``None`` or 0 keeps every row."""
        if not ratio:
            return cls(0.0, tuple(float("inf") for _ in samples))
        return cls(float(ratio), tuple(float(ratio * s.float().norm(dim=-1).median()) for s in samples))

    def keep(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B]`` bool: the rows (one ``[B, d]`` tensor per site, aligned) within every site's limit."""
        mask = torch.ones(len(rows[0]), dtype=torch.bool)
        for part, limit in zip(rows, self.limits):
            if limit != float("inf"):
                mask &= part.norm(dim=-1) <= limit
        return mask
