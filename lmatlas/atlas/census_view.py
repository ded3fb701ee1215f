"""The census an atlas stored, as a :class:`~lmatlas.census.run.Census` (no model, no batteries).

The ``census`` stage keeps, per detector and head, the mean score, the null baseline,
the z-score and the seed (``head_scores``); that is all the ``heads`` table and grid
show, so ``lmatlas heads --atlas FILE`` answers from it in a second instead of running
every battery again. Labels are recomputed from the stored score and z-score with the
detector's documented thresholds, or with overrides (``--threshold``, ``--min-z``),
which the atlas can answer too. What it cannot give: per-example standard deviations
and sub-scores (not stored: zeros and none), or another seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

from lmatlas.errors import AtlasError

if TYPE_CHECKING:
    from lmatlas.atlas.query import Atlas
    from lmatlas.census.run import Census


def census_from_atlas(
    atlas: "Atlas",
    detectors: list[str] | None = None,
    thresholds: Mapping[str, float] | None = None,
    min_z: float | Mapping[str, float | None] | None = None,
) -> "Census":
    """The stored census of ``atlas`` (``detectors``: only those), labels under the given thresholds.

    ``thresholds`` and ``min_z`` are read as :func:`lmatlas.census.run.run_census` reads them
    (``None``: each detector's documented value; a float ``min_z``: for every detector).
    """
    from lmatlas.census.registry import all_detectors
    from lmatlas.census.run import Census, DetectorResult

    card = atlas.card
    n_layers, n_heads = int(card.get("layers") or 0), int(card.get("query_heads") or 0)
    rows = atlas.sql(
        "SELECT layer, head, detector, score, baseline, z, seed FROM head_scores ORDER BY detector, layer, head"
    ).to_pylist()
    if not rows:
        raise AtlasError(f"{atlas.path} has no head census: add it with {atlas.map_command(['census'])}")
    if not (n_layers and n_heads):
        n_layers = 1 + max(r["layer"] for r in rows)
        n_heads = 1 + max(r["head"] for r in rows)
    stored = sorted({r["detector"] for r in rows})
    wanted = stored if detectors is None else detectors
    missing = [name for name in wanted if name not in stored]
    if missing:
        raise AtlasError(f"{atlas.path} has no scores for {', '.join(missing)} (it has {', '.join(stored)}).")
    known = all_detectors()
    results = {}
    for name in wanted:
        score, null, z = (torch.full((n_layers, n_heads), float("nan")) for _ in range(3))
        seed = 0
        for r in rows:
            if r["detector"] == name:
                score[r["layer"], r["head"]], null[r["layer"], r["head"]] = r["score"], r["baseline"]
                z[r["layer"], r["head"]] = float("nan") if r["z"] is None else r["z"]
                seed = int(r["seed"] or 0)
        detector = known.get(name)
        threshold = (thresholds or {}).get(name, detector.threshold if detector else 0.5)
        if min_z is None:
            z_min = detector.min_z if detector else None
        elif isinstance(min_z, Mapping):
            z_min = min_z.get(name, detector.min_z if detector else None)
        else:
            z_min = min_z
        results[name] = DetectorResult(
            name=name,
            description=detector.description if detector else "",
            score=score,
            null=null,
            score_std=torch.zeros_like(score),
            null_std=torch.zeros_like(null),
            z=z,
            n=0,
            n_null=0,
            seed=seed,
            threshold=float(threshold),
            min_z=z_min,
            battery={"stored_in": str(atlas.path)},
            null_battery={},
        )
    seed = next(iter(results.values())).seed if results else 0
    provenance = {"model": card.get("source"), "atlas": str(atlas.path), "seed": seed}
    return Census(n_layers=n_layers, n_heads=n_heads, seed=seed, results=results, provenance=provenance)
