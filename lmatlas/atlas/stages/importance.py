"""Stage ``importance``: how much the corpus loss rises when a head or an MLP is mean-ablated.

Mean ablation replaces a component's output by its mean over the importance corpus
(every batch and position), which removes the information it carries while keeping
the residual stream's typical magnitude. For head ``h`` of layer ``l`` the replaced
site is ``L{l}.attn.z[..., h, :]`` (a post-attention norm still normalises the
result); for the MLP it is ``L{l}.mlp.out``. ``delta_loss`` is the rise of the mean
next-token cross-entropy (nats) over the first ``importance_sequences`` windows.

Two methods (``importance_method`` build parameter):

* ``"attribution"`` (default): attribution patching of the mean ablation for every
  head and MLP at once, ``estimate = sum (mean - a) * d loss / d a`` (one forward and
  one backward), then the ``importance_verify`` heads with the largest estimates and
  every MLP are re-measured exactly; ``delta_loss`` is the exact value where measured,
  the estimate elsewhere (``method`` says which).
* ``"mean-ablation"``: every head and MLP measured exactly (``n_heads + 1`` forwards per
  layer, batched through :func:`lmatlas.causal.patching.ablate`).

Both go through :mod:`lmatlas.causal`. The means come from one forward over the windows
(:class:`CorpusMeans`), and every exact ablation starts at the layer it ablates from the
clean run's stream (``ablate(..., resume=True)``, batched by layer): the blocks before a
target are the clean run's, so they are not run again. Same values as full forwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.atlas.stages import BuildContext, Stage, layer_of, stage

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def corpus_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``logits [b, p, V]`` on ``ids [b, p]``."""
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))


def _ids(ctx: BuildContext) -> torch.Tensor:
    return ctx.corpus[: ctx.params.importance_sequences]


class CorpusMeans:
    """Per-site means ``[*site_shape]`` over every (window, position) of the importance windows, from ONE
    forward capturing every layer's ``attn.z`` and ``mlp.out`` (what :class:`lmatlas.edit.stats.AblationStats`
    measures one truncated forward per site; the values are the same). Ablation reads it as it reads
    ``AblationStats`` (``mean(site)``)."""

    def __init__(self, model: "Model", ids: torch.Tensor):
        n = model.layout.n_layers
        names = [f"L{layer}.{c}" for layer in range(n) for c in ("attn.z", "mlp.out")]
        with torch.no_grad():
            cache = model.run(ids, capture=names, lm_head=False)
        self._means = {}
        for name in names:
            value = cache[name]
            self._means[model.sites(name)[0]] = value.reshape(-1, *value.shape[2:]).float().mean(0)

    def mean(self, site) -> torch.Tensor:
        """The mean of the whole ``site`` (a :class:`~lmatlas.model.sites.Site`)."""
        return self._means[site]


def _stats(model: "Model", ctx: BuildContext) -> CorpusMeans:
    return CorpusMeans(model, _ids(ctx))  # means over the importance windows themselves


def _exact(model: "Model", ctx: BuildContext, targets: list[str]) -> dict[str, float]:
    """Exact mean-ablation ``delta_loss`` of each target (``L3.H1`` or ``L3.mlp.out``)."""
    from lmatlas.causal.metrics import sequence_loss
    from lmatlas.causal.patching import ablate

    ids = _ids(ctx)
    stats = ctx.remember("importance.stats", lambda: _stats(model, ctx))
    # by layer, so that each batch of ablations starts as late as its first target allows (a row's
    # value does not depend on the rows batched with it)
    ordered = sorted(targets, key=lambda t: int(t[1:].split(".", 1)[0]))
    effects = ablate(model, ids, ordered, sequence_loss(ids), how="mean", stats=stats, name="importance", resume=True)
    return dict(zip(ordered, effects.effect().tolist()))


def _attribution(model: "Model", ctx: BuildContext) -> dict:
    """Estimated ``delta_loss`` of every head and MLP (one forward + backward), the top ones verified exactly."""
    from lmatlas.causal.metrics import sequence_loss

    ids, lay = _ids(ctx), model.layout
    stats = ctx.remember("importance.stats", lambda: _stats(model, ctx))
    sites = [f"L{layer}.{c}" for layer in range(lay.n_layers) for c in ("attn.z", "mlp.out")]
    cache = model.run(ids, capture=sites, grad=True)
    grads = dict(zip(sites, torch.autograd.grad(sequence_loss(ids)(cache.logits).mean(), [cache[s] for s in sites])))
    estimate: dict[str, float] = {}
    for site in sites:
        value = cache[site].detach()
        mean = stats.mean(model.sites(site)[0]).to(value.dtype)
        change = (mean - value) * grads[site]  # [batch, pos, (head,) d]
        if site.endswith("attn.z"):
            for head, total in enumerate(change.sum(dim=(0, 1, 3)).tolist()):
                estimate[f"{site.split('.')[0]}.H{head}"] = total
        else:
            estimate[site] = float(change.sum())
    k = ctx.params.importance_verify
    heads = sorted((t for t in estimate if ".H" in t), key=lambda t: -abs(estimate[t]))[:k]
    mlps = [t for t in estimate if t.endswith("mlp.out")]
    return {"estimate": estimate, "exact": _exact(model, ctx, heads + mlps)}


def compute(model: "Model", unit: str, ctx: BuildContext):
    layer = layer_of(unit)
    heads = [f"L{layer}.H{h}" for h in range(model.layout.n_heads)]
    mlp = f"L{layer}.mlp.out"
    if ctx.params.importance_method == "mean-ablation":
        exact = _exact(model, ctx, heads + [mlp])
        estimate: dict[str, float] = {}
    else:
        found = ctx.remember("importance.attribution", lambda: _attribution(model, ctx))
        exact, estimate = found["exact"], found["estimate"]

    def row(target: str) -> dict:
        measured = target in exact
        return {
            "delta_loss": exact[target] if measured else estimate[target],
            "estimate": estimate.get(target),
            "method": "mean-ablation" if measured else "attribution",
        }

    return {
        "head_importance": [{"layer": layer, "head": h, **row(name)} for h, name in enumerate(heads)],
        "mlp_importance": [{"layer": layer, **row(mlp)}],
    }


stage(
    Stage(
        name="importance",
        description="loss increase when each head and MLP is mean-ablated (attribution, top heads verified exactly)",
        plan=lambda model, ctx: [f"importance/L{layer}" for layer in range(model.layout.n_layers)],
        compute=compute,
    )
)
