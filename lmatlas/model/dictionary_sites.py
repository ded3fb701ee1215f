"""Dictionary sites: a sparse dictionary attached at a site makes its latents sites of the model.

A *dictionary* (an SAE or a skip-transcoder, :mod:`lmatlas.features`) maps a vector
``x [..., d_in]`` to latents ``f = encode(x) [..., n_latents]`` and back ``decode(f) [..., d_out]``.
The model layer needs nothing more than the :class:`SiteDictionary` protocol, so features can
be captured and edited by every layer above the model (edits, patching, generation) while the
dictionaries themselves live in :mod:`lmatlas.features`.

The model learns which dictionary belongs to a site through its registry,
``model.dictionaries`` (:class:`DictionaryRegistry`)::

    model.dictionaries.attach(sae, "L15.resid.post")     # an SAE: L15.resid.post.F is its latents
    model.dictionaries.attach(transcoder, "L15.mlp")     # a transcoder: L15.mlp.F replaces MLP 15
    cache = model.run("text", capture=["L15.resid.post.F"])     # [batch, pos, latent]
    cache["L15.resid.post.F123"]                                 # [batch, pos], one latent

**The splice.** Where a feature site is hooked, the base value ``x`` (``resid.post`` for an SAE
there; ``mlp.out`` for a transcoder, whose latents are encoded from the MLP's normalised input
``u``) becomes::

    f  = encode(x)                      (transcoder: encode(u))
    f' = the feature site's replacements applied to f (edits), then captured
    x' = x + (decode(f') - decode(f))   = decode(f') + error,  error = x - decode(f)

so an unedited splice (``f' is f``) returns ``x`` itself, bit for bit: the reconstruction error
is kept and the dictionary changes nothing until a latent is edited. A transcoder's affine skip
cancels in the difference. With gradients on, the value is the same and autograd sees
``x + decode(f')``: the upstream gradient passes the splice unchanged (identity), and the
latents (a leaf computed from the detached input) get ``d loss / d f = W_dec · d loss / d x'`` —
the gradient of adding along each decoder direction, which is what attribution needs.

**Replace mode.** ``attach(transcoder, "L15.mlp", mode="replace")`` makes the dictionary stand
in for what it reads from, gradients included: the written value is::

    x' = decode(f') + skip(u) + error,   error = x - decode(f) - skip(u)   (a constant)

(``error=False``: no error, the MLP output *is* the transcoder's prediction). The value is the
same as the splice's (unedited: ``x`` bit for bit), but autograd sees ``decode(f') + skip(u)``
with ``f = encode(u)`` on the graph: upstream gradients flow through the latents (TopK keeps
the selected ones, ReLU) and the skip, never through the MLP, whose output enters only the
constant error. This is the replacement model that attribution through transcoders uses
(:mod:`lmatlas.model.dictionary_replace`). An SAE can be attached this way too (no skip).

Errors come before any compute: a width that does not match the site, a site that cannot take
a dictionary, a latent out of range (the valid range is named), a feature site with nothing
attached (the message says how to attach).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch

from lmatlas.errors import SiteError
from lmatlas.model.arch import HeadLayout
from lmatlas.model.dictionary_replace import replace_write
from lmatlas.model.sites import FEATURE_COMPONENTS, Site, check_layer, parse_feature

#: What each feature component reads (its encoder input) and writes (the site it splices into).
READS = {"resid.pre.F": "resid.pre", "resid.mid.F": "resid.mid", "resid.post.F": "resid.post"}
READS.update({"mlp.act.F": "mlp.act", "mlp.out.F": "mlp.out", "mlp.F": "mlp.in"})
WRITES = {component: base.replace("mlp.in", "mlp.out") for component, base in READS.items()}


@runtime_checkable
class SiteDictionary(Protocol):
    """What the model needs of a dictionary: its number of latents, ``encode`` and ``decode``.

    ``encode(x [..., d_in]) -> [..., n_latents]``; ``decode(f [..., n_latents]) -> [..., d_out]``,
    affine in ``f`` (a transcoder's skip term, which depends on its input, is left out of it).
    """

    n_latents: int

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, f: torch.Tensor) -> torch.Tensor: ...


def _width(dictionary: Any, side: str) -> int | None:
    """``d_in``/``d_out`` of a dictionary: the attribute if it has one, else its weights' shape."""
    value = getattr(dictionary, side, None)
    if value is not None:
        return int(value)
    if side == "d_in" and getattr(dictionary, "W_enc", None) is not None:
        weight = dictionary.W_enc  # [d_in, n_latents]
        return int(weight.shape[0])
    if getattr(dictionary, "W_dec", None) is not None:
        return int(dictionary.W_dec.shape[-1])  # [n_latents, d_out]
    return None


@dataclass(frozen=True)
class Attached:
    """One dictionary at one feature site: ``site`` (``L15.resid.post.F``), what it reads and writes."""

    site: Site
    dictionary: Any
    mode: str = "splice"  # or "replace": gradients through the dictionary (module docstring)
    keep_error: bool = True  # replace mode: add the constant error (False: the reconstruction alone)

    @property
    def reads(self) -> Site:
        return Site(self.site.layer, READS[self.site.component])

    @property
    def writes(self) -> Site:
        return Site(self.site.layer, WRITES[self.site.component])

    @property
    def n_latents(self) -> int:
        return int(self.dictionary.n_latents)

    @property
    def transcoder(self) -> bool:
        return self.site.component == "mlp.F"

    @property
    def error_site(self) -> Site:
        """The error node ``L15.resid.post.E``: the written value minus the dictionary's reconstruction."""
        return Site(self.site.layer, self.site.component.removesuffix("F") + "E")


def feature_site(base: str, layout: HeadLayout) -> Site:
    """``"L15.resid.post" -> Site(15, "resid.post.F")``; ``"L15.mlp"`` (a transcoder) ``-> Site(15, "mlp.F")``."""
    text = base.strip().removesuffix(".F")
    if "." not in text:
        raise SiteError(
            f"Name the site of a dictionary with its layer, e.g. 'L15.resid.post' or 'L15.mlp', got {base!r}."
        )
    head, _, rest = text.partition(".")
    if not (head.startswith("L") and head[1:].isdigit()):
        raise SiteError(
            f"Name the site of a dictionary with its layer, e.g. 'L15.resid.post' or 'L15.mlp', got {base!r}."
        )
    check_layer(int(head[1:]), layout, base)
    (site, _), *_ = parse_feature(f"{text}.F", layout)
    return site


class DictionaryRegistry:
    """The dictionaries attached to one model (``model.dictionaries``), one per feature site.

    Attaching checks the dictionary's width against the site; every feature site or target is
    checked against what is attached before a forward runs.
    """

    def __init__(self, layout: HeadLayout):
        self.layout = layout
        self._attached: dict[Site, Attached] = {}

    def attach(self, dictionary: Any, site: str | None = None, *, mode: str = "splice", error: bool = True) -> str:
        """Attach ``dictionary`` at ``site`` (default: the site its card records); returns the feature site name.

        ``site`` is the base: ``"L15.resid.post"`` for an SAE, ``"L15.mlp"`` for a transcoder.
        ``mode="splice"`` (the default) edits through the dictionary and leaves gradients to the
        model; ``mode="replace"`` makes it replace what it reads, gradients included, and
        ``error=False`` (replace mode only) drops the error term (see the module docstring).
        Attach before entering a hook session that uses it (sessions read the registry when they start).
        """
        from lmatlas.errors import DictionaryError

        if mode not in ("splice", "replace"):
            raise DictionaryError(f"A dictionary is attached in mode 'splice' or 'replace', not {mode!r}.")
        if not error and mode != "replace":
            raise DictionaryError("error=False drops the error term of a replacement: pass mode='replace' with it.")
        site = site if site is not None else _recorded_site(dictionary)
        feature = feature_site(site, self.layout)
        if not isinstance(dictionary, SiteDictionary):
            raise DictionaryError(
                f"{type(dictionary).__name__} is not a dictionary: it needs n_latents, encode(x) and decode(f)."
            )
        entry = Attached(feature, dictionary, mode, error)
        lay = self.layout
        want = lay.d_mlp if feature.component == "mlp.act.F" else lay.d_model
        for side in ("d_in", "d_out"):
            got = _width(dictionary, side)
            if got is not None and got != want:
                raise DictionaryError(
                    f"The dictionary's {side} is {got}, but {entry.reads if side == 'd_in' else entry.writes} "
                    f"of this model has width {want}: it was trained for another model or site."
                )
        self._attached[feature] = entry
        return str(feature)

    def detach(self, site: str | Site) -> None:
        """Remove the dictionary at ``site`` (``"L15.resid.post"`` or ``"L15.resid.post.F"``)."""
        feature = site if isinstance(site, Site) else feature_site(str(site), self.layout)
        self._attached.pop(feature, None)

    @contextmanager
    def attached(self, dictionary: Any, site: str | None = None, **how: Any) -> Iterator[str]:
        """``with model.dictionaries.attached(sae, "L3.resid.post") as name:`` attach for one block only."""
        name = self.attach(dictionary, site, **how)
        try:
            yield name
        finally:
            self.detach(name)

    def __contains__(self, site: object) -> bool:
        return site in self._attached

    def __iter__(self) -> Iterator[Attached]:
        return iter(sorted(self._attached.values(), key=lambda entry: entry.site))

    def __len__(self) -> int:
        return len(self._attached)

    def get(self, site: Site) -> Attached:
        """The dictionary at feature site ``site`` (or its error node); a :class:`SiteError` that says how to attach one."""
        site = Site(site.layer, site.component[:-1] + "F")  # an error node belongs to its latents' dictionary
        entry = self._attached.get(site)
        if entry is None:
            base = "L{}.{}".format(site.layer, site.component.removesuffix(".F"))
            have = ", ".join(str(e.site) for e in self) or "none"
            raise SiteError(
                f"No dictionary is attached at {base}, so {site} has no latents (attached: {have}). "
                f"Attach one first: model.dictionaries.attach(dictionary, {base!r}) "
                "(e.g. a dictionary from lmatlas.features), or `--features FILE` on the command line."
            )
        return entry

    def check(self, site: Site, index: int | None = None) -> Attached:
        """Check a feature site (and latent ``index``) against what is attached."""
        entry = self.get(site)
        if index is not None and not 0 <= index < entry.n_latents:
            raise SiteError(
                f"Feature {index} is out of range at {site}: the dictionary attached there has "
                f"{entry.n_latents} latents (F0..F{entry.n_latents - 1})."
            )
        return entry

    def check_name(self, name: str) -> None:
        """Check every feature a site or target name mentions (nothing for non-feature names)."""
        for site, index in parse_feature(name.partition("@")[0], self.layout) or ():
            self.check(site, index)


def _recorded_site(dictionary: Any) -> str:
    """The base a dictionary's card records: its site for an SAE, ``L15.mlp`` for a transcoder (``L15.mlp.in``)."""
    card = getattr(dictionary, "card", None)
    site = str(getattr(card, "site", None) or getattr(dictionary, "site", None) or "")
    if not site or site == "?":
        raise SiteError("This dictionary records no site: pass one, e.g. attach(dictionary, 'L15.resid.post').")
    if getattr(card, "kind", None) == "transcoder" or site.endswith(".mlp.in"):
        return site.removesuffix(".in")
    return site


def encode_input(entry: Attached, x: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, latent]`` latents of ``x`` (detached under autograd: the latents are a leaf of the graph)."""
    grad = torch.is_grad_enabled()
    weight = getattr(entry.dictionary, "W_dec", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else x.dtype
    f = entry.dictionary.encode((x.detach() if grad else x).to(dtype))
    return f.detach().requires_grad_(True) if grad and f.is_floating_point() else f


def error_term(entry: Attached, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, d]`` the error node ``x - decode(f)`` (under autograd: on the path from ``x``, identity)."""
    with torch.no_grad():
        reconstruction = entry.dictionary.decode(f).to(x.dtype)
    return x - reconstruction


def splice(
    entry: Attached,
    x: torch.Tensor,
    f: torch.Tensor,
    used: torch.Tensor | None,
    error: torch.Tensor | None = None,
    new_error: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``x + decode(used) - decode(f)``, or ``decode(used) + new_error`` when the error node was replaced.

    ``x [batch, pos, d_model]`` is the written value, ``f`` the latents, ``used`` the latents after
    edits (``None``: unedited), ``error`` the error node when it is hooked (:func:`error_term`) and
    ``new_error`` its replacement (``None``: unchanged). ``None`` when nothing changed and no gradient
    is wanted. With gradients on, the value is the same and the graph is ``x + decode(used)``
    (``error + decode(used)`` when the error node is hooked; see the module docstring).
    """
    grad = torch.is_grad_enabled()
    if used is None and new_error is None and not grad:
        return None
    used = f if used is None else used
    decode = entry.dictionary.decode
    with torch.no_grad():
        if new_error is not None:
            value = decode(used).to(x.dtype) + new_error
        else:
            value = x if used is f else x + (decode(used) - decode(f)).to(x.dtype)
    if not grad:
        return value
    path = decode(used).to(x.dtype)
    rest = x if error is None else (error if new_error is None else new_error)
    return value.detach() + (rest - rest.detach()) + (path - path.detach())


def write(
    entry: Attached,
    x: torch.Tensor,
    source: torch.Tensor,
    where: torch.Tensor,
    apply: Callable[[Site, torch.Tensor, torch.Tensor], torch.Tensor | None],
    error_hooked: bool,
) -> torch.Tensor | None:
    """The new value of the written site ``x [batch, pos, d]`` (``None``: unchanged), in the entry's mode.

    ``source`` is what the dictionary reads (``x`` itself for an SAE, the MLP's input for a
    transcoder), ``apply(site, value, where)`` runs the feature site's edits and captures (the
    hook stack's dispatch) and ``error_hooked`` says whether the error node is a site of the call.
    """
    if entry.mode == "replace":
        return replace_write(entry, x, source, where, apply, error_hooked)
    f = encode_input(entry, source)
    used, error, new_error = apply(entry.site, f, where), None, None
    if error_hooked:  # the error node: x - decode(f)
        error = error_term(entry, x, f)
        new_error = apply(entry.error_site, error, where)
    return splice(entry, x, f, used, error, new_error)


__all__ = ["SiteDictionary", "DictionaryRegistry", "Attached", "FEATURE_COMPONENTS", "feature_site"]
