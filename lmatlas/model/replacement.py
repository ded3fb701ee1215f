"""One replacement bound to one site: how a tensor or a function changes a value in flight.

A replacement is given as ``{site_name: value}`` where ``site_name`` may carry a
position selector (``"L3.resid.post@-1"``, see :mod:`lmatlas.model.positions`) and
``value`` is one of:

* a **function** ``fn(value, ctx) -> tensor | None``. ``value`` holds the selected
  positions only (all of them without a selector); ``ctx`` is a
  :class:`~lmatlas.model.positions.HookContext` (site, absolute positions, generation
  step, batch, prompt length). Return a tensor of exactly ``value``'s shape, a 0-d
  scalar, or ``None`` to keep the value.
* a **tensor**. With a selector, its position axis lists the selected positions in
  order (a closed selector such as ``@3:7`` or ``@0,2``), or those of this call (an
  open one such as ``@5:``). Without a selector it covers absolute positions
  ``0 .. n - 1`` where ``n`` is its length along the position axis: in a plain
  forward that is the whole input; during ``generate`` each decoding step takes the
  row of its own position, and steps past ``n`` are left alone. Every other axis
  (batch included) must match the value exactly.
* a **number** (or 0-d tensor): written at every selected position.

Nothing else broadcasts: a shape that does not match raises :class:`SiteError`, so a
slice such as ``z[:, :, :1]`` can never silently fill all heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from lmatlas.errors import SiteError
from lmatlas.model.positions import CallInfo, HookContext, Positions
from lmatlas.model.sites import Site

Replacement = Union[torch.Tensor, float, int, Callable[[torch.Tensor, HookContext], Union[torch.Tensor, None]]]


def _shape_error(name: str, got: tuple, expected: tuple, site: Site, what: str) -> SiteError:
    return SiteError(
        f"Replacement for {name} has shape {got}, expected {expected} ({site.info.shape}{what}). "
        "Return a tensor of exactly that shape or a scalar; to write one vector at every position or head, "
        "do it explicitly in a function (e.g. value + vector)."
    )


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.dim() == 0)


@dataclass(frozen=True, eq=False)
class BoundReplacement:
    """A replacement for one site, at all positions or at a :class:`Positions` selection."""

    site: Site
    value: Replacement
    positions: Positions | None = None

    @property
    def name(self) -> str:
        return str(self.site) if self.positions is None else f"{self.site}@{self.positions}"

    def apply(self, value: torch.Tensor, where: torch.Tensor, call: CallInfo) -> torch.Tensor | None:
        """The new value for ``value`` (absolute positions ``where`` along its position axis), or ``None``."""
        axis = self.site.info.pos_axis
        replacement = self.value
        if self.positions is None:
            local = None
            if not callable(replacement) and not _is_scalar(replacement):
                n = replacement.shape[axis] if replacement.dim() > axis else -1
                local = (where < n).nonzero().flatten() if n >= 0 else None
                if local is not None and local.numel() == 0:
                    return None
                if local is not None and local.numel() == where.numel() and n == where.numel() and int(where[0]) == 0:
                    local = None  # the whole value, the common case: no gather or scatter
        else:
            local = self.positions.select(where, call.prompt_len)
            if local.numel() == 0:
                return None
        part = value if local is None else value.index_select(axis, local)
        chosen = where if local is None else where[local]
        new = self._new_part(part, chosen, call, axis)
        if new is None:
            return None
        if local is None:
            return new
        return value.index_copy(axis, local, new)

    def _new_part(self, part: torch.Tensor, chosen: torch.Tensor, call: CallInfo, axis: int) -> torch.Tensor | None:
        replacement = self.value
        if callable(replacement):
            ctx = HookContext(self.site, chosen, call.step, call.batch, call.prompt_len)
            new = replacement(part, ctx)
            if new is None:
                return None
            if _is_scalar(new):
                return torch.full_like(part, float(new))
            if not isinstance(new, torch.Tensor):
                raise SiteError(
                    f"The replacement function for {self.name} returned {type(new).__name__}: "
                    "return a tensor, a number or None."
                )
            if tuple(new.shape) != tuple(part.shape):
                raise _shape_error(self.name, tuple(new.shape), tuple(part.shape), self.site, "")
            return new.to(dtype=part.dtype, device=part.device)
        if _is_scalar(replacement):
            return torch.full_like(part, float(replacement))
        tensor = torch.as_tensor(replacement)
        rows = self._rows(tensor, chosen, call, axis)
        picked = tensor if rows is None else tensor.index_select(axis, rows.to(tensor.device))
        if self.site.info.pos_axis == 2 and picked.dim() == part.dim() and picked.shape[-1] > part.shape[-1]:
            picked = picked[..., : part.shape[-1]]  # a pattern row's keys beyond this call's cache are zero
        if tuple(picked.shape) != tuple(part.shape):
            raise _shape_error(
                self.name,
                tuple(tensor.shape),
                self._expected(tensor, part, axis),
                self.site,
                "; the position axis lists the selected positions" if self.positions else "",
            )
        return picked.to(dtype=part.dtype, device=part.device)

    def _rows(self, tensor: torch.Tensor, chosen: torch.Tensor, call: CallInfo, axis: int) -> torch.Tensor | None:
        """Which entries of ``tensor``'s position axis go to the absolute positions ``chosen``."""
        if tensor.dim() <= axis:
            return None
        if self.positions is None:  # the tensor covers positions 0 .. n - 1
            whole = chosen.numel() == tensor.shape[axis] and (chosen.numel() == 0 or int(chosen[0]) == 0)
            return None if whole else chosen
        start, stop, indices = self.positions.absolute(call.prompt_len)
        closed = len(indices) if indices is not None else (stop - (start or 0) if stop is not None else None)
        if closed is not None and tensor.shape[axis] != closed:
            raise SiteError(
                f"Replacement for {self.name} has {tensor.shape[axis]} entries along its position axis (axis {axis}), "
                f"but @{self.positions} selects {closed} positions: give one entry per selected position."
            )
        if indices is not None:
            order = {p: i for i, p in enumerate(indices)}
            return torch.tensor([order[int(p)] for p in chosen])
        if stop is not None:  # a closed range: entry i is position start + i
            return chosen - (start or 0)
        if tensor.shape[axis] == chosen.numel():
            return None  # an open range: the tensor holds this call's selected positions
        return chosen - (start or 0)

    @staticmethod
    def _expected(tensor: torch.Tensor, part: torch.Tensor, axis: int) -> tuple:
        expected = list(part.shape)
        if tensor.dim() == part.dim():
            expected[axis] = tensor.shape[axis]
        return tuple(expected)
