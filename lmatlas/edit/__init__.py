"""Edit the model: interventions as values, composed into edits, applied to any forward or ``generate``.

* :mod:`lmatlas.model.targets` — what an intervention acts on (``L5.H3``, ``L12.N1031``, sites, ``@positions``);
* :mod:`lmatlas.edit.interventions` — Ablate, Scale, Set, Add, Project, Patch, Learned;
* :mod:`lmatlas.edit.edit` — :class:`Edit` (``|``), save / load;
* :mod:`lmatlas.edit.stats` — means and resample banks for mean/resample ablation;
* :mod:`lmatlas.edit.steering` — steering vectors and decoded directions;
* :mod:`lmatlas.edit.forms` — how the scalar interventions are written on the command line and in the explorer.

The names below load on first use (``lmatlas.edit.forms`` stays light for the CLI).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.lazy import lazy_exports

_LAZY = {
    "Edit": "lmatlas.edit.edit",
    "AblationStats": "lmatlas.edit.stats",
    "stats_for": "lmatlas.edit.stats",
    "stats_from_atlas": "lmatlas.edit.stats",
    "head_direction": "lmatlas.edit.steering",
    "neuron_direction": "lmatlas.edit.steering",
    "steering_vector": "lmatlas.edit.steering",
    **{
        name: "lmatlas.edit.interventions"
        for name in ("Ablate", "Add", "Intervention", "Learned", "Patch", "Project", "Scale", "Set")
    },
}

if TYPE_CHECKING:
    from lmatlas.edit.edit import Edit
    from lmatlas.edit.interventions import Ablate, Add, Intervention, Learned, Patch, Project, Scale, Set
    from lmatlas.edit.stats import AblationStats, stats_for, stats_from_atlas
    from lmatlas.edit.steering import head_direction, neuron_direction, steering_vector


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "AblationStats",
    "Ablate",
    "Add",
    "Edit",
    "Intervention",
    "Learned",
    "Patch",
    "Project",
    "Scale",
    "Set",
    "head_direction",
    "neuron_direction",
    "stats_for",
    "stats_from_atlas",
    "steering_vector",
]
