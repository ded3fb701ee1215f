"""Stage ``importance``: how much the corpus loss rises when a head or an MLP is mean-ablated.

Mean ablation replaces a component's output by its mean over the corpus (every
batch and position), which removes the information it carries while keeping the
residual stream's typical magnitude (zero ablation would not). For head ``h`` of
layer ``l`` the replaced site is ``L{l}.attn.z[..., h, :]`` (so a post-attention norm
still normalises the result); for the MLP it is ``L{l}.mlp.out``.

``delta_loss = loss(ablated) - loss(clean)``, mean next-token cross-entropy in nats
over the importance corpus (the first ``importance_sequences`` windows). One unit per
layer: ``n_heads + 1`` forward passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

DEFAULT_SEQUENCES = 2


def corpus_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``logits [b, p, V]`` on ``ids [b, p]``."""
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))


def _ids(ctx: BuildContext) -> torch.Tensor:
    return ctx.corpus[: ctx.params.get("importance_sequences", DEFAULT_SEQUENCES)]


def _clean(model: "Model", ctx: BuildContext) -> dict:
    """Clean loss and per-layer means of ``attn.z`` ``[head, d_head]`` and ``mlp.out`` ``[d_model]``."""
    ids = _ids(ctx)
    cache = model.run(ids, capture=["attn.z", "mlp.out"])
    return {
        "loss": corpus_loss(cache.logits, ids),
        "z": [cache.z(layer).mean(dim=(0, 1)) for layer in range(model.layout.n_layers)],
        "mlp": [cache.mlp_out(layer).mean(dim=(0, 1)) for layer in range(model.layout.n_layers)],
    }


def _ablated_loss(model: "Model", ids: torch.Tensor, site: str, replacement) -> float:
    cache = model.run(ids, replace={site: replacement})
    return corpus_loss(cache.logits, ids)


def compute(model: "Model", unit: str, ctx: BuildContext):
    layer, ids = layer_of(unit), _ids(ctx)
    clean = ctx.remember("importance.clean", lambda: _clean(model, ctx))
    heads = []
    for head in range(model.layout.n_heads):
        mean = clean["z"][layer][head]

        def ablate(z, site, head=head, mean=mean):
            z = z.clone()
            z[:, :, head] = mean
            return z

        loss = _ablated_loss(model, ids, f"L{layer}.attn.z", ablate)
        heads.append({"layer": layer, "head": head, "delta_loss": loss - clean["loss"]})
    mlp_mean = clean["mlp"][layer]  # [d_model]: written at every position
    mlp_loss = _ablated_loss(model, ids, f"L{layer}.mlp.out", lambda out, ctx: mlp_mean.expand_as(out))
    return {"head_importance": heads, "mlp_importance": [{"layer": layer, "delta_loss": mlp_loss - clean["loss"]}]}


stage(Stage(
    name="importance",
    description="loss increase when each head and each MLP is mean-ablated on the corpus",
    plan=lambda model, ctx: [f"importance/L{layer}" for layer in range(model.layout.n_layers)],
    compute=compute,
))
