"""The one target grammar: what an edit, a patch or an attribution acts on.

=======================  ==================  ==================  ==========================================
target                   site                slice (axis)        meaning
=======================  ==================  ==================  ==========================================
``L5.H3``                ``L5.attn.z``       head 3 (axis 2)     a head's output before ``W_O``
``L5.H3.q``              ``L5.attn.q``       query head 3 (2)    a head's queries (after rotary, q-norm)
``L5.H3.out``            ``L5.attn.out``     head 3 (2)          a head's own write ``[batch, pos, d_model]``
``L5.KV1.k`` / ``.v``    ``L5.attn.k`` / v   KV head 1 (2)       a KV group's keys / values (every query
                                                                 head of the group reads them)
``L12.N1031``            ``L12.mlp.act``     neuron 1031 (-1)    one neuron
``L15.resid.post.F123``  ``L15.resid.post.F`` latent 123 (-1) one feature of the dictionary attached there
``L15.mlp.F77``          ``L15.mlp.F``       latent 77 (-1)      one latent of the transcoder of MLP 15
``L15.resid.post.E``     the site            all of it           the dictionary's error node (site - reconstruction)
``L10.resid.post``       the site            all of it           a site (``attn.z`` alone: every layer)
``L5.H3@-1``             (any of the above)  only the last prompt token (positions follow an ``@``)
=======================  ==================  ==================  ==========================================

A head is edited through its ``attn.z`` (what it reads out of the values, before ``W_O``):
zeroing it removes the head's write exactly, also in families with a post-attention norm.
Keys and values belong to KV heads (GQA-native: no un-grouping), so their targets name the
KV head. :func:`parse_target` checks ranges against the model's layout; every error names the
valid range or the spelling to use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmatlas.errors import SiteError
from lmatlas.model.arch import HeadLayout
from lmatlas.model.dictionary_sites import DictionaryRegistry
from lmatlas.model.positions import Positions, split_site_name
from lmatlas.model.sites import Site, check_head, check_layer, head_or_neuron, parse_feature, parse_sites

_HEAD_PART = re.compile(r"^L(?P<layer>\d+)\.H(?P<index>\d+)\.(?P<part>q|out)$")
_KV_PART = re.compile(r"^L(?P<layer>\d+)\.KV(?P<index>\d+)\.(?P<part>[kv])$")
_OLD_SITE_HEAD = re.compile(r"^L(?P<layer>\d+)\.attn\.(?P<part>z|out|q)\.H(?P<index>\d+)$")
_PART_SITE = {"q": "attn.q", "out": "attn.out", "k": "attn.k", "v": "attn.v"}
HEAD_AXIS = 2  # the head / KV-head axis of attn.q, attn.k, attn.v, attn.z and attn.out values


@dataclass(frozen=True)
class Target:
    """A parsed target: the ``sites`` it touches, ``index`` along ``axis`` (``None``: all), ``positions``.

    ``kind`` is ``"head"`` (a query or KV head's slice, axis 2), ``"neuron"`` (``mlp.act``, last
    axis), ``"feature"`` (a dictionary latent, last axis) or ``"site"`` (every value of each site).
    """

    text: str
    sites: tuple[Site, ...]
    index: int | None = None
    positions: Positions | None = None

    @property
    def kind(self) -> str:
        if self.index is None:
            return "site"
        if self.sites[0].is_feature:
            return "feature"
        return "neuron" if self.sites[0].component == "mlp.act" else "head"

    @property
    def axis(self) -> int | None:
        """The axis ``index`` selects along in the site's value (``None`` for a whole site)."""
        return None if self.index is None else (-1 if self.kind in ("neuron", "feature") else HEAD_AXIS)

    @property
    def site(self) -> Site:
        """The one site of a single-site target (patching and attribution need exactly one)."""
        if len(self.sites) != 1:
            raise SiteError(
                f"Target {self.text!r} names {len(self.sites)} sites: name one layer "
                f"(e.g. 'L3.{self.sites[0].component}')."
            )
        return self.sites[0]

    def select(self, value):
        """The target's slice of a site value (``value`` itself when it is the whole site)."""
        return value if self.index is None else value.select(self.axis, self.index)

    def slice_shape(self, layout: HeadLayout) -> tuple[int, ...]:
        """The per-position shape of the target's slice (``()`` for a neuron)."""
        component = self.sites[0].component
        if self.kind in ("neuron", "feature"):
            return ()
        if self.sites[0].component.endswith(".F"):
            raise SiteError(f"Edit one latent of {self.text!r} at a time, e.g. '{self.text}123'.")
        if self.kind == "head":
            return (layout.d_model,) if component == "attn.out" else (layout.d_head,)
        shape = self.sites[0].info.shape
        sizes = {
            "d_model": layout.d_model,
            "d_head": layout.d_head,
            "neuron": layout.d_mlp,
            "head": layout.n_heads,
            "kv_head": layout.n_kv_heads,
        }
        return tuple(sizes[name] for name in shape.strip("[]").split(", ")[2:] if name in sizes)


def parse_target(text: str, layout: HeadLayout, dictionaries: DictionaryRegistry | None = None) -> Target:
    """Parse and range-check a target (see the module docstring).

    A feature target (``L15.resid.post.F123``) is checked against ``dictionaries`` (the model's
    registry) when given: a dictionary must be attached there and the latent within its range.
    """
    if not isinstance(text, str):
        raise SiteError(f"A target is a string such as 'L5.H3', 'L12.N1031' or 'L10.resid.post', got {text!r}.")
    name, positions = split_site_name(text.strip())
    if feature := parse_feature(name, layout):
        if dictionaries is not None:
            dictionaries.check_name(name)
        return Target(text, tuple(site for site, _ in feature), feature[0][1], positions)
    unit = head_or_neuron(name, layout)
    if unit is not None:
        kind, layer, index = unit
        return Target(text, (Site(layer, "attn.z" if kind == "head" else "mlp.act"),), index, positions)
    for pattern, kv in ((_HEAD_PART, False), (_KV_PART, True)):
        if match := pattern.match(name):
            layer, index = int(match["layer"]), int(match["index"])
            check_head(layer, index, layout, kv=kv)
            return Target(text, (Site(layer, _PART_SITE[match["part"]]),), index, positions)
    if match := _OLD_SITE_HEAD.match(name):
        part = "" if match["part"] == "z" else f".{match['part']}"
        raise SiteError(
            f"Target {name!r}: write a head's part as L<layer>.H<head>[.q|.out], here "
            f"'L{match['layer']}.H{match['index']}{part}'."
        )
    sites = parse_sites(name, layout)
    for site in sites:
        check_layer(site.layer, layout)
    return Target(text, tuple(sites), None, positions)
