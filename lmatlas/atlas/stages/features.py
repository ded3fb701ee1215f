"""Stage ``features``: every latent of every attached dictionary, joined with heads and neurons.

Off by default: it runs for the dictionaries attached to the model (``model.dictionaries``;
``lmatlas map --features FILE...`` loads and attaches them), one unit per dictionary
(``features/L15.resid.post.F``), so an interrupted build resumes dictionary by dictionary.
Per latent:

* ``features``: its decoded tokens (:func:`lmatlas.features.sites.decoded_tokens`: ``W_dec``
  through the final norm's gain and the unembedding, the exact pruned top-k the neurons use),
  its density over the corpus (fraction of positions above 0) and its maximum;
* ``feature_contexts``: its ``top_contexts`` strongest corpus positions, each with the span's
  token strings and per-token ``levels`` (``round(127 * act / max)``, as ``neuron_contexts``);
* ``feature_links``: the heads whose OV writes its decoder direction most, whose queries and
  keys read it most, and the neurons whose output rows align with it
  (:mod:`lmatlas.features.links`), each named as the heads and neurons tables name them
  (``unit``, ``unit_layer``, ``unit_index``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.atlas.stages import BuildContext, Stage, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

TOP_LINKS = 8


def _plan(model: "Model", ctx: BuildContext) -> list[str]:
    return [f"features/{entry.site}" for entry in model.dictionaries]


def _entry(model: "Model", unit: str):
    from lmatlas.model.sites import parse_sites

    (site,) = parse_sites(unit.removeprefix("features/"), model.layout)
    return model.dictionaries.get(site)


def _feature_rows(model: "Model", entry, acts, rows, k: int) -> list[dict]:
    from lmatlas.decode.token_text import token_texts
    from lmatlas.features.sites import decoded_tokens

    decoded = decoded_tokens(model, rows, k)
    kind = "transcoder" if entry.transcoder else "sae"
    out = []
    sides = {"promoted": decoded.top, "suppressed": decoded.bottom}
    lists = {name: (side.ids.tolist(), side.logits.tolist()) for name, side in sides.items()}
    for i in range(entry.n_latents):
        row = {
            "site": str(entry.site),
            "feature": i,
            "name": f"{entry.site}{i}",
            "layer": entry.site.layer,
            "kind": kind,
            "n_latents": entry.n_latents,
            "density": float(acts.density[i]),
            "max": float(acts.max[i]),
        }
        for name, (ids, logits) in lists.items():
            row[name] = token_texts(model.tokenizer, ids[i])
            row[f"{name}_ids"] = ids[i]
            row[f"{name}_logits"] = [float(v) for v in logits[i]]
        out.append(row)
    return out


def _context_rows(model: "Model", entry, acts, corpus) -> list[dict]:
    from lmatlas.decode.token_text import token_texts
    from lmatlas.features.sites import CONTEXT_BEFORE

    seq_len = acts.seq_len
    scale = acts.max.clamp_min(1e-12)
    levels = (acts.spans / scale[None, :, None] * 127).round().tolist()  # NaN outside the window
    top_index, top_values = acts.top_index.tolist(), acts.top_values.tolist()
    ids = corpus.tolist()
    out = []
    for i in range(entry.n_latents):
        for rank in range(len(top_index)):
            if top_values[rank][i] <= 0:
                break  # a latent that never fires has no contexts
            window, pos = divmod(top_index[rank][i], seq_len)
            start = max(0, pos - CONTEXT_BEFORE)
            span = [int(v) for v in levels[rank][i] if v == v]
            out.append(
                {
                    "site": str(entry.site),
                    "feature": i,
                    "rank": rank,
                    "window_id": window,
                    "pos": pos,
                    "start": start,
                    "activation": top_values[rank][i],
                    "tokens": token_texts(model.tokenizer, ids[window][start : start + len(span)]),
                    "levels": span,
                }
            )
    return out


def compute(model: "Model", unit: str, ctx: BuildContext):
    from lmatlas.features.links import feature_links, links_table
    from lmatlas.features.sites import corpus_activations, decoder_rows

    entry = _entry(model, unit)
    params = ctx.params
    acts = corpus_activations(model, entry, ctx.corpus, params.batch, params.top_contexts)
    rows = decoder_rows(entry)
    links = feature_links(model, entry.site, rows, top=params.feature_links)
    return {
        "features": _feature_rows(model, entry, acts, rows, params.top_k),
        "feature_contexts": _context_rows(model, entry, acts, ctx.corpus),
        "feature_links": links_table(entry.site, links),
    }


stage(
    Stage(
        name="features",
        description="each latent of the attached dictionaries: decoded tokens, top corpus contexts, density, "
        "and the heads and neurons that write, read or align with it (needs --features)",
        plan=_plan,
        compute=compute,
        default=lambda model: model is not None and len(model.dictionaries) > 0,
    )
)
