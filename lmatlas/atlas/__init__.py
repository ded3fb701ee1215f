"""The atlas: one DuckDB file per model, built by stages, queried from Python, the CLI and the web.

The names below load on first use, so reading an atlas (``Atlas``) does not import torch
(the build does): ``lmatlas search --atlas FILE`` answers without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Atlas": "lmatlas.atlas.query",
    "AtlasDiff": "lmatlas.atlas.diff",
    "diff_atlases": "lmatlas.atlas.diff",
    "build_atlas": "lmatlas.atlas.pipeline",
}

__all__ = ["Atlas", "AtlasDiff", "build_atlas", "diff_atlases"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'lmatlas.atlas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
