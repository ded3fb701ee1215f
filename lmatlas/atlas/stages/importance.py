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
* ``"mean-ablation"``: every head and MLP measured exactly (``n_heads + 1`` ablations per
  layer, batched as :func:`lmatlas.causal.patching.ablate` batches them).

Both go through :mod:`lmatlas.causal`'s targets and metric. ONE clean forward over the windows gives the
means, each block's input and the clean loss (:class:`CleanRun`; with the attribution method it is the
attribution's own forward). The exact ablations are :func:`lmatlas.causal.patching.ablate`'s
(``how="mean"``, ``resume=True``) fed from that run: each forward starts at the layer it ablates from the
clean run's stream (:func:`lmatlas.model.run_from`) and holds that layer's targets, so no block runs before a
target's layer. Same values as full forwards.
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


def _sites(model: "Model") -> list[str]:
    return [f"L{layer}.{c}" for layer in range(model.layout.n_layers) for c in ("attn.z", "mlp.out")]


class CleanRun:
    """What the ablations read from ONE clean forward over the importance windows ``ids [n, pos]``.

    * ``mean(site)``: the site's mean ``[*site_shape]`` over every (window, position) (float32), for every
      layer's ``attn.z`` and ``mlp.out`` (what :class:`lmatlas.edit.stats.AblationStats` measures one truncated
      forward per site; the values are the same);
    * ``streams[layer]``: the input ``[n, pos, d_model]`` of each block (``resid.pre``), where an ablation of
      that layer starts (:func:`lmatlas.model.run_from`);
    * ``loss``: the clean mean next-token cross-entropy (:func:`lmatlas.causal.metrics.sequence_loss`, rows
      averaged), the base of every ``delta_loss``.

    Built from the attribution's own forward (the constructor, given its cache; detached, its values equal a
    forward without gradients) or from a forward of its own (:meth:`measure`).
    """

    def __init__(self, model: "Model", cache, loss: float):
        self._means = {}
        for name in _sites(model):
            value = cache[name].detach()
            self._means[model.sites(name)[0]] = value.reshape(-1, *value.shape[2:]).float().mean(0)
        self.streams = [cache[f"L{layer}.resid.pre"].detach() for layer in range(model.layout.n_layers)]
        self.loss = loss

    @staticmethod
    def capture(model: "Model") -> list[str]:
        """The sites the clean forward captures."""
        return _sites(model) + [f"L{layer}.resid.pre" for layer in range(model.layout.n_layers)]

    @classmethod
    def measure(cls, model: "Model", ids: torch.Tensor) -> "CleanRun":
        from lmatlas.causal.metrics import sequence_loss

        with torch.no_grad():
            cache = model.run(ids, capture=cls.capture(model))
        return cls(model, cache, float(sequence_loss(ids)(cache.logits).mean()))

    def mean(self, site) -> torch.Tensor:
        """The mean of the whole ``site`` (a :class:`~lmatlas.model.sites.Site`)."""
        return self._means[site]

    def sources(self, n: int, pos: int) -> dict[str, torch.Tensor]:
        """``site name -> [n, pos, *site_shape]``: each mean broadcast over the windows (a view, no copy), the
        values :func:`lmatlas.causal.patching.patched_metric` writes into an ablated slice."""
        return {str(site): mean.expand(n, pos, *mean.shape) for site, mean in self._means.items()}


def _clean(model: "Model", ctx: BuildContext) -> CleanRun:
    return ctx.remember("importance.clean", lambda: CleanRun.measure(model, _ids(ctx)))


def _exact(model: "Model", ctx: BuildContext, targets: list[str]) -> dict[str, float]:
    """Exact mean-ablation ``delta_loss`` of each target (``L3.H1`` or ``L3.mlp.out``).

    :func:`lmatlas.causal.patching.ablate`'s ``how="mean"``, ``resume=True`` ablations
    (:func:`~lmatlas.causal.patching.patched_metric`) with the clean run's means, block inputs and loss:
    each forward holds targets of one layer (at most ``TARGETS_PER_FORWARD``, ``n`` rows each) and starts
    at that layer; no block runs for a target before its layer, and no clean forward runs again.
    """
    from lmatlas.causal.effects import Effects
    from lmatlas.causal.metrics import sequence_loss
    from lmatlas.causal.patching import patched_metric

    ids, clean = _ids(ctx), _clean(model, ctx)
    sources = clean.sources(ids.shape[0], ids.shape[1])
    values = patched_metric(model, ids, targets, sources, sequence_loss(ids), streams=clean.streams, progress=False)
    effects = Effects(
        "importance", "sequence_loss", "ablate-mean", targets, torch.tensor(values), clean.loss, clean.loss
    )
    return dict(zip(targets, effects.effect().tolist()))


def _attribution(model: "Model", ctx: BuildContext) -> dict:
    """Estimated ``delta_loss`` of every head and MLP (one forward + backward), the top ones verified exactly."""
    from lmatlas.causal.metrics import sequence_loss

    ids, sites = _ids(ctx), _sites(model)
    cache = model.run(ids, capture=CleanRun.capture(model), grad=True)
    loss = sequence_loss(ids)(cache.logits).mean()
    grads = dict(zip(sites, torch.autograd.grad(loss, [cache[s] for s in sites])))
    clean = ctx.memo["importance.clean"] = CleanRun(model, cache, float(loss.detach()))
    estimate: dict[str, float] = {}
    for site in sites:
        value = cache[site].detach()
        mean = clean.mean(model.sites(site)[0]).to(value.dtype)
        change = (mean - value) * grads[site]  # [batch, pos, (head,) d]
        if site.endswith("attn.z"):
            for head, total in enumerate(change.sum(dim=(0, 1, 3)).tolist()):
                estimate[f"{site.split('.')[0]}.H{head}"] = total
        else:
            estimate[site] = float(change.sum())
    del cache, grads
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
        share="importance",
        cost=0.9,
    )
)
