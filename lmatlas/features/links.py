"""Links of a dictionary's features to heads and neurons, from weights alone.

Every latent ``i`` of a dictionary writes its decoder row ``W_dec[i]``; its **direction** is that
row made unit length, ``d_i = W_dec[i] / |W_dec[i]|`` (``[n_latents, d_model]``). A feature is
linked to the parts of the model that write or read that direction:

* **writes (OV)** — head ``h`` of layer ``l`` (reading KV head ``kv``) writes ``x̂ @ W_V[kv] @ W_O[h]``
  (``x̂`` its normalised input; ``W_O`` times the post-attention norm's gain where the family
  has one). Along ``d_i`` that is ``x̂ · u``, ``u = g_attn ⊙ (W_V[kv] @ (W_O[h] ⊙ g_post) @ d_i)``
  (``g_attn`` the pre-attention norm's gain). The score is ``|u|``: the most the head's OV
  circuit can write along the feature per unit of normalised input.
* **reads (Q / K)** — the query (key) of head ``h`` reads ``x̂ @ W_Q[h]`` (``W_K[kv]``); a
  stream that holds ``d_i`` gives the head ``(g_attn ⊙ d_i) @ W_Q[h]`` (centred first for
  LayerNorm families). The score is its norm. Rotary, q/k norms and biases are left out, as
  in :mod:`lmatlas.decode.heads`.
* **aligns (neurons)** — the cosine of neuron ``n``'s output row ``W_out[n]`` (times the post-MLP
  norm's gain) with ``d_i``: signed, ranked by magnitude.

Writers are the heads and neurons whose writes reach the site the feature reads (layers up to
the feature's, before it for ``resid.pre``; an MLP does not write ``resid.mid`` of its own
layer); readers are the heads after it (from its own layer for ``resid.pre``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.model.norms import block_norm_gain
from lmatlas.model.sites import Site, head_name, neuron_name

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

RELATIONS = ("writes", "reads_q", "reads_k", "aligns")


def directions(W_dec: torch.Tensor) -> torch.Tensor:
    """``[n_latents, d_model]`` float32 unit decoder directions (a zero row stays zero)."""
    rows = W_dec.detach().float()
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def writer_layers(site: Site, n_layers: int, neurons: bool = False) -> list[int]:
    """Layers whose heads (``neurons``: MLPs) write into what feature site ``site`` reads."""
    base = site.component.removesuffix(".F")
    last = site.layer - 1 if base == "resid.pre" or (neurons and base == "resid.mid") else site.layer
    return list(range(0, min(last, n_layers - 1) + 1))


def reader_layers(site: Site, n_layers: int) -> list[int]:
    """Layers whose heads read what feature site ``site`` writes."""
    first = site.layer if site.component == "resid.pre.F" else site.layer + 1
    return list(range(first, n_layers))


def _attn_side(model: "Model", layer: int, d: torch.Tensor) -> torch.Tensor:
    """``d`` as the layer's attention sees a residual direction: centred (LayerNorm), times the pre-norm gain."""
    if model.spec.norm_kind.centres and model.spec.attn_norm is not None:
        d = d - d.mean(-1, keepdim=True)
    gain = block_norm_gain(model, layer, "attn_norm")
    return d if gain is None else d * gain


def ov_write_scores(model: "Model", d: torch.Tensor, layer: int) -> torch.Tensor:
    """``[n_latents, n_heads]``: ``|g_attn ⊙ (W_V[kv] @ (W_O[h] ⊙ g_post) @ d)|`` per head of ``layer``."""
    lay = model.layout
    W_O = model.W.W_O(layer).detach().float()  # [head, d_head, d_model]
    post = block_norm_gain(model, layer, "attn_post_norm")
    if post is not None:
        W_O = W_O * post
    W_V = model.W.W_V(layer).detach().float()  # [kv, d_model, d_head]
    gain = block_norm_gain(model, layer, "attn_norm")
    out = torch.empty(d.shape[0], lay.n_heads)
    for head in range(lay.n_heads):
        u = (d @ W_O[head].T) @ W_V[lay.kv_head(head)].T  # [n, d_model]
        out[:, head] = (u if gain is None else u * gain).norm(dim=-1)
    return out


def qk_read_scores(model: "Model", d: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n_latents, n_heads], [n_latents, n_heads])``: ``|(g_attn ⊙ d) @ W_Q[h]|`` and the same for ``W_K[kv(h)]``."""
    lay = model.layout
    x = _attn_side(model, layer, d)
    q = torch.einsum("nm,hmd->nhd", x, model.W.W_Q(layer).detach().float()).norm(dim=-1)
    k = torch.einsum("nm,hmd->nhd", x, model.W.W_K(layer).detach().float()).norm(dim=-1)
    return q, k[:, [lay.kv_head(h) for h in range(lay.n_heads)]]


def neuron_cosines(model: "Model", d: torch.Tensor, layer: int) -> torch.Tensor:
    """``[n_latents, d_mlp]`` cosine of each neuron's output row (times the post-MLP gain) with ``d``."""
    rows = model.W.W_out(layer).detach().float()  # [d_mlp, d_model]
    post = block_norm_gain(model, layer, "mlp_post_norm")
    if post is not None:
        rows = rows * post
    return d @ (rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T


@dataclass(frozen=True)
class Link:
    """One link: ``relation`` of feature ``feature`` to ``unit`` (``L3.H1`` / ``L2.N5``) with ``score``."""

    feature: int
    relation: str
    rank: int
    unit: str
    layer: int
    index: int
    score: float


def _top(scores: torch.Tensor, layers: list[int], width: int, n: int, by_magnitude: bool) -> tuple:
    """Top ``n`` of ``scores [n_latents, len(layers) * width]``: (values, layer, index) each ``[n_latents, n]``."""
    n = min(n, scores.shape[1])
    key = scores.abs() if by_magnitude else scores
    picked = key.topk(n, dim=-1).indices
    values = scores.gather(-1, picked)
    layer = torch.tensor(layers)[picked // width]
    return values, layer, picked % width


def _scores(model: "Model", site: Site, d: torch.Tensor) -> dict[str, tuple[list[int], int, torch.Tensor]]:
    """``relation -> (layers, units per layer, scores [n, len(layers) * units])`` for directions ``d [n, d_model]``."""
    lay = model.layout
    writers, readers = writer_layers(site, lay.n_layers), reader_layers(site, lay.n_layers)
    mlps = writer_layers(site, lay.n_layers, neurons=True)
    out = {}
    if writers:
        out["writes"] = (writers, lay.n_heads, torch.cat([ov_write_scores(model, d, l).cpu() for l in writers], 1))
    if readers:
        qk = [qk_read_scores(model, d, l) for l in readers]
        out["reads_q"] = (readers, lay.n_heads, torch.cat([q.cpu() for q, _ in qk], 1))
        out["reads_k"] = (readers, lay.n_heads, torch.cat([k.cpu() for _, k in qk], 1))
    if mlps:
        out["aligns"] = (mlps, lay.d_mlp, torch.cat([neuron_cosines(model, d, l).cpu() for l in mlps], 1))
    return out


def feature_links(model: "Model", site: Site, W_dec: torch.Tensor, top: int = 8, chunk: int = 1024) -> list[Link]:
    """The top ``top`` links of every latent of the dictionary at feature site ``site`` (module docstring).

    Latents go ``chunk`` at a time (the neuron scores of one chunk are ``[chunk, layers * d_mlp]``).
    """
    d_all = directions(W_dec).to(model.W.W_O(0).device)
    links: list[Link] = []
    with torch.no_grad():
        for start in range(0, d_all.shape[0], chunk):
            for relation, (layers, width, scores) in _scores(model, site, d_all[start : start + chunk]).items():
                values, layer, index = _top(scores, layers, width, top, by_magnitude=relation == "aligns")
                name = neuron_name if relation == "aligns" else head_name
                values, layer, index = values.tolist(), layer.tolist(), index.tolist()
                for row in range(len(values)):
                    for rank, (v, l, i) in enumerate(zip(values[row], layer[row], index[row])):
                        links.append(Link(start + row, relation, rank, name(l, i), l, i, v))
    return links


def links_table(site: Site, links: list[Link]) -> list[dict[str, Any]]:
    """Rows of the atlas's ``feature_links`` table."""
    return [
        {
            "site": str(site),
            "feature": link.feature,
            "relation": link.relation,
            "rank": link.rank,
            "unit": link.unit,
            "unit_layer": link.layer,
            "unit_index": link.index,
            "score": link.score,
        }
        for link in links
    ]
