"""The atlas: one DuckDB file per model, built by stages, queried from Python, the CLI and the web."""

from lmatlas.atlas.diff import AtlasDiff, diff_atlases
from lmatlas.atlas.pipeline import build_atlas
from lmatlas.atlas.query import Atlas

__all__ = ["Atlas", "AtlasDiff", "build_atlas", "diff_atlases"]
