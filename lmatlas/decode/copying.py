"""Copying and suppression scores of every head, and which heads can write a given token (OV circuits).

The maths is in :mod:`lmatlas.decode.heads`; the per-head decoding in :mod:`lmatlas.decode.ov`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.decode.head_inputs import DEFAULT_SAMPLE, _blocks, _check_k, attn_input, embed_tokens, token_ids
from lmatlas.decode.ov import ov_left, ov_right, ov_write
from lmatlas.decode.vocab import DecodeError, unembed_matrix
from lmatlas.model.sites import check_head, head_name

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass
class CopyingScores:
    """Copying and suppression scores of every query head: ``[n_layers, n_heads]`` each."""

    copying: torch.Tensor
    suppression: torch.Tensor
    n_sources: int
    k: int
    seed: int = 0
    heads: list[str] = field(default_factory=list)  # heads scored (others are NaN)

    def ranked(self, by: str = "copying", n: int | None = None) -> list[tuple[str, float]]:
        """``[(head name, score), ...]`` best first (``by``: ``"copying"`` or ``"suppression"``)."""
        if by not in ("copying", "suppression"):
            raise DecodeError(f"Cannot rank heads by {by!r}: use 'copying' or 'suppression'.")
        scores = getattr(self, by)
        order = torch.argsort(torch.nan_to_num(scores.reshape(-1), nan=-1.0), descending=True, stable=True)
        H = scores.shape[1]
        out = [(head_name(int(i) // H, int(i) % H), float(scores.reshape(-1)[i])) for i in order]
        return [row for row in out if row[0] in self.heads][:n]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_sources": self.n_sources,
            "k": self.k,
            "seed": self.seed,
            "copying": self.copying.tolist(),
            "suppression": self.suppression.tolist(),
        }


def _k_best(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """``[n, min(k, width)]`` the ``k`` largest (smallest) values of each row, unordered."""
    return torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest, sorted=False).values


def self_hits(
    model: "Model",
    layer: int,
    head: int,
    sources: torch.Tensor,
    k: int = 10,
    *,
    norm_input: bool = True,
    chunk: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(copied [n], suppressed [n])`` bool: is each source's own token in its top-``k`` / bottom-``k`` outputs?

    One pass over the vocabulary keeping only the running ``k``-th largest and smallest
    logit of each source (no ids): a source is copied iff its own logit reaches the
    ``k``-th largest (ties count in its favour). This is what :func:`copying_scores`
    runs for every head; the own logit is read from the same product it is compared with.
    """
    _check_k(model, k)
    right = ov_right(model, layer, head)  # [d_head, V]
    copied = torch.zeros(sources.numel(), dtype=torch.bool)
    suppressed = torch.zeros_like(copied)
    with torch.no_grad():
        for start, block in _blocks(sources):
            left = ov_left(model, layer, head, block, norm_input=norm_input)  # [b, d_head]
            block = block.to(left.device)
            rows = torch.arange(block.numel(), device=left.device)
            own = torch.empty(block.numel(), device=left.device)
            high = low = None  # [b, k] running k largest / smallest logits
            for c0 in range(0, right.shape[1], chunk):
                scores = left @ right[:, c0 : c0 + chunk]  # [b, chunk]
                inside = (block >= c0) & (block < c0 + chunk)
                own[inside] = scores[rows[inside], block[inside] - c0]
                top, bottom = _k_best(scores, k, largest=True), _k_best(scores, k, largest=False)
                high = top if high is None else _k_best(torch.cat([high, top], 1), k, largest=True)
                low = bottom if low is None else _k_best(torch.cat([low, bottom], 1), k, largest=False)
            end = start + block.numel()
            copied[start:end] = (own >= high.min(1).values).cpu()
            suppressed[start:end] = (own <= low.max(1).values).cpu()
    return copied, suppressed


def copying_scores(
    model: "Model",
    *,
    heads: list[tuple[int, int]] | None = None,
    sources: int | torch.Tensor | list[int] | None = DEFAULT_SAMPLE,
    k: int = 10,
    seed: int = 0,
    norm_input: bool = True,
    progress: bool = False,
) -> CopyingScores:
    """Copying and suppression scores of ``heads`` (default: every query head of every layer).

    ``sources``: a sample size (default 1024 tokens, seeded: the score's standard
    error is then at most 1.6 points), explicit ids, or ``None`` for the whole vocabulary.
    Cost per head: ``d_head x d_vocab x (d_model + n_sources)`` multiply-adds, plus two top-k passes.
    """
    lay = model.layout
    _check_k(model, k)
    heads = heads if heads is not None else [(l, h) for l in range(lay.n_layers) for h in range(lay.n_heads)]
    for layer, head in heads:
        check_head(layer, head, lay)
    ids = token_ids(model, sources, seed)
    copying = torch.full((lay.n_layers, lay.n_heads), float("nan"))
    suppression = copying.clone()
    track = None
    if progress:
        from rich.console import Console
        from rich.progress import Progress

        track = Progress(transient=True, console=Console(stderr=True))
        task = track.add_task("OV circuits", total=len(heads))
        track.start()
    try:
        for layer, head in heads:
            copied, suppressed = self_hits(model, layer, head, ids, k, norm_input=norm_input)
            copying[layer, head] = copied.double().mean()
            suppression[layer, head] = suppressed.double().mean()
            if track is not None:
                track.advance(task)
    finally:
        if track is not None:
            track.stop()
    return CopyingScores(copying, suppression, int(ids.numel()), k, seed, [head_name(l, h) for l, h in heads])


@dataclass
class TokenPromotion:
    """How much every head's OV circuit writes one output token, over source tokens.

    ``logit[s]`` of head ``h`` is column ``token`` of its OV logits (module docstring):
    what the head adds to ``token``'s logit when it attends to source ``s``.

    Attributes:
        token: the output token id.
        max: ``[n_layers, n_heads]`` the largest ``logit[s]`` over the sources (the
            ranking key: the head *can* write ``token``, given the right source).
        argmax: ``[n_layers, n_heads]`` the source token achieving it.
        mean: ``[n_layers, n_heads]`` the mean over the sources (``token`` written
            whatever the head attends to).
    """

    token: int
    max: torch.Tensor
    argmax: torch.Tensor
    mean: torch.Tensor

    def ranked(self, n: int = 20) -> list[tuple[int, int, float, int, float]]:
        """``[(layer, head, max, argmax source, mean), ...]``, the ``n`` largest ``max`` first."""
        H = self.max.shape[1]
        order = torch.argsort(self.max.reshape(-1), descending=True, stable=True)[:n].tolist()
        return [
            (
                i // H,
                i % H,
                float(self.max.reshape(-1)[i]),
                int(self.argmax.reshape(-1)[i]),
                float(self.mean.reshape(-1)[i]),
            )
            for i in order
        ]


def promoting_heads(
    model: "Model",
    token: int,
    *,
    sources: int | torch.Tensor | list[int] | None = None,
    norm_input: bool = True,
    seed: int = 0,
) -> TokenPromotion:
    """Every head's OV logit for output ``token`` over ``sources`` (default: the whole vocabulary).

    One output column is cheap: ``logit[s] = x_s . (W_V[kv] @ w_h) + b_V[kv] . w_h`` with
    ``w_h = ov_write(h) @ W_U[:, token]`` (``[d_head]``), so every head of a layer is
    scored with one ``[n_sources, d_model] @ [d_model, n_heads]`` product per block.
    """
    lay = model.layout
    if not 0 <= int(token) < lay.d_vocab:
        raise DecodeError(f"Token id {token} is out of range: this model's vocabulary is 0..{lay.d_vocab - 1}.")
    ids = token_ids(model, sources, seed)
    w_U = unembed_matrix(model)[:, int(token)].detach().float()  # [d_model]
    kv = [lay.kv_head(h) for h in range(lay.n_heads)]
    U, const = [], []  # per layer: [d_model, heads] and [heads]
    with torch.no_grad():
        for layer in range(lay.n_layers):
            w = torch.stack([ov_write(model, layer, h) @ w_U for h in range(lay.n_heads)])  # [heads, d_head]
            U.append(torch.einsum("hde,he->dh", model.W.W_V(layer).detach().float()[kv], w))
            b_V = model.W.b_V(layer)
            const.append((b_V.detach().float()[kv] * w).sum(-1) if b_V is not None else w.new_zeros(lay.n_heads))
        best = torch.full((lay.n_layers, lay.n_heads), float("-inf"), device=w_U.device)
        where = torch.zeros(lay.n_layers, lay.n_heads, dtype=torch.int64, device=w_U.device)
        total = torch.zeros(lay.n_layers, lay.n_heads, dtype=torch.float64, device=w_U.device)
        for _, block in _blocks(ids):
            x = embed_tokens(model, block)  # embedded once, normed by each layer
            block = block.to(w_U.device)
            for layer in range(lay.n_layers):
                scores = attn_input(model, layer, x, norm_input=norm_input) @ U[layer] + const[layer]  # [b, heads]
                value, at = scores.max(0)
                better = value > best[layer]
                best[layer] = torch.where(better, value, best[layer])
                where[layer] = torch.where(better, block[at], where[layer])
                total[layer] += scores.sum(0).double()
    best, where, mean = best.cpu(), where.cpu(), (total / ids.numel()).float().cpu()
    return TokenPromotion(int(token), best, where, mean)
