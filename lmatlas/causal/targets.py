"""What activation patching and attribution act on: targets of the one grammar (:mod:`lmatlas.model.targets`).

Patching and attribution take exactly one site per target (``L5.H3``, ``L5.H3.q``,
``L5.KV1.k``, ``L3.resid.post``, ``L3.N5``, with ``@positions``); a pattern is patched
through the queries or keys that make it. :func:`expand` names target families.
"""

from __future__ import annotations

from lmatlas.errors import SiteError
from lmatlas.model.arch import HeadLayout
from lmatlas.model.sites import parse_sites
from lmatlas.model.targets import Target, parse_target

#: A patchable component is a single-site target.
Component = Target


def parse_component(text: str, layout: HeadLayout) -> Target:
    """Parse and range-check one single-site target (:func:`lmatlas.model.targets.parse_target`)."""
    target = parse_target(text, layout)
    if target.site.component == "attn.pattern":
        raise SiteError("Patch a head's pattern through its queries or keys ('L5.H3.q', 'L5.KV1.k').")
    return target


def all_heads(layout: HeadLayout) -> list[str]:
    """``["L0.H0", "L0.H1", ...]``: every query head's output."""
    return [f"L{layer}.H{head}" for layer in range(layout.n_layers) for head in range(layout.n_heads)]


def expand(spec: str, layout: HeadLayout) -> list[str]:
    """Target families: ``heads``, ``heads.q``, ``kv.k``, ``kv.v``, ``resid.post``/``mlp.out``/... (every layer)."""
    if spec == "heads":
        return all_heads(layout)
    if spec == "heads.q":
        return [f"{name}.q" for name in all_heads(layout)]
    if spec in ("kv.k", "kv.v"):
        return [f"L{layer}.KV{kv}.{spec[-1]}" for layer in range(layout.n_layers) for kv in range(layout.n_kv_heads)]
    return [str(site) for site in parse_sites(spec, layout)]
