"""What activation patching and attribution act on: components named in the site grammar.

=====================  ===================  ============================  =============================
target                 site                 slice (axis, index)           meaning
=====================  ===================  ============================  =============================
``L5.H3``              ``L5.attn.z``        head 3 (axis 2)               a head's output, all positions
``L5.H3@7``            ``L5.attn.z``        head 3, position 7            ... at one position
``L5.H3.q``            ``L5.attn.q``        query head 3 (axis 2)         a head's queries
``L5.KV1.k`` / ``.v``  ``L5.attn.k/v``      KV head 1 (axis 2)            a KV group's keys / values
``L3.resid.post``      the site             all                           a layer's residual stream
``L3.attn.out``        ``L3.attn.out``      all heads                     the attention write
``L3.mlp.out``         the site             all                           the MLP write
``L3.N5``              ``L3.mlp.act``       neuron 5 (last axis)          one neuron
=====================  ===================  ============================  =============================

Keys and values belong to KV heads (GQA-native: no un-grouping), so their targets
name the KV head; patching one changes every query head of its group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmatlas.errors import SiteError
from lmatlas.model.arch import HeadLayout
from lmatlas.model.positions import Positions, split_site_name
from lmatlas.model.sites import Site, check_head, head_or_neuron, parse_sites

_QUERY = re.compile(r"^L\d+\.H\d+\.q$")
_KV = re.compile(r"^L(?P<layer>\d+)\.KV(?P<index>\d+)\.(?P<part>[kv])$")


@dataclass(frozen=True)
class Component:
    """A patchable component: ``site``, the ``index`` along ``axis`` (or all of it), optional positions."""

    name: str
    site: Site
    axis: int | None = None
    index: int | None = None
    positions: Positions | None = None

    def select(self, value):
        """The component's slice of a site value (``value`` itself when it is the whole site)."""
        return value if self.index is None else value.select(self.axis, self.index)


def parse_component(text: str, layout: HeadLayout) -> Component:
    """Parse and range-check one target name (see the module docstring)."""
    name, positions = split_site_name(text.strip())
    query = name.endswith(".q") and _QUERY.match(name)
    unit = head_or_neuron(name[: -len(".q")] if query else name, layout)
    if unit is not None:
        kind, layer, index = unit
        if kind == "neuron":
            return Component(text, Site(layer, "mlp.act"), -1, index, positions)
        return Component(text, Site(layer, "attn.q" if query else "attn.z"), 2, index, positions)
    if match := _KV.match(name):
        layer, kv = int(match["layer"]), int(match["index"])
        check_head(layer, kv, layout, kv=True)
        return Component(text, Site(layer, f"attn.{match['part']}"), 2, kv, positions)
    sites = parse_sites(name, layout)
    if len(sites) != 1:
        raise SiteError(f"Target {text!r} names {len(sites)} sites: name one layer (e.g. 'L3.{name}').")
    if sites[0].component == "attn.pattern":
        raise SiteError("Patch a head's pattern through its queries or keys ('L5.H3.q', 'L5.KV1.k').")
    return Component(text, sites[0], None, None, positions)


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
