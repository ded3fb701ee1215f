"""Stage ``neurons``: every neuron's promoted, suppressed and exciting tokens.

All layers are decoded in one call of :func:`lmatlas.decode.neurons.decode_neurons`
(the exact pruned top-k; remembered per process), and each unit stores one layer.
Every token list is stored as display strings (byte tokens as ``<0xE2>``) and as ids
(``promoted_ids``, ...). ``exciting`` are the tokens whose embeddings most excite the neuron's *gate* input
direction for gated MLPs (the gate decides whether a gated neuron fires), its *in*
direction otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def _decode_all(model: "Model", ctx: BuildContext):
    """Every neuron's output side, and the one input side the stage stores (gate for gated MLPs, else in)."""
    from lmatlas.decode.neurons import decode_neurons

    exciting = "gate" if model.W.W_gate(0) is not None else "in"
    return decode_neurons(model, k=ctx.params.top_k, inputs=[exciting], progress=ctx.progress)


def vocab_texts(model: "Model", ctx: BuildContext) -> list[str]:
    """The display string of every token id (``[d_vocab]``, :func:`~lmatlas.decode.token_text.token_texts`),
    decoded once per process and shared by the stages that spell tokens.

    ``token_texts`` spells each id on its own, so indexing this list gives the same strings as
    decoding the ids of a ranking (2.8 million for SmolLM2's neurons) one by one, at a fraction of the cost.
    """
    from lmatlas.decode.token_text import token_texts

    return ctx.remember("vocab.texts", lambda: token_texts(model.tokenizer, range(model.layout.d_vocab)))


def compute(model: "Model", unit: str, ctx: BuildContext):
    """One layer's ``neurons`` rows, as an Arrow table (columns of lists, built from the rankings' arrays)."""
    import pyarrow as pa

    layer = layer_of(unit)
    decoding = ctx.remember("neurons.decoding", lambda: _decode_all(model, ctx))
    vocab = ctx.remember("vocab.arrow", lambda: pa.array(vocab_texts(model, ctx), pa.string()))
    rankings = {
        "promoted": decoding.promoted,
        "suppressed": decoding.suppressed,
        "exciting": decoding.inputs.get("gate", decoding.inputs.get("in")),
    }
    first, n = decoding.row(layer, 0), decoding.d_mlp
    columns = {"layer": pa.array([layer] * n, pa.int32()), "neuron": pa.array(range(n), pa.int32())}
    for name, ranking in rankings.items():
        ids, logits = _layer_of(ranking, first, n)  # [n, k] each (k = 0 without a ranking)
        flat = pa.array(ids.flatten().numpy())
        columns[name] = _lists(vocab.take(flat), n)
        columns[f"{name}_ids"] = _lists(flat.cast(pa.int32()), n)
        columns[f"{name}_logits"] = _lists(pa.array(logits.double().flatten().numpy()), n)
    return {"neurons": pa.table(columns)}


def _layer_of(ranking, first: int, n: int):
    """``(ids [n, k] int64, logits [n, k] float32)`` of one layer's rows of ``ranking`` (``k = 0`` for None)."""
    import torch

    if ranking is None:
        return torch.zeros(n, 0, dtype=torch.int64), torch.zeros(n, 0)
    return ranking.ids[first : first + n].contiguous(), ranking.logits[first : first + n].contiguous()


def _lists(values, n: int):
    """``n`` lists of equal length cut from ``values`` (an Arrow array of ``n * k`` values, row-major)."""
    import pyarrow as pa

    k = len(values) // n
    return pa.ListArray.from_arrays(pa.array(range(0, n * k + 1, k) if k else [0] * (n + 1), pa.int32()), values)


stage(
    Stage(
        name="neurons",
        description="tokens each neuron promotes, suppresses and is excited by (weights through the unembedding)",
        plan=lambda model, ctx: [f"neurons/L{layer}" for layer in range(model.layout.n_layers)],
        compute=compute,
        share="neurons",
        cost=1.1,
    )
)
