"""Evaluate a dictionary as SAEBench's "core" does, with a PCA baseline of k components beside every figure.

On held-out activations (a harvest of windows training never saw):

* **FVU**, the fraction of variance unexplained, ``sum |y - y_hat|^2 / sum |y - mean(y)|^2``,
  without position 0 (the attention sink; the headline) and with it (``fvu_with_bos``);
* **L0**, latents active per token; **dead** latents (never active on these tokens) and
  **dense** ones (active on more than ``dense_threshold`` of them);

and on held-out token windows run through the model, the dictionary **spliced** into the
forward (the site's activation replaced by the reconstruction at every position but 0, via
the hook API's ``replace``; a transcoder replaces ``mlp.out`` with its prediction from the
MLP's input):

* **CE** loss (next-token cross-entropy, positions 1..), its increase over the clean model,
  **KL** from the clean next-token distribution, and the **fraction of the loss recovered**
  against mean ablation of the site, ``(CE_ablated - CE_spliced) / (CE_ablated - CE_clean)``.

The PCA baseline keeps the ``k`` leading principal components of the site (the output site
for a transcoder) from the training activations, computed independently with
``torch.linalg.eigh`` of their covariance: same ``k`` as the dictionary's L0, no sparsity.
A transcoder also reports its skip alone (no latents).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from lmatlas.features.dictionary import Dictionary, check_fits, split_site
from lmatlas.features.harvest import Activations, mlp_inputs
from lmatlas.progress import ProgressArg, progress_task

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


class PCA:
    """The ``k`` leading principal components of ``x [n, d]`` (float64 covariance, ``torch.linalg.eigh``)."""

    def __init__(self, x: torch.Tensor, k: int):
        x64 = x.double()
        self.mean = x64.mean(0)
        centred = x64 - self.mean
        cov = centred.t() @ centred / max(1, len(x) - 1)
        _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
        self.components = vectors[:, -k:].flip(1)  # [d, k]
        self.k = k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        centred = x.double() - self.mean
        return (self.mean + centred @ self.components @ self.components.t()).to(x.dtype)


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: ``sum |y - y_hat|^2 / sum |y - mean(y)|^2`` (float64)."""
    y, y_hat = y.detach(), y_hat.detach()
    return float((y - y_hat).double().pow(2).sum() / (y.double() - y.double().mean(0)).pow(2).sum())


@torch.no_grad()
def _apply(d: Dictionary, x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction [n, d_out], activity counts [n_latents])`` of ``d`` on ``x``, with the L0 per row."""
    outs, counts, l0 = [], torch.zeros(d.n_latents), []
    for lo in range(0, len(x), chunk):
        out, latents = d(x[lo : lo + chunk])
        active = latents > 0
        counts += active.sum(0)
        l0.append(active.sum(-1).float())
        outs.append(out)
    return torch.cat(outs), counts, torch.cat(l0)


@torch.no_grad()
def reconstruction(
    d: Dictionary,
    heldout: Activations,
    train: Activations | None = None,
    *,
    rows: int = 65536,
    dense_threshold: float = 0.1,
    pca: PCA | None = None,
) -> dict[str, Any]:
    """FVU (without and with position 0), L0, dead and dense latents on held-out rows; PCA-k beside."""
    card = d.card
    x, y = heldout.rows(card.site, rows), heldout.rows(card.out_site, rows)
    xb, yb = heldout.bos(card.site), heldout.bos(card.out_site)
    pred, counts, l0 = _apply(d, x)
    pred_b, _, _ = _apply(d, xb)
    pca = pca or PCA((train or heldout).rows(card.out_site, rows), card.k)
    out = {
        "tokens": len(x),
        "bos_tokens": len(xb),
        "fvu": {"dictionary": fvu(y, pred), "pca": fvu(y, pca(y))},
        "fvu_with_bos": {
            "dictionary": fvu(torch.cat([y, yb]), torch.cat([pred, pred_b])),
            "pca": fvu(torch.cat([y, yb]), pca(torch.cat([y, yb]))),
        },
        "l0": {"dictionary": float(l0.mean()), "pca": card.k},
        "dead_fraction": float((counts == 0).float().mean()),
        "dense_fraction": float((counts > dense_threshold * len(x)).float().mean()),
        "dense_threshold": dense_threshold,
        "pca_fit": "training activations"
        if train is not None
        else "the held-out activations themselves (no training harvest given)",
    }
    out["fvu_without_sinks"] = _without_sinks(x, y, pred, pca)
    if card.kind == "transcoder":
        skip = d.skip(x) + d.b_dec
        out["fvu"]["skip_only"] = fvu(y, skip)
    return out


def _without_sinks(x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, pca: PCA, ratio: float = 10.0) -> dict:
    """The FVU without the positions whose input norm is over ``ratio`` x the median (attention sinks past position 0).

    A sink's residual norm is tens to a hundred times the others', so a single one can hold most
    of the held-out variance and decide the FVU (and PCA spends a component on it); this figure
    leaves them out and says how many there were.
    """
    norms = x.float().norm(dim=-1)
    keep = norms <= ratio * norms.median()
    return {
        "dictionary": fvu(y[keep], pred[keep]),
        "pca": fvu(y[keep], pca(y[keep])),
        "positions_left_out": int((~keep).sum()),
        "norm_ratio": ratio,
    }


def _site_mean(acts: Activations, site: str, rows: int = 65536) -> torch.Tensor:
    return acts.rows(site, rows).mean(0)


def _keep_first(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A replacement that swaps positions 1.. for ``fn(value[:, 1:])`` and keeps position 0 (the sink)."""

    def replace(value, ctx=None):
        new = value.clone()
        new[:, 1:] = fn(value[:, 1:].float()).to(value.dtype)
        return new

    return replace


@torch.no_grad()
def spliced(
    model: "Model",
    d: Dictionary,
    windows: torch.Tensor,
    mean: torch.Tensor,
    pca: PCA | None = None,
    *,
    batch_size: int = 8,
    progress: ProgressArg = True,
) -> dict[str, Any]:
    """CE, CE increase, KL and loss recovered with ``d`` (and PCA, mean ablation) spliced in, over ``windows``."""
    card = d.card
    layer, _ = split_site(card.site)
    stash: dict[int, torch.Tensor] = {}
    variants: dict[str, Callable] = {}
    if card.kind == "sae":
        variants["dictionary"] = _keep_first(lambda v: d(v)[0])
    else:

        def transcode(value, ctx=None):
            new = value.clone()
            new[:, 1:] = d(stash[layer][:, 1:].float())[0].to(value.dtype)
            return new

        variants["dictionary"] = transcode
    if pca is not None:
        variants["pca"] = _keep_first(pca)
    variants["mean_ablation"] = _keep_first(lambda v: mean.to(v.dtype).expand_as(v))
    sums = {name: 0.0 for name in ["clean", *variants]}
    kls = {name: 0.0 for name in variants}
    count = 0
    with progress_task(f"Splicing {card.out_site}", total=len(windows), enabled=progress) as task:
        for lo in range(0, len(windows), batch_size):
            ids = windows[lo : lo + batch_size]
            targets = ids[:, 2:].reshape(-1)
            clean = model.run(ids).logits[:, 1:-1].float().log_softmax(-1).reshape(-1, model.layout.d_vocab)
            sums["clean"] += float(F.nll_loss(clean, targets, reduction="sum"))
            for name, fn in variants.items():
                with mlp_inputs(model, [layer] if card.kind == "transcoder" else [], stash):
                    logits = model.run(ids, replace={card.out_site: fn}).logits
                logp = logits[:, 1:-1].float().log_softmax(-1).reshape(-1, model.layout.d_vocab)
                sums[name] += float(F.nll_loss(logp, targets, reduction="sum"))
                kls[name] += float((clean.exp() * (clean - logp)).sum())
            count += targets.numel()
            task.update(min(len(windows), lo + batch_size))
    ce = {name: total / count for name, total in sums.items()}
    gap = ce["mean_ablation"] - ce["clean"]
    return {
        "windows": len(windows),
        "predictions": count,
        "ce": ce,
        "ce_increase": {name: ce[name] - ce["clean"] for name in variants},
        "kl": {name: total / count for name, total in kls.items()},
        "loss_recovered": {name: (ce["mean_ablation"] - ce[name]) / gap if gap else float("nan") for name in variants},
    }


def evaluate(
    model: "Model",
    d: Dictionary,
    heldout: Activations,
    train: Activations | None = None,
    *,
    windows: int = 32,
    rows: int = 65536,
    dense_threshold: float = 0.1,
    progress: ProgressArg = True,
) -> dict[str, Any]:
    """SAEBench-style core metrics of ``d`` (see the module docstring), each with its PCA-k baseline."""
    check_fits(d, model)
    fit = train or heldout
    pca = PCA(fit.rows(d.card.out_site, rows), d.card.k)
    recon = reconstruction(d, heldout, train, rows=rows, dense_threshold=dense_threshold, pca=pca)
    ids = heldout.tokens()[:windows]
    splice = spliced(model, d, ids, _site_mean(fit, d.card.out_site), pca, progress=progress)
    return {
        "site": d.card.site,
        "out_site": d.card.out_site,
        "kind": d.card.kind,
        "k": d.card.k,
        "n_latents": d.card.n_latents,
        **recon,
        **splice,
    }
