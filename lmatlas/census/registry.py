"""The head-detector registry: one small module per detector, all run the same way.

A detector answers "does this head do X?" for every head at once. It brings

* a **battery**: seeded synthetic prompts that elicit the behaviour
  (:meth:`Detector.battery` with ``null=False``), and a **null battery** of the same
  shape where the behaviour is impossible (shuffled or random tokens, ``null=True``);
* a **per-example score** in ``[0, 1]`` for every head:
  :meth:`Detector.score` returns ``[n_examples, layer, head]``.

:func:`lmatlas.census.run.run_census` runs both batteries, averages, and turns the
difference into a z-score (Welch: ``(mean - null_mean) / sqrt(var/n + null_var/n_null)``).
A head gets the detector's label when its score is at least ``threshold`` *and* its
z-score at least ``min_z`` (both explicit, documented per detector, overridable;
``min_z = None`` means the label needs no z-score, for behaviours defined relative
to other heads rather than to a null). A detector may also report named
sub-scores (:meth:`Detector.subscores`, e.g. induction's prefix matching and
copying), which the census averages next to the score.

Register a detector with :func:`register`; the CLI, the atlas and the benchmark
discover it from :data:`DETECTORS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lmatlas.census.renamed import RENAMED
from lmatlas.errors import LmatlasError, RegistryError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass
class Battery:
    """Synthetic prompts for one detector.

    Attributes:
        name: ``"<detector>"`` or ``"<detector>/null"``.
        input_ids: ``[n_examples, pos]`` token ids (no padding; every row the same length).
        seed: the generator seed, stamped on results.
        meta: detector-specific tensors (e.g. ``"targets": [n_examples, pos]`` key positions,
            ``"mask": [n_examples, pos]`` query positions that count).
    """

    name: str
    input_ids: torch.Tensor
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return int(self.input_ids.shape[0])


class Detector:
    """Base class of head detectors. Subclasses set the class attributes and implement two methods.

    Attributes:
        name: registry key and label (``"induction"``).
        description: one line: what the head does, how it is measured.
        threshold: default minimum mean score for the label.
        min_z: default minimum z-score against the null battery for the label
            (``None``: no z-score requirement).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    threshold: ClassVar[float] = 0.5
    min_z: ClassVar[float | None] = 3.0

    def battery(self, model: "Model", seed: int, null: bool = False) -> Battery:
        """Prompts that elicit the behaviour (``null=False``) or make it impossible (``null=True``)."""
        raise NotImplementedError

    def score(self, model: "Model", battery: Battery) -> torch.Tensor:
        """``[n_examples, layer, head]`` scores in ``[0, 1]``."""
        raise NotImplementedError

    def subscores(self, model: "Model", battery: Battery) -> dict[str, torch.Tensor]:
        """Optional named sub-scores, each ``[n_examples, layer, head]`` in ``[0, 1]`` (default: none)."""
        return {}


DETECTORS: dict[str, Detector] = {}


def register(detector_class: type[Detector]) -> type[Detector]:
    """Class decorator: add a detector to :data:`DETECTORS` under its ``name``."""
    if detector_class.name in DETECTORS:
        raise RegistryError(f"A detector named {detector_class.name!r} is already registered.")
    DETECTORS[detector_class.name] = detector_class()
    return detector_class


def get_detector(name: str) -> Detector:
    """A registered detector by name, with the list of names when there is no such detector."""
    _load_builtin()
    renamed = dict(RENAMED).get(name)
    if renamed is not None:
        raise LmatlasError(f"Head type {name!r} is now called {renamed!r} ({DETECTORS[renamed].description}).")
    try:
        return DETECTORS[name]
    except KeyError:
        raise LmatlasError(f"Unknown head type {name!r}. Known types: {', '.join(sorted(DETECTORS))}.") from None


def all_detectors() -> dict[str, Detector]:
    _load_builtin()
    return dict(DETECTORS)


def _load_builtin() -> None:
    """Import the built-in detector modules (each registers itself)."""
    import importlib
    import pkgutil

    from lmatlas.census import detectors

    for module in pkgutil.iter_modules(detectors.__path__):
        importlib.import_module(f"{detectors.__name__}.{module.name}")
