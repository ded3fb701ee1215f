"""``Effects``: one number per target (the metric after patching it), with the run's baselines.

``values[i]`` is the metric averaged over the task's prompts when target ``i`` is
patched (or ablated); ``clean`` and ``corrupt`` are the unpatched metrics of the two
runs, so ``normalized()`` is the fraction of the clean-vs-corrupt gap a target
restores (1 = all of it, 0 = none). Attribution results also carry ``verification``:
their top targets re-measured with exact patching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-d tensors (average ranks for ties)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(x)
        r = torch.empty_like(x, dtype=torch.float64)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for value in torch.unique(x):  # ties share their mean rank
            tied = x == value
            if int(tied.sum()) > 1:
                r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else float("nan")


@dataclass
class Effects:
    """Per-target metric values of one patching, ablation or attribution run."""

    task: str
    metric: str
    method: str
    targets: list[str]
    values: torch.Tensor  # [n_targets] metric after patching each target
    clean: float
    corrupt: float
    verification: dict[str, Any] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "grad_drop": magnitudes

    def effect(self) -> torch.Tensor:
        """``[n_targets]`` change of the metric from the run the patches go into."""
        base = self.corrupt if self.method.startswith(("patch", "attribution")) else self.clean
        return self.values - base

    def normalized(self) -> torch.Tensor:
        """Fraction of the clean-minus-corrupt gap each target restores (patching) or removes (ablation)."""
        gap = self.clean - self.corrupt
        return self.effect() / gap if gap else self.effect() * float("nan")

    def top(self, k: int = 10) -> list[str]:
        """The ``k`` targets with the largest ``|effect|``."""
        order = torch.argsort(self.effect().abs(), descending=True)[:k]
        return [self.targets[i] for i in order.tolist()]

    def rows(self) -> list[dict[str, Any]]:
        normalized = self.normalized().tolist()
        return [
            {"target": t, "value": float(v), "effect": float(e), "normalized": n}
            for t, v, e, n in zip(self.targets, self.values.tolist(), self.effect().tolist(), normalized)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "method": self.method,
            "clean": self.clean,
            "corrupt": self.corrupt,
            "verification": self.verification,
            "effects": self.rows(),
        }
