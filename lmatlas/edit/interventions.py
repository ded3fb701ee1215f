"""Interventions as frozen values: each says what to do to a target, and binds to a model.

=========================================  ==============================================
intervention                               new value of the target slice ``x``
=========================================  ==============================================
``Ablate(t, how="zero")``                  ``0``
``Ablate(t, how="mean")``                  the target's mean over a corpus (or an atlas)
``Ablate(t, how="resample")``              the target's value at random corpus positions
``Scale(t, factor)``                       ``factor * x``
``Set(t, value)``                          ``value`` (clamp a neuron)
``Add(t, vector, alpha=1)``                ``x + alpha * vector`` (steer)
``Project(t, direction, remove=True)``     ``x - (x . d) d`` (or ``(x . d) d`` to keep only it)
``Patch(t, source)``                       the source run's value (an ActivationCache or tensor)
``Learned(t, module)``                     ``module(x)`` (trainable: gradients reach its parameters)
=========================================  ==============================================

``t`` is a target string (:mod:`lmatlas.model.targets`). ``steps`` chooses the forward
calls an intervention acts on: ``None`` (all), ``"prompt"`` (the prompt forward only),
``"generated"`` (decoding steps only) or ``(start, stop)`` generation steps. Combine
interventions with ``|`` into an :class:`~lmatlas.edit.edit.Edit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Union

import torch

from lmatlas.errors import EditError
from lmatlas.model.positions import HookContext
from lmatlas.model.replacement import BoundReplacement
from lmatlas.model.targets import Target, parse_target

if TYPE_CHECKING:
    from lmatlas.edit.stats import AblationStats
    from lmatlas.model.handle import Model

Steps = Union[None, str, tuple[int, int]]
HOWS = ("zero", "mean", "resample")


def _check_finite(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise EditError(f"{name} holds NaN or infinite values: every value of an edit must be finite.")
    elif isinstance(value, (int, float)) and not math.isfinite(float(value)):
        raise EditError(f"{name} is {value}: every value of an edit must be finite.")


def _check_steps(steps: Steps) -> None:
    if steps is None or steps in ("prompt", "generated"):
        return
    if isinstance(steps, tuple) and len(steps) == 2 and all(isinstance(s, int) for s in steps) and steps[0] < steps[1]:
        return
    raise EditError(f"steps={steps!r}: use None (every step), 'prompt', 'generated' or a (start, stop) step range.")


def _acts_at(steps: Steps, step: int) -> bool:
    if steps is None:
        return True
    if steps == "prompt":
        return step == 0
    if steps == "generated":
        return step > 0
    return steps[0] <= step < steps[1]


class Intervention:
    """Base class: subclasses are frozen dataclasses with ``target`` and ``steps`` and define :meth:`transform`."""

    target: str
    steps: Steps

    def transform(self, x: torch.Tensor, ctx: HookContext, bound: "BoundTarget") -> torch.Tensor:
        """The new value of the target slice ``x`` (``[batch, pos, *slice_shape]``)."""
        raise NotImplementedError

    def check(self, model: "Model", target: Target) -> None:
        """Validate parameters against the model before any compute (raises :class:`EditError`)."""

    def prepare(self, bound: "BoundTarget") -> None:
        """Compute what the intervention needs (statistics) at bind time, before any forward."""

    def parameters(self) -> dict[str, Any]:
        """JSON-able parameters (tensors are saved separately, see :mod:`lmatlas.edit.files`)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("target",)}

    def __or__(self, other):
        from lmatlas.edit.edit import Edit

        return Edit((self,)) | other

    def bind(self, model: "Model", stats: "AblationStats | None" = None) -> list[BoundReplacement]:
        """Check against ``model`` and turn into site replacements (one per site the target touches)."""
        _check_steps(self.steps)
        target = parse_target(self.target, model.layout, model.dictionaries)
        self.check(model, target)
        bound = BoundTarget(self, target, model, stats)
        self.prepare(bound)
        return [BoundReplacement(site, bound.replacement(site), target.positions) for site in target.sites]

    def describe(self) -> str:
        params = ", ".join(f"{k}={_short(v)}" for k, v in self.parameters().items() if v is not None)
        return f"{type(self).__name__}({self.target!r}{', ' + params if params else ''})"


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    return repr(value)


@dataclass
class BoundTarget:
    """An intervention bound to a model: applies :meth:`Intervention.transform` to the target's slice."""

    intervention: Intervention
    target: Target
    model: "Model"
    stats: "AblationStats | None" = None
    cache: dict = field(default_factory=dict)

    def model_stats(self) -> "AblationStats":
        """Corpus statistics of the model, computed once per model and cached on it."""
        from lmatlas.edit.stats import stats_for

        return stats_for(self.model)

    def replacement(self, site) -> Callable:
        index, axis, steps = self.target.index, self.target.axis, self.intervention.steps

        def replace(value: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
            if not _acts_at(steps, ctx.step):
                return None
            if index is None:
                return self.intervention.transform(value, ctx, self)
            part = value.select(axis, index)
            new = self.intervention.transform(part, ctx, self).to(value.dtype)
            out = value.clone()
            out.select(axis, index).copy_(new)
            return out

        return replace


def _vector_like(vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return vector.to(dtype=x.dtype, device=x.device)


@dataclass(frozen=True)
class Ablate(Intervention):
    target: str
    how: str = "zero"
    seed: int = 0
    steps: Steps = None

    def check(self, model, target):
        if self.how not in HOWS:
            raise EditError(f"Ablate(how={self.how!r}): use one of {', '.join(HOWS)}.")

    def prepare(self, bound):
        if self.how == "zero":
            return
        if bound.stats is None:
            bound.stats = bound.model_stats()
        for site in bound.target.sites:
            bound.stats.mean(site)
            if self.how == "resample":
                bound.stats.resample(site, None, "site", (1, 1), torch.Generator().manual_seed(0))

    def transform(self, x, ctx, bound):
        if self.how == "zero":
            return torch.zeros_like(x)
        stats = bound.stats
        site = ctx.site
        if self.how == "mean":
            return stats.mean(site, bound.target.index, bound.target.kind).to(x.dtype).expand_as(x).clone()
        generator = bound.cache.setdefault("generator", torch.Generator().manual_seed(self.seed))
        return stats.resample(site, bound.target.index, bound.target.kind, x.shape[:2], generator).to(x.dtype)


@dataclass(frozen=True)
class Scale(Intervention):
    target: str
    factor: float = 0.0
    steps: Steps = None

    def check(self, model, target):
        _check_finite(f"Scale({self.target!r}) factor", self.factor)

    def transform(self, x, ctx, bound):
        return x * self.factor


@dataclass(frozen=True)
class Set(Intervention):
    target: str
    value: float = 0.0
    steps: Steps = None

    def check(self, model, target):
        _check_finite(f"Set({self.target!r}) value", self.value)

    def transform(self, x, ctx, bound):
        return torch.full_like(x, float(self.value))


def _check_vector(name: str, vector: torch.Tensor, model: "Model", target: Target) -> None:
    if not isinstance(vector, torch.Tensor):
        raise EditError(f"{name} must be a tensor, got {type(vector).__name__}.")
    _check_finite(name, vector)
    expected = target.slice_shape(model.layout)
    if tuple(vector.shape) != expected:
        raise EditError(f"{name} has shape {tuple(vector.shape)}, but {target.text} needs {expected} per position.")


@dataclass(frozen=True, eq=False)
class Add(Intervention):
    target: str
    vector: torch.Tensor = None
    alpha: float = 1.0
    steps: Steps = None

    def check(self, model, target):
        _check_vector(f"Add({self.target!r}) vector", self.vector, model, target)
        _check_finite(f"Add({self.target!r}) alpha", self.alpha)

    def transform(self, x, ctx, bound):
        return x + self.alpha * _vector_like(self.vector, x)


@dataclass(frozen=True, eq=False)
class Project(Intervention):
    target: str
    direction: torch.Tensor = None
    remove: bool = True
    steps: Steps = None

    def check(self, model, target):
        _check_vector(f"Project({self.target!r}) direction", self.direction, model, target)
        if float(self.direction.norm()) == 0.0:
            raise EditError(f"Project({self.target!r}): the direction is the zero vector.")

    def transform(self, x, ctx, bound):
        unit = _vector_like(self.direction, x)
        unit = unit / unit.norm()
        along = (x * unit).sum(-1, keepdim=True) * unit
        return x - along if self.remove else along


@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Values from another run: ``source`` is an ActivationCache (holding the target's site) or a site tensor.

    The source covers absolute positions ``0..n-1``; during ``generate`` each step takes its
    own position (see :mod:`lmatlas.model.replacement`).
    """

    target: str
    source: Any = None
    steps: Steps = None

    def check(self, model, target):
        for site in target.sites:
            tensor = self._tensor(site)
            _check_finite(f"Patch({self.target!r}) source", tensor)

    def _tensor(self, site) -> torch.Tensor:
        source = self.source
        if isinstance(source, torch.Tensor):
            return source
        if source is not None and str(site) in source:
            return source[str(site)]
        raise EditError(
            f"Patch({self.target!r}): the source holds no {site}; capture it in the source run "
            f"(model.run(..., capture=[{str(site)!r}]))."
        )

    def transform(self, x, ctx, bound):
        full = self._tensor(ctx.site).detach()
        rows = ctx.positions.to(full.device)
        if int(rows.max()) >= full.shape[1]:
            raise EditError(
                f"Patch({self.target!r}): the source has {full.shape[1]} positions, "
                f"position {int(rows.max())} was asked."
            )
        picked = full.index_select(1, rows)
        if bound.target.index is not None:
            picked = picked.select(bound.target.axis, bound.target.index)
        if picked.shape != x.shape:
            raise EditError(
                f"Patch({self.target!r}): source slice {tuple(picked.shape)} does not match "
                f"{tuple(x.shape)} (same batch size and prompt as the source run?)."
            )
        return picked.to(dtype=x.dtype, device=x.device)


@dataclass(frozen=True, eq=False)
class Learned(Intervention):
    """``module(x)``: a trainable map of the target slice (its parameters get gradients)."""

    target: str
    module: torch.nn.Module = None
    steps: Steps = None

    def check(self, model, target):
        if not isinstance(self.module, torch.nn.Module):
            raise EditError(f"Learned({self.target!r}) needs a torch.nn.Module, got {type(self.module).__name__}.")

    def transform(self, x, ctx, bound):
        return self.module(x)


#: name -> class, for loading saved edits (a table, not eval).
INTERVENTIONS: dict[str, type[Intervention]] = {
    cls.__name__: cls for cls in (Ablate, Scale, Set, Add, Project, Patch, Learned)
}
