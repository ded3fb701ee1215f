"""Top-activating contexts as the atlas stores them: activations quantised to int8 levels of a scale."""

from __future__ import annotations

from typing import Any


def dequantised(row: dict[str, Any], scale: float) -> dict[str, Any]:
    """One stored context (``levels`` in -127..127 of ``scale``, the ``peak`` position exact) as the pages read it:
    ``{"rank", "activation", "tokens", "values" [pos], "peak"}``."""
    values = [level * scale / 127 for level in row["levels"]]
    if 0 <= row["peak"] < len(values):
        values[row["peak"]] = row["activation"]  # the peak is stored exactly
    return {
        "rank": row["rank"],
        "activation": row["activation"],
        "tokens": row["tokens"],
        "values": values,
        "peak": row["peak"],
    }
