"""Statistics for mean and resample ablation: per-site means and a bank of real activations.

Computed lazily, one site at a time, on corpus windows (the atlas's default corpus:
standard-library docstrings, offline and deterministic), and cached on the model
(``stats_for(model)`` returns the same object every time). With an atlas
(:func:`stats_from_atlas`), neuron means come from its ``neuron_stats`` table, which
the atlas measured on its own corpus; every other site falls back to the corpus.

A mean is over every (sequence, position) of the windows; the resample bank keeps
``BANK`` randomly chosen positions (seeded) and a resample ablation draws from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.errors import EditError
from lmatlas.model.provenance import check_made_for
from lmatlas.model.sites import Site

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

BANK = 512  #: activations kept per site for resample ablation
N_SEQUENCES, SEQ_LEN = 8, 64


class AblationStats:
    """Per-site means ``[*site_shape]`` and resample banks ``[BANK, *site_shape]`` of one model."""

    def __init__(self, model: "Model", input_ids: torch.Tensor, source: str):
        self.model, self.input_ids, self.source = model, input_ids, source
        self._means: dict[Site, torch.Tensor] = {}
        self._banks: dict[Site, torch.Tensor] = {}

    def _measure(self, site: Site) -> None:
        if site.component == "attn.pattern":
            raise EditError(
                f"Mean/resample ablation of {site} is not supported (a pattern's shape depends on the "
                "input): ablate the head's attn.z or attn.out instead."
            )
        with self.model.hook_stack.suspended():  # statistics of the unedited model
            value = self.model.run(self.input_ids, capture=[str(site)], stop_after=site.layer)[str(site)]
        flat = value.reshape(-1, *value.shape[2:]).float()  # [sequence * position, *site_shape]
        self._means.setdefault(site, flat.mean(0))  # an atlas's means, if given, are kept
        generator = torch.Generator().manual_seed(0)
        pick = torch.randperm(flat.shape[0], generator=generator)[:BANK]
        self._banks[site] = flat[pick.to(flat.device)]

    def _slice(self, tensor: torch.Tensor, index: int | None, kind: str, lead: int) -> torch.Tensor:
        if index is None:
            return tensor
        return tensor.select(lead + (0 if kind == "head" else tensor.dim() - lead - 1), index)

    def mean(self, site: Site, index: int | None = None, kind: str = "site") -> torch.Tensor:
        """The mean of ``site`` (of one head's or neuron's slice when ``index`` is given)."""
        if site not in self._means:
            self._measure(site)
        return self._slice(self._means[site], index, kind, 0)

    def resample(
        self, site: Site, index: int | None, kind: str, lead: tuple[int, int], generator: torch.Generator
    ) -> torch.Tensor:
        """``[batch, pos, *slice_shape]`` values drawn at random from the bank."""
        if site not in self._banks:
            self._measure(site)
        bank = self._slice(self._banks[site], index, kind, 1)
        rows = torch.randint(0, bank.shape[0], (lead[0] * lead[1],), generator=generator)
        return bank[rows.to(bank.device)].reshape(*lead, *bank.shape[1:])


def corpus_ids(model: "Model", texts: list[str] | None = None) -> torch.Tensor:
    """``[n, SEQ_LEN]`` token windows of ``texts`` (default: the atlas's default corpus)."""
    from lmatlas.corpus import corpus_windows, default_texts

    return corpus_windows(model, texts if texts is not None else default_texts(), N_SEQUENCES, SEQ_LEN)


def stats_for(model: "Model", texts: list[str] | None = None) -> AblationStats:
    """The model's corpus statistics, built once per model and text set (kept in ``model.memo``)."""
    cache = model.memo.setdefault(__name__, {})
    key = None if texts is None else hash(tuple(texts))
    if key not in cache:
        cache[key] = AblationStats(model, corpus_ids(model, texts), "default corpus" if texts is None else "texts")
    return cache[key]


def stats_from_atlas(atlas, model: "Model") -> AblationStats:
    """Statistics whose neuron means come from ``atlas`` (refused if the atlas maps another model)."""
    card = atlas.card()
    check_made_for(
        card,
        model,
        f"The atlas {getattr(atlas, 'path', '')}".rstrip(),
        EditError,
        "use the atlas built for this model.",
    )
    stats = AblationStats(model, corpus_ids(model), f"atlas {card.get('source')}")
    table = atlas.sql("SELECT layer, neuron, mean FROM neuron_stats ORDER BY layer, neuron").to_pydict()
    lay = model.layout
    for layer in sorted(set(table["layer"])):
        means = torch.zeros(lay.d_mlp)
        rows = [i for i, value in enumerate(table["layer"]) if value == layer]
        means[torch.tensor([table["neuron"][i] for i in rows])] = torch.tensor([table["mean"][i] for i in rows])
        stats._means[Site(layer, "mlp.act")] = means.to(model.device)
    return stats
