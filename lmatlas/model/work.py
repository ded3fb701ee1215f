"""What a model has computed: forwards, tokens and layer-tokens, counted on its run path.

Every forward that goes through :meth:`Model.run` or :meth:`Model.forward` adds one
forward, its ``batch x pos`` tokens and its ``batch x pos x blocks run`` layer-tokens
(a forward stopped after block ``l`` runs ``l + 1`` blocks). Layer-tokens are the
machine-independent measure of a forward's cost (FLOPs are about
``2 x params_per_block`` per layer-token, plus attention), so a benchmark can compare
the work two builds do even when their timings were taken under different loads::

    before = model.work.snapshot()
    ...                                       # anything that runs the model
    done = model.work.snapshot() - before     # Work(forwards=.., tokens=.., layer_tokens=..)

Generation and the direct ``model.hf(...)`` calls of the inference layer are not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Work:
    """A tally: ``forwards``, ``tokens`` (``batch x pos`` summed) and ``layer_tokens`` (tokens x blocks run)."""

    forwards: int = 0
    tokens: int = 0
    layer_tokens: int = 0

    def __sub__(self, other: "Work") -> "Work":
        return Work(self.forwards - other.forwards, self.tokens - other.tokens, self.layer_tokens - other.layer_tokens)

    def __add__(self, other: "Work") -> "Work":
        return Work(self.forwards + other.forwards, self.tokens + other.tokens, self.layer_tokens + other.layer_tokens)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class WorkCounter:
    """The running tally of one model (``model.work``); :meth:`snapshot` freezes it."""

    def __init__(self) -> None:
        self._total = Work()

    def add(self, batch: int, pos: int, blocks: int) -> None:
        """Count one forward of ``[batch, pos]`` tokens through ``blocks`` decoder blocks."""
        tokens = int(batch) * int(pos)
        self._total = self._total + Work(1, tokens, tokens * int(blocks))

    def snapshot(self) -> Work:
        return self._total
