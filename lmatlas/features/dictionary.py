"""Sparse dictionaries: a TopK sparse autoencoder and a skip-transcoder, with the card they carry.

Both are plain ``torch.nn.Module`` values with the same small interface (shapes in brackets)::

    latents = d.encode(x)            # [..., d_in] -> [..., n_latents]: ReLU, then the top k kept, others 0
    values, indices = d.encode_topk(x)   # [..., k] each: the same latents, sparse
    out = d.decode(latents)          # [..., n_latents] -> [..., d_out]: latents @ W_dec + b_dec
    out, latents = d(x)              # forward: reconstruction (plus the skip for a transcoder) and latents

* :class:`TopKSAE` reads and writes one site (``L15.resid.post``): ``encode`` sees
  ``x - b_dec`` (``subtract_b_dec``, the sparsify and SAELens convention), ``W_dec`` rows
  have unit norm.
* :class:`SkipTranscoder` reads an MLP's normalised input (``L15.mlp.in``) and predicts its
  output (``L15.mlp.out``): ``forward(x) = decode(encode(x)) + x @ W_skip``; ``b_dec`` is the
  affine skip's bias.

Weights: ``W_enc [d_in, n_latents]``, ``b_enc [n_latents]``, ``W_dec [n_latents, d_out]``,
``b_dec [d_out]``, ``W_skip [d_in, d_out]`` (transcoder). A dictionary carries a
:class:`DictionaryCard`: the model it was trained on (:func:`lmatlas.model.provenance.identity`),
the site(s), sizes, training configuration and seed. :func:`check_fits` refuses it for
another model or a site of another width.

Sites that can take a dictionary (one vector per position): ``resid.pre``, ``resid.mid``,
``resid.post``, ``mlp.out``, ``mlp.act`` and ``mlp.in`` (the MLP's normalised input, the input
of a transcoder). Attention sites (per head, or per key position) cannot.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

from lmatlas.errors import DictionaryError
from lmatlas.features.sparse import sparse_decode

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

#: Components that can take a dictionary, and which model width each has.
DICTIONARY_COMPONENTS: dict[str, str] = {
    "resid.pre": "d_model",
    "resid.mid": "d_model",
    "resid.post": "d_model",
    "mlp.in": "d_model",
    "mlp.out": "d_model",
    "mlp.act": "d_mlp",
}
_SITE = re.compile(r"^L(?P<layer>\d+)\.(?P<component>[a-z_]+\.[a-z_]+)$")


@dataclass(frozen=True)
class DictionaryCard:
    """What a dictionary is and where it belongs.

    Attributes:
        kind: ``"sae"`` or ``"transcoder"``.
        site: the site the dictionary reads (``"L15.resid.post"``; a transcoder's input, ``"L15.mlp.in"``).
        out_site: the site it writes (the same as ``site`` for an SAE; ``"L15.mlp.out"`` for a transcoder).
        d_in, d_out, n_latents, k: sizes.
        model: the identity of the model it was trained on (:func:`lmatlas.model.provenance.identity`);
            empty for a file trained elsewhere that records none.
        training: the training configuration and results (tokens, steps, metrics).
        seed: the seed it was trained with (``None`` if unknown).
    """

    kind: str
    site: str
    d_in: int
    n_latents: int
    k: int
    d_out: int | None = None
    out_site: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self):
        if self.kind not in ("sae", "transcoder"):
            raise DictionaryError(f"A dictionary's kind is 'sae' or 'transcoder', not {self.kind!r}.")
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_in)
        if self.out_site is None:
            object.__setattr__(
                self, "out_site", transcoder_output(self.site) if self.kind == "transcoder" else self.site
            )
        check_sizes(self.n_latents, self.k)

    @property
    def layer(self) -> int:
        return split_site(self.site)[0]

    @property
    def feature_prefix(self) -> str:
        """What feature names start with: ``L15.resid.post`` (``L15.resid.post.F123``), ``L15.mlp`` for a transcoder."""
        return f"L{self.layer}.mlp" if self.kind == "transcoder" else self.site

    def feature_name(self, index: int) -> str:
        return f"{self.feature_prefix}.F{index}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DictionaryCard":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})

    def replace(self, **changes: Any) -> "DictionaryCard":
        return DictionaryCard.from_dict({**self.to_dict(), **changes})


def check_sizes(n_latents: int, k: int) -> None:
    """``0 < k < n_latents``, before any compute."""
    if n_latents < 1:
        raise DictionaryError(f"A dictionary needs at least one latent, got {n_latents}.")
    if not 0 < k < n_latents:
        raise DictionaryError(
            f"k={k} must lie in 1..{n_latents - 1}: a TopK dictionary keeps k of its {n_latents} latents "
            "per token (k >= latents would keep them all)."
        )


def split_site(name: str) -> tuple[int, str]:
    """``"L15.resid.post" -> (15, "resid.post")``; refuses sites that cannot take a dictionary."""
    match = _SITE.match(str(name).strip())
    if not match:
        raise DictionaryError(
            f"{name!r} is not a site a dictionary can take: expected L<layer>.<component>, e.g. 'L15.resid.post' "
            f"(components: {', '.join(DICTIONARY_COMPONENTS)})."
        )
    component = match["component"]
    if component not in DICTIONARY_COMPONENTS:
        raise DictionaryError(
            f"{name} cannot take a dictionary: a dictionary reads one vector per position, at one of "
            f"{', '.join(DICTIONARY_COMPONENTS)} (attention sites hold one vector per head or per key)."
        )
    return int(match["layer"]), component


def transcoder_output(site: str) -> str:
    """The output site of a transcoder that reads ``site`` (``L15.mlp.in`` -> ``L15.mlp.out``)."""
    layer, component = split_site(site)
    if component != "mlp.in":
        raise DictionaryError(
            f"A transcoder reads an MLP's normalised input (L{layer}.mlp.in) and predicts its output "
            f"(L{layer}.mlp.out); {site} is not an MLP input."
        )
    return f"L{layer}.mlp.out"


def site_width(model: "Model", site: str) -> int:
    """The width of ``site`` in ``model`` (checks the layer and the component)."""
    layer, component = split_site(site)
    if not 0 <= layer < model.layout.n_layers:
        raise DictionaryError(
            f"Layer {layer} of {site} is out of range: this model has layers 0..{model.layout.n_layers - 1}."
        )
    return int(getattr(model.layout, DICTIONARY_COMPONENTS[component]))


class _Dictionary(nn.Module):
    """What a TopK SAE and a skip-transcoder share: a top-k encoder and a unit-norm decoder."""

    card: DictionaryCard

    def __init__(self, card: DictionaryCard, subtract_b_dec: bool):
        super().__init__()
        self.card = card
        self.k = card.k
        self.subtract_b_dec = subtract_b_dec
        d_in, d_out, n = card.d_in, card.d_out, card.n_latents
        self.W_enc = nn.Parameter(torch.zeros(d_in, n))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.zeros(n, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))

    # sizes
    @property
    def d_in(self) -> int:
        return self.card.d_in

    @property
    def d_out(self) -> int:
        return self.card.d_out

    @property
    def n_latents(self) -> int:
        return self.card.n_latents

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder's matmul sees: ``x - b_dec`` for an SAE, ``x`` for a transcoder."""
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.subtract_b_dec else x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n_latents]`` before ReLU and top-k."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [..., k], indices [..., k])`` of the kept latents (ReLU'd; a value may be 0)."""
        self._check_width(x, self.d_in, "input")
        values, indices = self.pre_activations(x).topk(self.k, dim=-1, sorted=False)
        return values.relu(), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in] -> [..., n_latents]``: ReLU, then the top k kept, every other latent 0."""
        values, indices = self.encode_topk(x)
        return torch.zeros(*values.shape[:-1], self.n_latents, dtype=values.dtype, device=values.device).scatter_(
            -1, indices, values
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[..., n_latents] -> [..., d_out]``: ``latents @ W_dec + b_dec``."""
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_topk(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``decode`` from the sparse form (only the k selected rows are read, with a sparse backward)."""
        return sparse_decode(values, indices, self.W_dec) + self.b_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Give every ``W_dec`` row unit norm (done after each training step)."""
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norms + torch.finfo(self.W_dec.dtype).eps)

    def _check_width(self, x: torch.Tensor, width: int, what: str) -> None:
        if x.shape[-1] != width:
            raise DictionaryError(
                f"The dictionary's {what} is {width} wide ({self.card.site}), but the activations are "
                f"{x.shape[-1]} wide: it was made for another site or model."
            )

    def extra_repr(self) -> str:
        c = self.card
        return f"{c.kind} {c.site}{'->' + c.out_site if c.out_site != c.site else ''}: {c.d_in}->{c.n_latents} (k={c.k})->{c.d_out}"


class TopKSAE(_Dictionary):
    """A TopK sparse autoencoder (Gao et al. 2024): ``x ~ decode(topk(relu((x - b_dec) @ W_enc + b_enc)))``.

    ``TopKSAE(d_in, n_latents, k, card=None)``; without a card one is made with site ``"?"``.
    """

    def __init__(
        self, d_in: int, n_latents: int, k: int, card: DictionaryCard | None = None, subtract_b_dec: bool = True
    ):
        check_sizes(n_latents, k)
        if card is None:
            card = DictionaryCard("sae", "L0.resid.post", d_in, n_latents, k, training={"site_unknown": True})
        if (card.kind, card.d_in, card.d_out, card.n_latents, card.k) != ("sae", d_in, d_in, n_latents, k):
            raise DictionaryError(f"The card {card} does not describe a TopK SAE {d_in}->{n_latents} (k={k}).")
        super().__init__(card, subtract_b_dec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction [..., d_in], latents [..., n_latents])``."""
        latents = self.encode(x)
        return self.decode(latents), latents


class SkipTranscoder(_Dictionary):
    """A skip-transcoder: an MLP's normalised input ``x`` -> its output, ``decode(encode(x)) + x @ W_skip``.

    ``SkipTranscoder(d_in, d_out, n_latents, k, card=None)``.
    """

    def __init__(self, d_in: int, d_out: int, n_latents: int, k: int, card: DictionaryCard | None = None):
        check_sizes(n_latents, k)
        if card is None:
            card = DictionaryCard(
                "transcoder", "L0.mlp.in", d_in, n_latents, k, d_out=d_out, training={"site_unknown": True}
            )
        if (card.kind, card.d_in, card.d_out, card.n_latents, card.k) != ("transcoder", d_in, d_out, n_latents, k):
            raise DictionaryError(
                f"The card {card} does not describe a skip-transcoder {d_in}->{n_latents} (k={k})->{d_out}."
            )
        super().__init__(card, subtract_b_dec=False)
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The affine skip's linear part, ``x @ W_skip`` (``decode`` adds the bias ``b_dec``)."""
        return x.to(self.W_skip.dtype) @ self.W_skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predicted MLP output [..., d_out], latents [..., n_latents])``."""
        latents = self.encode(x)
        return self.decode(latents) + self.skip(x), latents


Dictionary = Union[TopKSAE, SkipTranscoder]


def build(card: DictionaryCard) -> Dictionary:
    """An empty (zero) dictionary of the card's kind and sizes."""
    if card.kind == "sae":
        return TopKSAE(card.d_in, card.n_latents, card.k, card=card)
    return SkipTranscoder(card.d_in, card.d_out, card.n_latents, card.k, card=card)


def check_fits(dictionary: Dictionary, model: "Model", site: str | None = None) -> None:
    """Refuse ``dictionary`` for another model (its recorded identity) or a site it was not made for.

    ``site`` (optional) is where the caller means to use it: it must be the card's site. The
    widths of the card's sites must match the model's.
    """
    from lmatlas.model.provenance import check_made_for

    card = dictionary.card
    if site is not None and str(site) != card.site and str(site) != card.out_site:
        raise DictionaryError(
            f"This dictionary was made for {card.site}"
            f"{' -> ' + card.out_site if card.out_site != card.site else ''}, not {site}: "
            "a dictionary only reads the site it was trained on (train one for this site with `lmatlas features train`)."
        )
    if card.model:
        check_made_for(
            card.model,
            model,
            f"The dictionary for {card.site}",
            DictionaryError,
            "train a dictionary for this model with `lmatlas features train`, or load the model it records.",
        )
    for name, width in ((card.site, card.d_in), (card.out_site, card.d_out)):
        expected = site_width(model, name)
        if expected != width:
            raise DictionaryError(
                f"The dictionary is {width} wide at {name}, but this model's {name} is {expected} wide: "
                "it was made for another model."
            )
