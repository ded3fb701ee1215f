"""Where a forward call is: absolute positions, generation step, and position selectors.

The same edit must mean the same thing in a plain forward over a whole text and at
every step of ``generate`` with a KV cache, where each decoding step runs one new
token. So every hook knows the *absolute* positions of the values it sees:

=============  ===========================================================================
``positions``  ``[n]`` absolute indices along the site's position axis. Query-side sites
               (``resid.*``, ``attn.q/z/out``, ``mlp.*``, the pattern's query axis) see
               the positions of the tokens this call runs (``past .. past + n - 1``);
               ``attn.k/v`` see every key position the attention reads (``0 .. past + n - 1``).
``step``       0 for a call that starts a sequence (no cache), then 1, 2, ... for each
               decoding step that extends it.
``prompt_len`` the length of the sequence's first call (the prompt), unless given.
``batch``      rows in this call.
=============  ===========================================================================

A *position selector* follows ``@`` in a site name: ``L3.resid.post@-1`` (the last
prompt token), ``@3:7`` (positions 3, 4, 5, 6), ``@0,2,5`` (a list), ``@5:`` (5 and
after). Negative numbers count from the end of the **prompt**, so ``@-1`` stays the
last prompt token while ``generate`` adds tokens after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lmatlas.errors import SiteError

_INT = r"-?\d+"
_SLICE_RE = re.compile(rf"^(?P<start>{_INT})?:(?P<stop>{_INT})?$")
_LIST_RE = re.compile(rf"^{_INT}(?:,{_INT})*$")


@dataclass(frozen=True)
class Positions:
    """A position selector: a half-open range ``start:stop`` or explicit ``indices``.

    ``None`` bounds are open; negative values count from the end of the prompt.
    """

    start: int | None = None
    stop: int | None = None
    indices: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> "Positions":
        """``"-1"``, ``"3:7"``, ``"5:"``, ``":4"`` or ``"0,2,5"``."""
        text = text.strip()
        if _LIST_RE.match(text):
            return cls(indices=tuple(int(p) for p in text.split(",")))
        match = _SLICE_RE.match(text)
        if match:
            start, stop = match["start"], match["stop"]
            return cls(start=None if start is None else int(start), stop=None if stop is None else int(stop))
        raise SiteError(
            f"Malformed positions {text!r} after '@': use an index (@-1), a range (@3:7, @5:) or a list (@0,2,5)."
        )

    def __str__(self) -> str:
        if self.indices is not None:
            return ",".join(map(str, self.indices))
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"

    def absolute(self, prompt_len: int) -> tuple[int | None, int | None, tuple[int, ...] | None]:
        """Resolve negative numbers against the prompt length."""

        def fix(p: int | None) -> int | None:
            return None if p is None else (p + prompt_len if p < 0 else p)

        if self.indices is not None:
            return None, None, tuple(fix(p) for p in self.indices)
        return fix(self.start), fix(self.stop), None

    def check(self, prompt_len: int, name: str) -> None:
        """Raise if a selector reaches before the start of the sequence."""
        start, _, indices = self.absolute(prompt_len)
        bad = [p for p in (indices or (start,)) if p is not None and p < 0]
        if bad:
            raise SiteError(
                f"Position @{self} of {name} is outside the input: the prompt has {prompt_len} tokens "
                f"(negative positions count from its end, so the earliest is -{prompt_len})."
            )

    def select(self, positions: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """``[n_selected]`` local indices into ``positions`` (absolute, ``[n]``) chosen by this selector."""
        start, stop, indices = self.absolute(prompt_len)
        if indices is not None:
            wanted = torch.tensor(indices, device=positions.device)
            return torch.isin(positions, wanted).nonzero().flatten()
        keep = torch.ones_like(positions, dtype=torch.bool)
        if start is not None:
            keep &= positions >= start
        if stop is not None:
            keep &= positions < stop
        return keep.nonzero().flatten()


def split_site_name(name: str) -> tuple[str, Positions | None]:
    """``"L3.resid.post@-1" -> ("L3.resid.post", Positions(indices=(-1,)))``."""
    if "@" not in name:
        return name, None
    site, _, spec = name.partition("@")
    return site, Positions.parse(spec)


@dataclass(frozen=True)
class CallInfo:
    """Where one forward call of the model is (see the module docstring)."""

    positions: torch.Tensor  # [n] absolute positions of this call's tokens
    step: int
    batch: int
    prompt_len: int

    @property
    def past(self) -> int:
        return int(self.positions[0]) if self.positions.numel() else 0

    def key_positions(self, n_keys: int) -> torch.Tensor:
        """``[n_keys]`` absolute key positions: keys are ``0 .. n_keys - 1`` (cache first, then this call)."""
        return torch.arange(n_keys, device=self.positions.device)


@dataclass(frozen=True)
class HookContext:
    """What a replacement function ``fn(value, ctx)`` is told about the value it sees.

    Attributes:
        site: the site (``ctx.site.layer``, ``ctx.site.component``; ``str(ctx)`` is its name).
        positions: ``[n]`` absolute positions along the value's position axis (after any
            ``@`` selection: the value holds exactly these positions).
        step: 0 for the prompt forward, 1, 2, ... for decoding steps.
        batch: rows in this call.
        prompt_len: tokens in the prompt (negative positions count from its end).
    """

    site: object
    positions: torch.Tensor
    step: int
    batch: int
    prompt_len: int

    @property
    def layer(self) -> int:
        return self.site.layer

    @property
    def component(self) -> str:
        return self.site.component

    def __str__(self) -> str:
        return str(self.site)
