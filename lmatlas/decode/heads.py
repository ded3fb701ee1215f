"""What each attention head writes and reads, from its parameters alone (MAPS).

A head does two things: its **QK circuit** decides where it looks (query token ->
key token) and its **OV circuit** decides what it writes once it looks there
(source token -> residual-stream vector). Both are bilinear maps of token
embeddings, so they can be read through the vocabulary without running the model.

**Inputs.** A token enters as ``x = embed(id)``, produced by the native embedding
module (so Gemma's ``sqrt(d_model)`` scale is included; GPT-2's positional
embedding is not), then -- by default, ``norm_input=True`` -- through the layer's own
pre-attention norm (the native module), because that is what the head reads: it
puts every token on the same scale and applies the norm's per-dimension gain.
Families without a pre-norm (OLMo-2) use ``x`` as is.

**OV circuit** of query head ``h`` of layer ``l`` (GQA: it reads KV head
``kv = h // group_size``)::

    logits[s, t] = (x_s @ W_V[kv] + b_V[kv]) @ W_O[h] * post_gain * final_gain @ W_U[:, t]
                   \\______ left [n, d_head] _______/   \\_________ right [d_head, d_vocab] ________/

``post_gain`` is the gain of a post-attention norm (Gemma 2/3, OLMo-2; its
data-dependent ``rsqrt`` is one positive number per position and does not change
rankings), ``final_gain`` that of the final norm (``norm="gain"`` in
:mod:`lmatlas.decode.vocab`; no ``b_U``, no soft-capping: the logits are the head's
linear contribution). The value bias ``b_V`` is included: whatever the head
attends to, its attention weights sum to one, so it always writes ``b_V @ W_O``.
The product is computed in this factored form (rank ``d_head``), chunked over
source tokens and the output vocabulary by :func:`lmatlas.decode.vocab.topk_rows`:
never a ``d_vocab x d_vocab`` matrix. The logits are those of the direction (the
final norm's ``rsqrt`` is left out): compare them within a head or across heads,
not with the model's output logits.

* **copying score**: the fraction of source tokens ``s`` whose own id is among the
  head's top-``k`` outputs for ``s`` (a head that writes back what it reads, e.g.
  induction and name-mover heads); **suppression score**: the same for the
  bottom-``k`` (copy suppression). Over every token, or over a seeded random sample
  (``sources=1024``, the default of :func:`copying_scores`).

**QK circuit**: the attention logit of a query token ``a`` for a key token ``b``::

    score[a, b] = qnorm(x_a @ W_Q[h] + b_Q[h]) . knorm(x_b @ W_K[kv] + b_K[kv]) * scaling

with the family's q/k norms when its attention module has them (``q_norm`` /
``k_norm``, per head or over the whole projection) and the module's ``scaling``.
*Limitation:* rotary embeddings are left out -- this is exactly the score at
relative distance 0 (both rotated by the same angle), not at other distances; GPT-2's
absolute positions and attention soft-capping (Gemma 2, monotonic) are left out too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.decode.vocab import DecodeError, TokenRanking, final_norm_gain, unembed_matrix
from lmatlas.model.norms import block_norm_gain
from lmatlas.model.sites import check_head, check_layer, head_name

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

#: Source/query tokens embedded per block (bounds the ``[block, d_model]`` buffer).
TOKEN_BLOCK = 4096
#: Source tokens sampled by :func:`copying_scores` unless told otherwise.
DEFAULT_SAMPLE = 1024


def _check_k(model: "Model", k: int) -> int:
    if not 1 <= k <= model.layout.d_vocab:
        raise DecodeError(f"k={k} is out of range: pick 1..{model.layout.d_vocab} (the vocabulary size).")
    return k


# -- token inputs ------------------------------------------------------------------------------------
def token_ids(model: "Model", tokens: int | torch.Tensor | list[int] | None, seed: int = 0) -> torch.Tensor:
    """``[n]`` int64 token ids: ``None`` = the whole vocabulary, an int = that many sampled (seeded, sorted)."""
    V = model.layout.d_vocab
    if tokens is None:
        return torch.arange(V)
    if isinstance(tokens, int):
        if not 1 <= tokens <= V:
            raise DecodeError(f"Cannot sample {tokens} tokens: pick 1..{V} (the vocabulary size), or None for all.")
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(V, generator=generator)[:tokens].sort().values
    ids = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= V:
        raise DecodeError(f"Token ids must be non-empty and within 0..{V - 1}.")
    return ids


def embed_tokens(model: "Model", ids: torch.Tensor) -> torch.Tensor:
    """``[n, d_model]`` the native embedding module's output (with the family's scale), model dtype."""
    with torch.no_grad():
        return model.module("embed")(ids.to(model.device))


def attn_input(model: "Model", layer: int, x: torch.Tensor, *, norm_input: bool = True) -> torch.Tensor:
    """``[n, d_model]`` float32: embeddings ``x`` through layer ``layer``'s pre-attention norm (if any)."""
    check_layer(layer, model.layout)
    if norm_input and model.spec.attn_norm:
        with torch.no_grad():
            x = model.module("attn_norm", layer)(x)
    return x.float()


def head_inputs(model: "Model", layer: int, ids: torch.Tensor, *, norm_input: bool = True) -> torch.Tensor:
    """``[n, d_model]`` float32: tokens as layer ``layer``'s attention reads them (module docstring)."""
    return attn_input(model, layer, embed_tokens(model, ids), norm_input=norm_input)


def _blocks(ids: torch.Tensor, size: int = TOKEN_BLOCK):
    for start in range(0, ids.numel(), size):
        yield start, ids[start : start + size]


#: Bytes of float32 scores :func:`top_and_bottom_rows` holds at once (``[rows, d_vocab]``).
SCORE_BYTES = 64 * 2**20


def score_rows(d_vocab: int) -> int:
    """Source rows per block so that their ``[rows, d_vocab]`` float32 scores fit :data:`SCORE_BYTES`."""
    return max(1, SCORE_BYTES // (4 * d_vocab))


def top_and_bottom_rows(
    left: torch.Tensor, right: torch.Tensor, k_top: int, k_bottom: int
) -> tuple[TokenRanking, TokenRanking]:
    """Exact top-``k_top`` and bottom-``k_bottom`` of ``left @ right`` (``[n, r] @ [r, V]``), one product.

    The OV logits have rank ``d_head`` (64 for SmolLM2), so the float32 product of a block
    of sources costs less than the low-precision pass of the pruned top-k would in
    ``d_model`` space (:mod:`lmatlas.decode.fast_topk`: measured 2x slower here, plus a
    token index per head). Both sides are read from the same ``[n, V]`` scores, and the
    selection is pruned by segments: the columns are cut into segments of
    :data:`SEGMENT` and ``aminmax`` gives each segment's extremes in one pass. The top-``k``
    values of a row lie in the ``k`` segments with the largest maxima (a value in any other
    segment has ``k`` segment maxima at least as large above it, so at most ties of the
    ``k``-th value are at stake), so ``topk`` runs over ``k x SEGMENT`` candidates (plus the
    last ``V mod SEGMENT`` columns) instead of ``V``; likewise the bottom with the minima.
    Top logits best first, bottom lowest first; equal logits in token-id order.
    """
    with torch.no_grad():
        scores = left @ right  # [n, V] float32
        top = _segment_topk(scores, k_top, largest=True)
        bottom = _segment_topk(scores, k_bottom, largest=False)
    return _ordered(*top, descending=True), _ordered(*bottom, descending=False)


#: Columns per segment of :func:`top_and_bottom_rows`' pruned selection.
SEGMENT = 32


def _segment_topk(scores: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, ids)`` ``[n, k]`` (unordered): the exact top-``k`` (or bottom) of each row of ``scores``."""
    n, V = scores.shape
    M = V // SEGMENT
    if M < k:  # too few segments to prune: plain top-k
        found = torch.topk(scores, k, dim=1, largest=largest, sorted=False)
        return found.values, found.indices
    seg = scores[:, : M * SEGMENT].view(n, M, SEGMENT)
    extreme = seg.amax(2) if largest else seg.amin(2)  # [n, M]
    best = torch.topk(extreme, k, dim=1, largest=largest, sorted=False).indices  # [n, k] segments
    cand = torch.gather(seg, 1, best[:, :, None].expand(n, k, SEGMENT)).reshape(n, k * SEGMENT)
    cand_ids = (best[:, :, None] * SEGMENT + torch.arange(SEGMENT, device=scores.device)).reshape(n, k * SEGMENT)
    if M * SEGMENT < V:  # the last, partial segment is always a candidate
        tail = torch.arange(M * SEGMENT, V, device=scores.device).expand(n, -1)
        cand, cand_ids = torch.cat([cand, scores[:, M * SEGMENT :]], 1), torch.cat([cand_ids, tail], 1)
    found = torch.topk(cand, k, dim=1, largest=largest, sorted=False)
    return found.values, torch.gather(cand_ids, 1, found.indices)


def _ordered(values: torch.Tensor, ids: torch.Tensor, *, descending: bool) -> TokenRanking:
    """Sort each row by value, ties by token id (a fixed order, whatever order ``topk`` returned)."""
    by_id = torch.argsort(ids, dim=1)
    values, ids = torch.gather(values, 1, by_id), torch.gather(ids, 1, by_id)
    order = torch.sort(values, dim=1, descending=descending, stable=True).indices
    return TokenRanking(torch.gather(ids, 1, order), torch.gather(values, 1, order))


# -- OV circuit ------------------------------------------------------------------------------------------
def post_norm_gain(model: "Model", layer: int, sublayer: str = "attn") -> torch.Tensor | None:
    """``[d_model]`` float32 gain of layer ``layer``'s post-``sublayer`` norm (``"attn"`` or ``"mlp"``).

    ``None`` for families without post norms; ``1 + weight`` for Gemma's offset RMS norms.
    """
    return block_norm_gain(model, check_layer(layer, model.layout), f"{sublayer}_post_norm")


def ov_write(model: "Model", layer: int, head: int) -> torch.Tensor:
    """``[d_head, d_model]`` float32: ``W_O[h]`` times the post-attention and final norm gains."""
    W_O = model.W.W_O(layer)[check_head(layer, head, model.layout)].detach().float()
    for gain in (post_norm_gain(model, layer), final_norm_gain(model)):
        if gain is not None:
            W_O = W_O * gain
    return W_O


def ov_left(model: "Model", layer: int, head: int, sources: torch.Tensor, *, norm_input: bool = True) -> torch.Tensor:
    """``[n, d_head]`` float32 ``x_s @ W_V[kv] + b_V[kv]``: the head's value vector for each source token."""
    check_head(layer, head, model.layout)
    kv = model.layout.kv_head(head)
    left = head_inputs(model, layer, sources, norm_input=norm_input) @ model.W.W_V(layer)[kv].detach().float()
    b_V = model.W.b_V(layer)
    return left if b_V is None else left + b_V[kv].detach().float()


def ov_right(model: "Model", layer: int, head: int) -> torch.Tensor:
    """``[d_head, d_vocab]`` float32 ``W_O[h] * gains @ W_U``: the logits each value dimension writes."""
    check_head(layer, head, model.layout)
    with torch.no_grad():
        return ov_write(model, layer, head) @ unembed_matrix(model).float()


def ov_factors(
    model: "Model", layer: int, head: int, sources: torch.Tensor, *, norm_input: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left [n, d_head], right [d_head, d_vocab])`` float32 with ``left @ right`` = the OV logits.

    Row ``i`` of the product is what head ``head`` adds to the logits when it
    attends (with weight 1) to token ``sources[i]``. ``right`` is ``d_head x d_vocab``
    floats (a few MB for SmolLM2); multiply block by block, never for the whole vocabulary.
    """
    return ov_left(model, layer, head, sources, norm_input=norm_input), ov_right(model, layer, head)


@dataclass
class OVDecoding:
    """What one head's OV circuit writes for each source token.

    Attributes:
        layer, head, kv_head: the query head and the KV head it reads.
        sources: ``[n]`` source token ids.
        top / bottom: ``[n, k]`` the output tokens each source promotes / suppresses most.
        pairs: the ``n_pairs`` (source id, output id, logit) with the largest logits overall.
        copying: fraction of sources whose own token is in their top-``k``.
        suppression: fraction of sources whose own token is in their bottom-``k``.
    """

    layer: int
    head: int
    kv_head: int
    sources: torch.Tensor
    top: TokenRanking
    bottom: TokenRanking
    pairs: list[tuple[int, int, float]]
    copying: float
    suppression: float

    @property
    def name(self) -> str:
        return head_name(self.layer, self.head)

    def to_dict(self, tokenizer: Any = None, rows: int = 20) -> dict[str, Any]:
        """JSON-ready summary: scores, top pairs and the first ``rows`` sources' top/bottom tokens."""
        decode = (lambda ids: TokenRanking.tokens_of(ids, tokenizer)) if tokenizer is not None else (lambda ids: ids)
        pair_src = decode([p[0] for p in self.pairs]) if self.pairs else []
        pair_out = decode([p[1] for p in self.pairs]) if self.pairs else []
        shown = self.sources[:rows].tolist()
        return {
            "head": self.name,
            "kv_head": self.kv_head,
            "n_sources": int(self.sources.numel()),
            "k": int(self.top.ids.shape[1]),
            "copying": self.copying,
            "suppression": self.suppression,
            "pairs": [{"source": s, "output": o, "logit": p[2]} for s, o, p in zip(pair_src, pair_out, self.pairs)],
            "sources": [
                {"source": src, "top": decode(self.top.ids[i].tolist()), "bottom": decode(self.bottom.ids[i].tolist())}
                for i, src in enumerate(decode(shown))
            ],
        }


def _own_in(ranking: TokenRanking, sources: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: is each source's own id in its ranking row?"""
    return (ranking.ids == sources.to(ranking.ids.device)[:, None]).any(1)


def decode_ov(
    model: "Model",
    layer: int,
    head: int,
    *,
    sources: int | torch.Tensor | list[int] | None = None,
    k: int = 10,
    n_pairs: int = 20,
    norm_input: bool = True,
    seed: int = 0,
    chunk: int = 8192,
) -> OVDecoding:
    """Decode one head's OV circuit over ``sources`` (default: the whole vocabulary, in blocks).

    Cost: ``d_head x d_vocab x (d_model + n_sources)`` multiply-adds: ``right`` once, then
    one product per block of sources that serves both the top and the bottom
    (:func:`top_and_bottom_rows`; ``chunk`` is kept for compatibility and unused).
    ``pairs`` are exact: a pair among the ``n_pairs`` best overall is among its
    source's ``n_pairs`` best, so each source keeps ``max(k, n_pairs)`` candidates.
    """
    _check_k(model, k)
    ids = token_ids(model, sources, seed)
    keep = min(max(k, n_pairs), model.layout.d_vocab)
    right = ov_right(model, layer, head)
    tops, bottoms = [], []
    for _, block in _blocks(ids, score_rows(model.layout.d_vocab)):
        left = ov_left(model, layer, head, block, norm_input=norm_input)
        top, bottom = top_and_bottom_rows(left, right, keep, k)
        tops.append(top)
        bottoms.append(bottom)
    top = TokenRanking(torch.cat([t.ids for t in tops]), torch.cat([t.logits for t in tops]))
    bottom = TokenRanking(torch.cat([b.ids for b in bottoms]), torch.cat([b.logits for b in bottoms]))
    flat = top.logits.reshape(-1)
    best = torch.topk(flat, min(n_pairs, flat.numel())).indices if n_pairs > 0 else flat.new_empty(0).long()
    pairs = [(int(ids[i // keep]), int(top.ids.reshape(-1)[i]), float(flat[i])) for i in best.tolist()]
    top = TokenRanking(top.ids[:, :k].contiguous(), top.logits[:, :k].contiguous())
    return OVDecoding(
        layer=layer,
        head=head,
        kv_head=model.layout.kv_head(head),
        sources=ids,
        top=top,
        bottom=bottom,
        pairs=pairs,
        copying=float(_own_in(top, ids).double().mean()),
        suppression=float(_own_in(bottom, ids).double().mean()),
    )


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
