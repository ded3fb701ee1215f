"""Edge scores that survive saturated attention: the QK-aware score, and EAP-IG along activations.

**QK-aware score** (the AtP* QK fix carried to edges). EAP scores an edge into a head's
queries (``L5.H3.q``) or a KV group's keys (``L5.KV1.k``) through the softmax's gradient,
which is ~0 when the attention is saturated even if the edge moves the pattern
completely. Here the queries (keys) the input would compute with the one source's
clean-minus-corrupt write added are taken to first order through the input's norm,
projection, q/k-norm and rotary (a Jacobian-vector product of ``resid.pre -> attn.q``,
exact for the linear parts), the head's pattern is recomputed **exactly** (softmax with the
model's causal mask), and only the step from the pattern to the metric is linearised:

    ``score(u -> L.H.q) = sum (P_h(q_h + J_q delta_u) - P_h) * d metric / d P_h``

(for a key edge, summed over the query heads of the KV group). Only that layer's softmax
is recomputed, for all sources at once: ``[sources, batch, head, pos, key_pos]``.

**EAP-IG along activations** (MIB's variant). EAP-IG on inputs interpolates the
embeddings and lets the model carry the mixture; here every layer's residual stream is
*held* at ``corrupt + alpha * (clean - corrupt)`` (its value; gradients still flow through
the model), so each input's gradient is averaged along the straight path in activation
space between the corrupt and the clean run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from lmatlas.causal.tasks import TaskBatch
    from lmatlas.model.handle import Model


def held_streams(model: "Model", clean, corrupt, alpha: float) -> dict:
    """Replacements holding ``resid.pre`` / ``resid.mid`` / the last ``resid.post`` at
    ``corrupt + alpha * (clean - corrupt)`` while keeping the model's gradient path."""
    lay = model.layout
    names = [f"L{i}.{c}" for i in range(lay.n_layers) for c in ("resid.pre", "resid.mid")]
    names.append(f"L{lay.n_layers - 1}.resid.post")

    def hold(name: str) -> Callable:
        target = corrupt[name] + alpha * (clean[name] - corrupt[name])

        def fn(value, ctx):
            return value + (target.to(value.dtype) - value).detach()

        return fn

    return {name: hold(name) for name in names}


def stream_captures(model: "Model") -> list[str]:
    """The streams :func:`held_streams` holds (capture them from the clean and corrupt runs)."""
    lay = model.layout
    return [f"L{i}.{c}" for i in range(lay.n_layers) for c in ("resid.pre", "resid.mid")] + [
        f"L{lay.n_layers - 1}.resid.post"
    ]


def _jvp(output: torch.Tensor, source: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``[n, *output.shape]``: ``J @ t`` for each tangent ``t`` in ``tangents`` ``[n, *source.shape]``,
    ``J`` the Jacobian of ``output`` with respect to ``source`` (by the double-backward trick)."""
    probe = torch.zeros_like(output, requires_grad=True)
    (transposed,) = torch.autograd.grad(output, source, grad_outputs=probe, create_graph=True)
    tangents = tangents.to(transposed.dtype)
    try:  # all tangents in one vectorised backward
        (products,) = torch.autograd.grad(
            transposed, probe, grad_outputs=tangents, retain_graph=True, is_grads_batched=True
        )
        return products.detach()
    except RuntimeError:  # an op without a batching rule: one backward per tangent
        return torch.stack(
            [torch.autograd.grad(transposed, probe, grad_outputs=t, retain_graph=True)[0].detach() for t in tangents]
        )


def qk_scores(
    model: "Model", task: "TaskBatch", metric: Callable, delta: torch.Tensor, sources: list[str], targets: list[str]
) -> dict[tuple[int, int], float]:
    """``{(source index, target index): score}`` for every query and key edge (see the module docstring).

    ``delta`` is ``[n_sources, batch, pos, d_model]``: each source's clean-minus-corrupt write.
    """
    from lmatlas.causal.attribution import _pattern_after

    lay = model.layout
    sites = [f"L{i}.{c}" for i in range(lay.n_layers) for c in ("resid.pre", "attn.q", "attn.k", "attn.pattern")]
    cache = model.run(task.corrupt, capture=sites, grad=True)
    value = metric(cache.logits).mean()
    patterns = [cache[f"L{i}.attn.pattern"] for i in range(lay.n_layers)]
    grads = torch.autograd.grad(value, patterns, retain_graph=True, allow_unused=True)
    column = {name: j for j, name in enumerate(targets)}
    scores: dict[tuple[int, int], float] = {}
    for layer in range(lay.n_layers):
        if grads[layer] is None:
            continue
        n_src = 1 + layer * (lay.n_heads + 1)
        pre, q, k = cache[f"L{layer}.resid.pre"], cache[f"L{layer}.attn.q"], cache[f"L{layer}.attn.k"]
        base = patterns[layer].detach().float()  # [B, H, P, K]
        weight = grads[layer].float()
        moved_q = _jvp(q, pre, delta[:n_src])  # [S, B, P, H, d_head]
        moved_k = _jvp(k, pre, delta[:n_src])  # [S, B, P, G, d_head]
        for part, moved in (("q", moved_q), ("k", moved_k)):
            qs = (q.detach() + moved) if part == "q" else q.detach().expand_as(moved_q)
            ks = (k.detach() + moved) if part == "k" else k.detach().expand_as(moved_k)
            after = _pattern_after(model, layer, qs.flatten(0, 1), ks.flatten(0, 1)).float()
            per_head = ((after.view(n_src, *base.shape) - base) * weight).sum(dim=(1, 3, 4))  # [S, H]
            if part == "k":
                per_head = per_head.view(n_src, lay.n_kv_heads, lay.group_size).sum(-1)  # [S, G]
            for index in range(per_head.shape[1]):
                name = f"L{layer}.H{index}.q" if part == "q" else f"L{layer}.KV{index}.k"
                for s in range(n_src):
                    scores[(s, column[name])] = float(per_head[s, index])
    return scores
