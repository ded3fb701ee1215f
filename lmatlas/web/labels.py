"""Labels on the explorer's pages: a unit's label sentence and scores, and label text in search.

Both read :mod:`lmatlas.atlas.label_view` through :meth:`Explorer.read` (the explorer's lock);
an atlas without the stage ``labels`` gives ``None`` (the page says "no label") and no matches.
"""

from __future__ import annotations

import json
from typing import Any

from lmatlas.errors import AtlasError
from lmatlas.web.state import Explorer


def _as_table(value: Any):
    import pyarrow as pa

    return pa.table({"json": [json.dumps(value, default=str)]})


def explanation(ex: Explorer, unit: str) -> dict[str, Any] | None:
    """``{sentence, labelled, labels}`` of ``unit`` (``"L5.H3"``), or ``None`` without labels."""
    from lmatlas.atlas.label_view import explain

    if not ex.has("labels"):
        return None
    try:
        found = json.loads(ex.read(lambda atlas: _as_table(explain(atlas, unit)))[0]["json"])
    except AtlasError:
        return None
    return {"sentence": found["sentence"], "labelled": found["labelled"], "labels": found["labels"]}


def label_matches(ex: Explorer, text: str, limit: int) -> list[dict[str, Any]]:
    """Labelled units whose sentence or rule mentions ``text`` (case-insensitive)."""
    from lmatlas.atlas.label_view import find_labels

    if not ex.has("labels"):
        return []
    return json.loads(ex.read(lambda atlas: _as_table(find_labels(atlas, text, limit=limit)))[0]["json"])
