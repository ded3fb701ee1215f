"""Why a head attends where it does: its attention score split over the upstream nodes that wrote it.

For head ``L5.H3`` on one prompt, the score of query position ``i`` on key position ``j``
is ``a = scale * q_i . k_j`` (the softmax's input, before any softcap). The stream the
head reads is the sum of upstream writes: ``x = embed + sum heads + sum MLPs + biases``
(``w_u``, :mod:`lmatlas.model.hooks`' per-head ``attn.out``). With the pre-attention
norm's scale **frozen at this pass**, the map ``x -> q`` (norm, projection, rotary) is
affine, ``q = q_b + L(x)``, so

    ``a = scale * (q_b + sum_u L(w_u)) . k_j``      (query side)
    ``a = scale * q_i . (k_b + sum_u L(w_u))``      (key side)

``L`` is taken from the model itself: ``L(w) = J w + (q - q_b) (c(x) . c(w)) / (|c(x)|^2 +
d eps)``, with ``J`` the Jacobian-vector product of ``resid.pre -> attn.q`` (autograd),
``c`` the centring of a LayerNorm (identity for RMS), ``q_b`` the queries of a zero stream,
and the last factor fixed by ``L(x) = q - q_b`` (no norm internals needed). For pre-norm
families this is exactly the norm with its scale frozen; for families with q/k norms
(Qwen 3, Gemma 3, OLMo-2) the second norm is linearised at this pass instead of frozen,
so there the split is first-order (it still sums to the score). ``rest`` reports the
zero stream's part (``query_bias``: projection bias, LayerNorm bias), the part of earlier
layers' attention-output biases (``query_from_attention_biases``) and the exact
remainder (float error).

The value side says which writes the head moves: its write at ``i`` is
``sum_j A_ij v_j W_O``, and each source's share is the projection of its part on the
whole (``sum_u share_u + bias + remainder = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.causal.edge_scores import _jvp
from lmatlas.errors import SiteError
from lmatlas.model.sites import parse_head

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass
class AttentionSources:
    """One head's score on one (query, key) pair, split over upstream writes (see the module docstring)."""

    head: str
    kv_group: int
    query_pos: int
    key_pos: int
    tokens: list[str]
    score: float
    probability: float
    pattern: list[float]  # the head's attention at query_pos over keys 0..query_pos
    scores: list[float]  # its logits scale * q . k_j over keys 0..query_pos (before any softcap or window)
    query_side: dict[str, float]  # source -> contribution to the score (largest |.| first)
    key_side: dict[str, float]
    value_side: dict[str, float]  # source -> share of the head's write at query_pos
    rest: dict[str, float] = field(default_factory=dict)  # biases and remainders of each side
    key_side_by_key: dict[str, list[float]] = field(default_factory=dict)  # source -> its key-side part per key

    def top(self, side: str, k: int = 5) -> list[tuple[str, float]]:
        values = getattr(self, f"{side}_side")
        return sorted(values.items(), key=lambda kv: -abs(kv[1]))[:k]

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "kv_group": self.kv_group,
            "query_pos": self.query_pos,
            "key_pos": self.key_pos,
            "tokens": self.tokens,
            "score": self.score,
            "probability": self.probability,
            "pattern": self.pattern,
            "scores": self.scores,
            "key_side_by_key": self.key_side_by_key,
            "query_side": [{"source": s, "contribution": v} for s, v in self.top("query", 10**6)],
            "key_side": [{"source": s, "contribution": v} for s, v in self.top("key", 10**6)],
            "value_side": [{"source": s, "share": v} for s, v in self.top("value", 10**6)],
            "rest": self.rest,
        }


def _upstream(model: "Model", cache, layer: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``(names, writes [S, pos, d_model], biases [pos, d_model])`` of everything written before ``layer``."""
    names, parts = ["embed"], [cache["L0.resid.pre"][0]]
    bias = torch.zeros_like(parts[0])
    for i in range(layer):
        heads = cache[f"L{i}.attn.out"][0]  # [pos, head, d_model]
        names += [f"L{i}.H{h}" for h in range(heads.shape[1])] + [f"L{i}.mlp"]
        parts += list(heads.unbind(1)) + [cache[f"L{i}.mlp.out"][0]]
        extra = cache.extras.get(f"L{i}.attn.bias")
        if extra is not None:
            bias = bias + (extra[0] if extra.dim() == 3 else extra)
    return names, torch.stack(parts).detach(), bias.detach()


def _frozen(
    model: "Model", output: torch.Tensor, pre: torch.Tensor, at_zero: torch.Tensor, tangents: torch.Tensor
) -> torch.Tensor:
    """``L(w)`` ``[n, pos, n_heads, d_head]`` for each ``w`` in ``tangents`` ``[n, pos, d_model]`` (batch 1)."""
    centre = model.spec.norm_kind.centres
    x = pre.detach()[0]
    c = (lambda v: v - v.mean(-1, keepdim=True)) if centre else (lambda v: v)
    full = torch.cat([tangents, x.unsqueeze(0)]).unsqueeze(1).to(pre.dtype)  # the last tangent is x itself
    moved = _jvp(output, pre, full)[:, 0].float()  # [n + 1, pos, heads, d_head]
    shift = (output.detach()[0] - at_zero[0]).float()  # L(x) = q - q_b
    gap = shift - moved[-1]  # = shift * kappa * |c(x)|^2, one kappa per position
    kappa = (
        (gap * shift).sum((-1, -2))
        / (shift * shift).sum((-1, -2)).clamp_min(1e-30)
        / c(x.float()).pow(2).sum(-1).clamp_min(1e-30)
    )  # [pos]
    dots = (c(tangents.float()) * c(x.float())).sum(-1)  # [n, pos]
    return moved[:-1] + shift * (kappa * dots)[..., None, None]


def _check(model: "Model", n: int, query_pos: int, key_pos: int | None) -> tuple[int, int | None]:
    q = query_pos + n if query_pos < 0 else query_pos
    if not 0 <= q < n:
        raise SiteError(f"Query position {query_pos} is outside the prompt ({n} tokens: 0..{n - 1} or -{n}..-1).")
    if key_pos is None:
        return q, None
    k = key_pos + n if key_pos < 0 else key_pos
    if not 0 <= k <= q:
        raise SiteError(f"Key position {key_pos} is outside what position {q} attends to (0..{q}).")
    return q, k


def _scale(model: "Model") -> float:
    """The factor of ``q . k`` in the attention logit (``d_head ** -0.5``, or Gemma's query scalar)."""
    scalar = getattr(model.hf.config, "query_pre_attn_scalar", None)
    return model.layout.d_head**-0.5 if scalar is None else float(scalar) ** -0.5


def attention_sources(
    model: "Model", head: str, prompt: Any, *, query_pos: int = -1, key_pos: int | None = None
) -> AttentionSources:
    """Split ``head``'s attention score at (``query_pos``, ``key_pos``) over upstream writes.

    ``key_pos`` defaults to the key the head attends to most. ``prompt`` is one text or
    ``[1, pos]`` token ids.
    """
    layer, h = parse_head(head, model.layout)
    ids = model.tokenize(prompt)["input_ids"]
    if ids.shape[0] != 1:
        raise SiteError(f"attention_sources explains one prompt at a time, got {ids.shape[0]}.")
    q_pos, k_pos = _check(model, ids.shape[1], query_pos, key_pos)
    g = model.layout.kv_head(h)
    here = [f"L{layer}.{c}" for c in ("resid.pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.out")]
    earlier = [f"L{i}.{c}" for i in range(layer) for c in ("attn.out", "mlp.out")]
    cache = model.run(ids, capture=["L0.resid.pre", *here, *earlier], grad=True)
    zero = model.run(
        ids, capture=[f"L{layer}.attn.q", f"L{layer}.attn.k", f"L{layer}.attn.v"], replace={f"L{layer}.resid.pre": 0.0}
    )
    pattern = cache[f"L{layer}.attn.pattern"][0, h, q_pos].detach().float()
    k_pos = int(pattern[: q_pos + 1].argmax()) if k_pos is None else k_pos
    names, writes, bias = _upstream(model, cache, layer)
    tangents = torch.cat([writes, bias.unsqueeze(0)])
    pre = cache[f"L{layer}.resid.pre"]
    parts = {
        p: _frozen(model, cache[f"L{layer}.attn.{p}"], pre, zero[f"L{layer}.attn.{p}"], tangents)
        for p in ("q", "k", "v")
    }
    q = cache[f"L{layer}.attn.q"][0, q_pos, h].detach().float()
    k = cache[f"L{layer}.attn.k"][0, k_pos, g].detach().float()
    scale = _scale(model)
    score = float(scale * q @ k)
    on_q = scale * parts["q"][:, q_pos, h] @ k  # [S + 1]
    on_k = scale * parts["k"][:, k_pos, g] @ q
    by_key = scale * parts["k"][:, : q_pos + 1, g] @ q  # [S + 1, keys]: the row of logits, key side
    row = scale * cache[f"L{layer}.attn.k"][0, : q_pos + 1, g].detach().float() @ q
    q_b = zero[f"L{layer}.attn.q"][0, q_pos, h].float()
    k_b = zero[f"L{layer}.attn.k"][0, k_pos, g].float()
    rest = {
        "query_bias": float(scale * q_b @ k),
        "query_from_attention_biases": float(on_q[-1]),
        "query_remainder": score - float(scale * q_b @ k) - float(on_q.sum()),
        "key_bias": float(scale * q @ k_b),
        "key_from_attention_biases": float(on_k[-1]),
        "key_remainder": score - float(scale * q @ k_b) - float(on_k.sum()),
    }
    value, value_rest = _value_shares(model, cache, parts["v"], zero, layer, h, q_pos, names)
    tokens = [str(t) for t in ids[0].tolist()]
    if model.tokenizer is not None:
        tokens = model.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    return AttentionSources(
        head=f"L{layer}.H{h}",
        kv_group=g,
        query_pos=q_pos,
        key_pos=k_pos,
        tokens=tokens,
        score=score,
        probability=float(pattern[k_pos]),
        pattern=pattern[: q_pos + 1].tolist(),
        scores=row.tolist(),
        key_side_by_key=dict(zip(names, by_key[:-1].tolist())),
        query_side=dict(zip(names, on_q[:-1].tolist())),
        key_side=dict(zip(names, on_k[:-1].tolist())),
        value_side=value,
        rest={**rest, **value_rest},
    )


def _value_shares(model, cache, moved_v, zero, layer, h, q_pos, names) -> tuple[dict[str, float], dict[str, float]]:
    """Each source's share of the head's write at ``q_pos``: ``<sum_j A_ij L(w_u)_j W_O, write> / |write|^2``
    (a post-attention norm is taken as one scale factor: the value remainder shows what that misses)."""
    g = model.layout.kv_head(h)
    attention = cache[f"L{layer}.attn.pattern"][0, h, q_pos].detach().float()  # [key_pos]
    w_o = model.W.W_O(layer)[h].detach().float()  # [d_head, d_model]
    write = cache[f"L{layer}.attn.out"][0, q_pos, h].detach().float()
    raw = attention @ cache[f"L{layer}.attn.v"][0, :, g].detach().float() @ w_o  # the write before any post-norm
    scale = write.norm() / raw.norm().clamp_min(1e-30)
    per_source = torch.einsum("k,skd,dm->sm", attention, moved_v[:, :, g], w_o) * scale  # [S + 1, d_model]
    norm2 = float(write @ write) or 1.0
    shares = (per_source @ write / norm2).tolist()
    v_b = zero[f"L{layer}.attn.v"][0, :, g].float()
    bias_share = float((attention @ v_b @ w_o) * scale @ write / norm2)
    rest = {
        "value_bias": bias_share,
        "value_from_attention_biases": shares[-1],
        "value_remainder": 1.0 - bias_share - sum(shares),
    }
    return dict(zip(names, shares[:-1])), rest
