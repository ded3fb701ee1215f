"""The dictionaries a Ray worker attaches: the driver's ``model.dictionaries``, shipped with the workers.

A worker loads the model by its source (:mod:`lmatlas.atlas.ray_executor`), which knows
nothing of the sparse dictionaries attached to the driver's model. The executor ships each
one as ``{site, mode, error, dictionary, fingerprint}`` (the object itself, pickled once into
Ray's object store, so a worker on another node needs no shared file system) and every
worker attaches it to its own model after loading, through the same check the driver's
attach made (:func:`lmatlas.features.sites.attach`: width, site and the model fingerprint the
dictionary's card records). The weights fingerprint
(:func:`lmatlas.model.provenance.weights_fingerprint`) is compared on arrival.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmatlas.errors import AtlasError

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def shipped_dictionaries(model: "Model") -> list[dict[str, Any]]:
    """What every worker attaches after loading: ``{site, mode, error, dictionary, fingerprint}`` per dictionary."""
    from lmatlas.model.provenance import weights_fingerprint

    return [
        {
            "site": str(entry.site),
            "mode": entry.mode,
            "error": entry.keep_error,
            "dictionary": entry.dictionary,
            "fingerprint": weights_fingerprint(entry.dictionary),
        }
        for entry in model.dictionaries
    ]


def attach_shipped(model: "Model", shipped: list[dict[str, Any]]) -> None:
    """Attach the driver's dictionaries to a worker's model (each checked against it, and its weights' fingerprint)."""
    from lmatlas.features.sites import attach
    from lmatlas.model.provenance import weights_fingerprint

    for item in shipped:
        found = weights_fingerprint(item["dictionary"])
        if found != item["fingerprint"]:
            raise AtlasError(
                f"The dictionary for {item['site']} arrived on a Ray worker with weights fingerprint {found}, "
                f"not the driver's {item['fingerprint']}: every worker needs the same lmatlas and torch versions."
            )
        attach(model, item["dictionary"], item["site"], mode=item["mode"], error=item["error"])
