"""The site grammar: one way to name every place in the model, everywhere.

A *site* is ``L{layer}.{component}``, for example ``L12.attn.z``. The same strings are
used in Python, the CLI, the atlas and URLs. ``attn.z`` (no layer) or ``L*.attn.z``
means the component at every layer. A head is ``L12.H3``; a neuron ``L12.N1031``.

A sparse dictionary attached to a site (``model.dictionaries.attach``, see
:mod:`lmatlas.model.dictionary_sites`) makes its latents sites too: ``L15.resid.post.F``
is the SAE's latent vector ``[batch, pos, latent]``, ``L15.resid.post.F123`` one latent;
a transcoder that replaces MLP 15 has ``L15.mlp.F`` and ``L15.mlp.F77``.

Shapes use ``batch``, ``pos`` (query position), ``key_pos``, ``head`` (query heads),
``kv_head`` and ``neuron``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from lmatlas.errors import SiteError
from lmatlas.model.arch import HeadLayout


@dataclass(frozen=True)
class Component:
    """What one component name means."""

    shape: str
    doc: str
    head_axis: str | None = None  # "head" or "kv_head" when the value is per head
    in_attention_fn: bool = False  # seen inside the registered attention function
    pos_axis: int = 1  # the axis that positions (``@...`` selectors) index
    key_positions: bool = False  # positions are key positions (the cache and this call), not query positions


#: The declarative table of site components.
COMPONENTS: dict[str, Component] = {
    "resid.pre": Component("[batch, pos, d_model]", "residual stream entering the block"),
    "resid.mid": Component("[batch, pos, d_model]", "residual stream after the attention write"),
    "resid.post": Component("[batch, pos, d_model]", "residual stream leaving the block"),
    "attn.q": Component(
        "[batch, pos, head, d_head]", "queries as the attention sees them (after rotary and q-norm)", "head", True
    ),
    "attn.k": Component(
        "[batch, key_pos, kv_head, d_head]",
        "keys as the attention sees them (after rotary and k-norm)",
        "kv_head",
        True,
        key_positions=True,
    ),
    "attn.v": Component(
        "[batch, key_pos, kv_head, d_head]", "values of each KV head", "kv_head", True, key_positions=True
    ),
    "attn.pattern": Component(
        "[batch, head, pos, key_pos]", "attention probabilities of each query head", "head", True, pos_axis=2
    ),
    "attn.z": Component("[batch, pos, head, d_head]", "each head's output before the output projection", "head"),
    "attn.out": Component(
        "[batch, pos, head, d_model]",
        "each head's own write to the residual stream, z_h @ W_O[h] (times any post-attention norm's scale)",
        "head",
    ),
    "mlp.in": Component(
        "[batch, pos, d_model]", "the MLP's input after its pre-norm (what its projections read; a transcoder's input)"
    ),
    "mlp.act": Component("[batch, pos, neuron]", "input of the down projection: one value per neuron"),
    "mlp.out": Component("[batch, pos, d_model]", "the MLP's write to the residual stream"),
}

#: Feature sites: the latents of a dictionary attached at a site (``L15.resid.post.F``), by the base they
#: splice into, and its error node (``L15.resid.post.E``: the site minus the reconstruction). ``mlp.F`` is
#: a transcoder's: it reads the MLP's normalised input and replaces ``mlp.out`` (``mlp.E``: the MLP's
#: write minus the transcoder's prediction).
_FEATURE_BASES = ("resid.pre", "resid.mid", "resid.post", "mlp.act", "mlp.out", "mlp")
FEATURE_COMPONENTS: dict[str, Component] = {
    f"{base}.F": Component("[batch, pos, latent]", f"latents of the sparse dictionary attached at {base}")
    for base in _FEATURE_BASES
}
FEATURE_COMPONENTS.update(
    {
        f"{base}.E": Component(
            "[batch, pos, neuron]" if base == "mlp.act" else "[batch, pos, d_model]",
            f"reconstruction error of the dictionary at {base}: what its latents do not explain",
        )
        for base in _FEATURE_BASES
    }
)

_SITE_RE = re.compile(r"^(?:L(?P<layer>\d+|\*)\.)?(?P<component>[a-z_]+\.[a-z_]+)$")
_FEATURE_RE = re.compile(
    r"^(?:L(?P<layer>\d+|\*)\.)?(?P<base>[a-z_]+(?:\.[a-z_]+)?)\.(?:F(?P<index>\d+)?|(?P<error>E))$"
)
_HEAD_RE = re.compile(r"^L(?P<layer>\d+)\.H(?P<index>\d+)$")
_NEURON_RE = re.compile(r"^L(?P<layer>\d+)\.N(?P<index>\d+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One site: a layer and a component, e.g. ``Site(12, "attn.z")`` is ``L12.attn.z``."""

    layer: int
    component: str

    def __str__(self) -> str:
        return f"L{self.layer}.{self.component}"

    @property
    def info(self) -> Component:
        return COMPONENTS.get(self.component) or FEATURE_COMPONENTS[self.component]

    @property
    def is_feature(self) -> bool:
        """A dictionary's latents (``L15.resid.post.F``), not a native site."""
        return self.component in FEATURE_COMPONENTS


def _unknown_component(name: str, component: str) -> SiteError:
    close = difflib.get_close_matches(component, COMPONENTS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return SiteError(
        f"Unknown site {name!r}.{hint} Sites are L<layer>.<component> with component one of: "
        f"{', '.join(COMPONENTS)} (for example 'L3.attn.z'; 'attn.z' alone means every layer)."
    )


def check_layer(layer: int, layout: HeadLayout, name: str = "") -> int:
    if not 0 <= layer < layout.n_layers:
        raise SiteError(
            f"Layer {layer} is out of range{f' in {name!r}' if name else ''}: "
            f"this model has layers 0..{layout.n_layers - 1}."
        )
    return layer


def parse_sites(name: str | Site, layout: HeadLayout) -> list[Site]:
    """Expand a site name into the sites it denotes, checking layer and component.

    >>> parse_sites("L1.attn.z", layout)          # doctest: +SKIP
    [Site(layer=1, component='attn.z')]
    >>> parse_sites("mlp.act", layout)            # every layer  # doctest: +SKIP
    """
    if isinstance(name, Site):
        name = str(name)
    if feature := parse_feature(name, layout):
        return [site for site, _ in feature]
    match = _SITE_RE.match(name.strip())
    if not match:
        raise SiteError(
            f"Malformed site name {name!r}: expected L<layer>.<component>, e.g. 'L3.attn.z' or 'L0.resid.pre'."
        )
    component = match["component"]
    if component not in COMPONENTS:
        raise _unknown_component(name, component)
    layer = match["layer"]
    if layer in (None, "*"):
        return [Site(i, component) for i in range(layout.n_layers)]
    return [Site(check_layer(int(layer), layout, name), component)]


def parse_feature(name: str, layout: HeadLayout) -> list[tuple[Site, int | None]] | None:
    """``"L15.resid.post.F123" -> [(Site(15, "resid.post.F"), 123)]`` (``None`` when ``name`` names no feature);
    ``"L15.resid.post.E"`` (the dictionary's error node) ``-> [(Site(15, "resid.post.E"), None)]``.

    Only the grammar and the layer are checked here; whether a dictionary is attached and the
    latent's range are checked by the model's registry (:mod:`lmatlas.model.dictionary_sites`).
    """
    match = _FEATURE_RE.match(name.strip())
    if not match:
        return None
    component = f"{match['base']}.{'E' if match['error'] else 'F'}"
    if component not in FEATURE_COMPONENTS:
        bases = ", ".join(_FEATURE_BASES)
        raise SiteError(
            f"{match['base']} cannot take a dictionary ({name!r}): features live at {bases} "
            "(an SAE on a residual stream or mlp.out, a transcoder at 'mlp'), e.g. 'L15.resid.post.F123'."
        )
    index = None if match["index"] is None else int(match["index"])
    layer = match["layer"]
    layers = range(layout.n_layers) if layer in (None, "*") else [check_layer(int(layer), layout, name)]
    return [(Site(i, component), index) for i in layers]


def check_head(layer: int, head: int, layout: HeadLayout, kv: bool = False) -> int:
    """Validate a head index (a query head, or a KV head when ``kv``)."""
    check_layer(layer, layout)
    count = layout.n_kv_heads if kv else layout.n_heads
    kind = "KV heads" if kv else "query heads"
    if not 0 <= head < count:
        raise SiteError(
            f"Head {head} is out of range at layer {layer}: this model has {count} {kind} (0..{count - 1})."
        )
    return head


def check_neuron(layer: int, neuron: int, layout: HeadLayout) -> int:
    check_layer(layer, layout)
    if not 0 <= neuron < layout.d_mlp:
        raise SiteError(
            f"Neuron {neuron} is out of range at layer {layer}: this model has {layout.d_mlp} neurons per layer."
        )
    return neuron


def parse_head(name: str, layout: HeadLayout) -> tuple[int, int]:
    """``"L12.H3" -> (12, 3)``, range-checked."""
    match = _HEAD_RE.match(name.strip())
    if not match:
        raise SiteError(f"Malformed head name {name!r}: expected L<layer>.H<head>, e.g. 'L12.H3'.")
    layer, head = int(match["layer"]), int(match["index"])
    return layer, check_head(layer, head, layout)


def parse_neuron(name: str, layout: HeadLayout) -> tuple[int, int]:
    """``"L12.N1031" -> (12, 1031)``, range-checked."""
    match = _NEURON_RE.match(name.strip())
    if not match:
        raise SiteError(f"Malformed neuron name {name!r}: expected L<layer>.N<neuron>, e.g. 'L12.N1031'.")
    layer, neuron = int(match["layer"]), int(match["index"])
    return layer, check_neuron(layer, neuron, layout)


def head_or_neuron(name: str, layout: HeadLayout) -> tuple[str, int, int] | None:
    """``"L12.H3" -> ("head", 12, 3)``, ``"L5.N7" -> ("neuron", 5, 7)`` (range-checked); ``None`` for anything else."""
    name = name.strip()
    if _HEAD_RE.match(name):
        return ("head", *parse_head(name, layout))
    if _NEURON_RE.match(name):
        return ("neuron", *parse_neuron(name, layout))
    return None


def head_name(layer: int, head: int) -> str:
    return f"L{layer}.H{head}"


def neuron_name(layer: int, neuron: int) -> str:
    return f"L{layer}.N{neuron}"
