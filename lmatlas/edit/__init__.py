"""Edit the model: interventions as values, composed into edits, applied to any forward or ``generate``.

* :mod:`lmatlas.model.targets` — what an intervention acts on (``L5.H3``, ``L12.N1031``, sites, ``@positions``);
* :mod:`lmatlas.edit.interventions` — Ablate, Scale, Set, Add, Project, Patch, Learned;
* :mod:`lmatlas.edit.edit` — :class:`Edit` (``|``), save / load;
* :mod:`lmatlas.edit.stats` — means and resample banks for mean/resample ablation;
* :mod:`lmatlas.edit.steering` — steering vectors and decoded directions;
"""

from lmatlas.edit.edit import Edit
from lmatlas.edit.interventions import Ablate, Add, Intervention, Learned, Patch, Project, Scale, Set
from lmatlas.edit.stats import AblationStats, stats_for, stats_from_atlas
from lmatlas.edit.steering import head_direction, neuron_direction, steering_vector

__all__ = [
    "AblationStats", "Ablate", "Add", "Edit", "Intervention", "Learned", "Patch", "Project", "Scale", "Set",
    "head_direction", "neuron_direction", "stats_for", "stats_from_atlas", "steering_vector",
]
