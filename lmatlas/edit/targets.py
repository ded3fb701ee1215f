"""What an intervention acts on: a head, a neuron or a whole site, with optional positions.

=====================  ==========================  =========================================
target                 site it edits               slice of the site's value
=====================  ==========================  =========================================
``L5.H3``              ``L5.attn.z``               head 3: ``[batch, pos, d_head]``
``L12.N1031``          ``L12.mlp.act``             neuron 1031: ``[batch, pos]``
``L10.resid.post``     ``L10.resid.post``          all of it: ``[batch, pos, d_model]``
``L5.attn.out.H3``     ``L5.attn.out``             head 3's write: ``[batch, pos, d_model]``
``L5.H3@-1``           (any of the above)          only the last prompt token
``L10.resid.post@3:7`` (positions 3..6)
=====================  ==========================  =========================================

A head is edited through its ``attn.z`` (what it reads out of the values, before
``W_O``): zeroing it removes the head's write exactly, also in families with a
post-attention norm. ``L5.attn.out.H3`` edits the head's write itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmatlas.errors import SiteError
from lmatlas.model.arch import HeadLayout
from lmatlas.model.positions import Positions, split_site_name
from lmatlas.model.sites import COMPONENTS, Site, check_head, check_layer, head_or_neuron, parse_sites

_SITE_HEAD = re.compile(r"^(?P<site>L\d+\.attn\.(?:z|out|q))\.H(?P<index>\d+)$")


@dataclass(frozen=True)
class Target:
    """A parsed target: ``sites`` it touches, ``index`` along the head/neuron axis (or ``None``), ``positions``."""

    text: str
    sites: tuple[Site, ...]
    index: int | None = None
    positions: Positions | None = None

    @property
    def kind(self) -> str:
        """``"head"``, ``"neuron"`` or ``"site"``."""
        if self.index is None:
            return "site"
        return "neuron" if self.sites[0].component == "mlp.act" else "head"

    def slice_shape(self, layout: HeadLayout) -> tuple[int, ...]:
        """The per-position shape an intervention's vector must have (``()`` for a neuron)."""
        component = self.sites[0].component
        if self.kind == "neuron":
            return ()
        if self.kind == "head":
            return (layout.d_model,) if component == "attn.out" else (layout.d_head,)
        shape = COMPONENTS[component].shape
        sizes = {"d_model": layout.d_model, "d_head": layout.d_head, "neuron": layout.d_mlp,
                 "head": layout.n_heads, "kv_head": layout.n_kv_heads}
        return tuple(sizes[name] for name in shape.strip("[]").split(", ")[2:] if name in sizes)


def parse_target(text: str, layout: HeadLayout) -> Target:
    """Parse and range-check a target (see the module docstring)."""
    if not isinstance(text, str):
        raise SiteError(f"A target is a string such as 'L5.H3', 'L12.N1031' or 'L10.resid.post', got {text!r}.")
    name, positions = split_site_name(text.strip())
    unit = head_or_neuron(name, layout)
    if unit is not None:
        kind, layer, index = unit
        return Target(text, (Site(layer, "attn.z" if kind == "head" else "mlp.act"),), index, positions)
    if match := _SITE_HEAD.match(name):
        site = parse_sites(match["site"], layout)[0]
        check_head(site.layer, int(match["index"]), layout)
        return Target(text, (site,), int(match["index"]), positions)
    sites = parse_sites(name, layout)
    for site in sites:
        check_layer(site.layer, layout)
    return Target(text, tuple(sites), None, positions)
