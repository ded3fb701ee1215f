"""Window: what a windowed attention head sees, one value for the census and the KV caches.

A *windowed* (streaming) head keeps the first ``sink`` tokens (the attention sinks) and a
recent window. ``Window(sink, recent)`` means exactly this:

    a query at position ``i`` sees key ``j``  iff  ``j <= i``  and  (``j < sink``  or  ``i - j < recent``)

so ``recent`` **counts the query's own token**: the query sees itself and the ``recent - 1``
keys before it, as transformers' ``sliding_window`` does. A query sees at most
``sink + recent`` keys (:attr:`Window.span`); between decode steps a cache holds at most
``sink + recent - 1`` entries per windowed head (the next token brings its own key).

Who uses it:

* the census's full-context detector (:mod:`lmatlas.census.detectors.streaming`) simulates
  a windowed head by restricting its pattern with :meth:`Window.keeps` (its ``window``
  argument is ``recent``);
* the head-wise KV cache (:class:`~lmatlas.infer.plan.KVPlan`, ``HeadwiseCache``,
  ``FullPrefillPlan``, DuoAttention's gates) evicts and masks with the same rule, so a head
  the census calls streamable at ``Window(4, 64)`` is run by a cache at ``Window(4, 64)``
  on exactly the keys the census kept.

>>> w = Window(sink=2, recent=3)
>>> w.keeps(torch.tensor([5]), torch.arange(6)).int().tolist()
[[1, 1, 0, 1, 1, 1]]
>>> w.span
5

Before this value the KV cache's ``recent`` did *not* count the query (it saw ``recent + 1``
recent keys) while the census's ``window`` did; the cache now follows the census. No atlas
stores a window size (the census's default restriction, ``Window(4, 64)``, is a detector
setting), so every atlas opens as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmatlas.errors import InputError


@dataclass(frozen=True)
class Window:
    """``sink`` first tokens plus the ``recent`` latest (the query's own included); see the module docstring.

    Attributes:
        sink: tokens kept at the start of the context (``>= 0``).
        recent: the latest tokens a query sees, itself included (``>= 1``).
    """

    sink: int = 4
    recent: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise InputError(f"sink must be a whole number >= 0, got {self.sink!r}.")
        if isinstance(self.recent, bool) or not isinstance(self.recent, int) or self.recent < 1:
            raise InputError(
                f"recent must be a whole number >= 1 (the query's own token counts), got {self.recent!r}: a windowed "
                f"head with no recent window could only see its sink window ({self.sink} tokens). Use --recent 64 or more."
            )

    @property
    def span(self) -> int:
        """The most keys one query sees: ``sink + recent``."""
        return self.sink + self.recent

    def keeps(self, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``[n_rows, n_keys]`` bool: which of key positions ``keys`` ``[n_keys]`` each query position of
        ``rows`` ``[n_rows]`` sees (causal, and a sink or within the recent window)."""
        distance = rows[:, None] - keys[None, :]
        return (distance >= 0) & ((keys[None, :] < self.sink) | (distance < self.recent))

    def held(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """``[m]`` bool: which cached ``positions`` a query at ``length`` (the next token) can still see."""
        return (positions < self.sink) | (positions > length - self.recent)

    def describe(self) -> dict:
        return {"sink": self.sink, "recent": self.recent}
