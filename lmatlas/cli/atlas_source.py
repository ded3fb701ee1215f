"""``--atlas FILE``: read-only commands answer from an atlas instead of loading the model.

``heads``, ``neurons``, ``search`` and ``lens`` (the stored corpus statistics) take
``--atlas FILE`` and read what ``lmatlas map`` stored (seconds, no model). Options that
only the model can answer (a new prompt, other census thresholds, more tokens than were
stored) are refused with one line that says which command computes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from lmatlas.errors import LmatlasError

ATLAS_OPT = typer.Option(
    None,
    "--atlas",
    help="Answer from this atlas file (seconds, no model) instead of loading the model.",
    show_default=False,
)


def check_atlas_use(atlas: Optional[Path], model: Optional[str], refused: dict[str, Any]) -> None:
    """Refuse ``--atlas`` together with a model, or with options only the model answers.

    ``refused`` maps an option's name to its value, counted as given when not ``None``/``False``/empty.
    """
    if atlas is None:
        return
    if model is not None:
        raise LmatlasError(f"Give a model or --atlas {atlas}, not both: the atlas answers without the model.")
    given = [name for name, value in refused.items() if value not in (None, False, [], ())]
    if given:
        raise LmatlasError(
            f"{', '.join(given)} needs the model: the atlas stores the default settings only. "
            "Drop --atlas to compute from the model."
        )
