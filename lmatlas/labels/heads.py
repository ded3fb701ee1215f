"""Attention rules for heads: where each query attends, predicted from the tokens, scored by mass explained.

A rule maps the tokens of a window ``[pos]`` to a key mask ``[query, key]`` (causal: key
<= query); a head's **explained attention** under the rule is the mean, over the queries
where the rule names at least one key (and ``query >= MIN_QUERY``), of the attention mass
on the named keys. Rules (:data:`RULES`):

==============  =====================================================================
rule            keys named for query q
==============  =====================================================================
previous        q - 1
near_previous   q - 2, q - 1 and q (the previous token or a neighbour of it)
two_back        q - 2
self            q
first           0 (the first token: BOS, or the attention sink)
induction       k with token[k - 1] == token[q], k <= q (after an earlier copy of q's token)
duplicate       k < q with token[k] == token[q] (earlier copies of q's token)
delimiter       k <= q whose token is punctuation or holds a newline
last_delimiter  the last k < q whose token is punctuation or holds a newline
line_start      the first token of q's line (after the last newline before q)
==============  =====================================================================

and each rule "or the first token" (``induction+first``: attention parked on the sink when
there is nothing to do is part of many heads' rule). A rule that contains narrower rules (a
composite contains its two parts; ``near_previous`` contains ``previous``, ``two_back`` and
``self``: :data:`CONTAINS`) is kept only when it explains at least ``COMPOSITE_GAIN`` more than
each of them on the fit split, so a sharp previous-token head keeps the sharp rule.
``near_previous`` is there because the previous-token heads of real models are not sharp: on
SmolLM2's corpus text their largest single key holds 62-77% of a query's attention and the
rest sits on the current token and the one two back.

The head's rule is the one with the largest **lift** on the fit windows: explained
attention less the **uniform null** (the mass the rule's keys would get if the head spread
its attention evenly), so a rule naming many keys gains nothing from its size. On the
held-out windows it is scored against that null and the **same-shape null**: the median,
over the other heads of the same layer, of the attention the same rule explains for them. A head is
labelled when the lower bound of its explained attention (95% window bootstrap) beats
both nulls and it explains at least ``MIN_EXPLAINED``; otherwise it is "unlabelled". A rule
whose lower bound reaches ``SHARED`` (80% of the head's attention) labels the head even when
other heads of its layer share it (every layer-1 head of a two-layer induction model is an
induction head): the claim is about this head, and the sentence shows the layer's null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmatlas.labels import scores

MIN_QUERY = 4
MIN_EXPLAINED = 0.3
SHARED = 0.8
COMPOSITE_GAIN = 0.1

#: The narrower rules each broader base rule contains (composites add ``X+first`` -> ``X``, ``first``).
CONTAINS: dict[str, tuple[str, ...]] = {"near_previous": ("previous", "two_back", "self")}

RULES: dict[str, str] = {
    "previous": "the previous token (previous-token head)",
    "near_previous": "the previous token or a token beside it (q-2 .. q; a blurred previous-token head)",
    "two_back": "the token two positions back",
    "self": "the current token itself",
    "first": "the first token (BOS / attention sink)",
    "induction": "the token after an earlier copy of the current token (induction)",
    "duplicate": "earlier copies of the current token (duplicate token)",
    "delimiter": "delimiters (punctuation and newlines)",
    "last_delimiter": "the most recent delimiter",
    "line_start": "the first token of the line",
}


def contained(name: str) -> list[str]:
    """The narrower rules ``name`` contains: ``"near_previous+first"`` -> ``near_previous``, ``first``,
    ``previous``, ``previous+first``, ..."""
    base, plus, extra = name.partition("+")
    inner = list(CONTAINS.get(base, ()))
    if not plus:
        return inner
    return [base, extra] + inner + [f"{n}+{extra}" for n in inner]


def _is_delimiter(piece: str) -> bool:
    stripped = piece.strip()
    return "\n" in piece or (bool(stripped) and all(not c.isalnum() and not c.isspace() for c in stripped))


@dataclass(frozen=True)
class RuleSet:
    """The rules of :data:`RULES` over windows ``[window, pos]``, precomputed once for every layer.

    ``single[rule]``: ``[window, query]`` the one key the rule names (``-1``: none), for the
    rules naming one key; ``multi[rule]``: ``[window, query, key]`` float masks for the others.
    ``where``, ``uniform`` and ``has_first`` (``[window, query]``) per rule, composites
    included: the queries it speaks about, the mass even attention puts on its keys, and
    whether its keys already include key 0.
    """

    single: dict[str, torch.Tensor]
    multi: dict[str, torch.Tensor]
    where: dict[str, torch.Tensor]
    uniform: dict[str, torch.Tensor]
    has_first: dict[str, torch.Tensor]

    def rows(self, index) -> "RuleSet":
        """The same rules for the windows ``index`` (a slice or a mask)."""
        pick = lambda d: {k: v[index] for k, v in d.items()}  # noqa: E731
        return RuleSet(pick(self.single), pick(self.multi), pick(self.where), pick(self.uniform), pick(self.has_first))

    @property
    def names(self) -> list[str]:
        return list(self.where)


def rule_set(tokens: torch.Tensor, text: Callable[[list[int]], list[str]]) -> RuleSet:
    """Every rule (and its ``+first`` composite) over the windows ``tokens [window, pos]``."""
    masks = _masks(tokens, text)
    length = tokens.shape[1]
    q = torch.arange(length)
    single, multi, where, uniform, has_first = {}, {}, {}, {}, {}
    for name, mask in masks.items():
        count = mask.sum(-1)  # [w, q]
        if name in ("induction", "duplicate", "delimiter", "near_previous"):
            multi[name] = mask.float()
        else:
            single[name] = torch.where(count > 0, mask.float().argmax(-1), torch.full_like(count, -1))
        where[name] = (count > 0) & (q[None, :] >= MIN_QUERY)
        uniform[name] = count / (q[None, :] + 1)
        has_first[name] = mask[..., 0]
        if name != "first":  # the composite speaks where its rule does; key 0 joins the keys
            composite = f"{name}+first"
            where[composite], has_first[composite] = where[name], mask[..., 0]
            uniform[composite] = (count + (~mask[..., 0]).long()) / (q[None, :] + 1)
    return RuleSet(single, multi, where, uniform, has_first)


def _masks(tokens: torch.Tensor, text: Callable[[list[int]], list[str]]) -> dict[str, torch.Tensor]:
    """``{rule: [window, query, key] bool}`` for the base rules of :data:`RULES`."""
    windows, length = tokens.shape
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    causal = (k <= q).expand(windows, -1, -1)
    vocab = sorted(set(tokens.flatten().tolist()))
    spelled = dict(zip(vocab, text(vocab)))
    delim = torch.tensor([[_is_delimiter(spelled[t]) for t in row] for row in tokens.tolist()])  # [w, pos]
    newline = torch.tensor([["\n" in spelled[t] for t in row] for row in tokens.tolist()])
    same = tokens[:, :, None] == tokens[:, None, :]  # [w, q, k]
    after_copy = torch.zeros_like(same)
    after_copy[:, :, 1:] = same[:, :, :-1]
    position = torch.arange(length).expand(windows, -1)
    last_delim = _last_before(delim, position)  # [w, q]: last delimiter strictly before q, -1 if none
    last_newline = _last_before(newline, position)
    line_start = last_newline + 1  # the first token after the last newline before q
    return {
        "previous": (k == q - 1).expand(windows, -1, -1),
        "near_previous": ((k >= q - 2) & (k <= q)).expand(windows, -1, -1),
        "two_back": (k == q - 2).expand(windows, -1, -1),
        "self": (k == q).expand(windows, -1, -1),
        "first": ((k == 0) & (q >= 0)).expand(windows, -1, -1),
        "induction": after_copy & causal,
        "duplicate": same & (k < q),
        "delimiter": delim[:, None, :] & causal,
        "last_delimiter": (k == last_delim[:, :, None]) & (last_delim[:, :, None] >= 0),
        "line_start": (k == line_start[:, :, None]) & (last_newline[:, :, None] >= 0) & causal,
    }


def _last_before(flags: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """``[w, q]``: the last position ``< q`` where ``flags [w, pos]`` holds, -1 if none."""
    marked = torch.where(flags, position, torch.full_like(position, -1))
    running = torch.cummax(marked, dim=1).values
    return torch.cat([torch.full_like(running[:, :1], -1), running[:, :-1]], 1)


def explained_sums(patterns: torch.Tensor, rules: RuleSet) -> dict[str, torch.Tensor]:
    """``{rule: [window, head]}`` explained mass summed over the queries the rule speaks about.

    ``patterns [window, head, query, key]`` of one layer. Also ``rule + "#n"`` (``[window]``:
    how many queries) and ``rule + "#uniform"`` (``[window]``: the summed mass of even
    attention over ``0..q`` on the rule's keys), so ratios pool over any set of windows.
    """
    mass: dict[str, torch.Tensor] = {}
    for name, key in rules.single.items():
        index = key.clamp_min(0)[:, None, :, None].expand(-1, patterns.shape[1], -1, 1)
        mass[name] = patterns.gather(-1, index)[..., 0] * (key >= 0)[:, None, :]  # [w, h, q]
    for name, mask in rules.multi.items():
        mass[name] = (patterns * mask[:, None]).sum(-1)
    first = patterns[..., 0]
    for name in list(mass):
        if name != "first":
            mass[f"{name}+first"] = mass[name] + first * (~rules.has_first[f"{name}+first"])[:, None, :]
    out: dict[str, torch.Tensor] = {}
    for name, value in mass.items():
        where = rules.where[name]
        out[name] = (value * where[:, None, :]).sum(-1)
        out[f"{name}#n"] = where.sum(-1).to(patterns.dtype)
        out[f"{name}#uniform"] = (rules.uniform[name] * where).sum(-1).to(patterns.dtype)
    return out


@dataclass(frozen=True)
class HeadLabel:
    """One head's best attention rule and its held-out scores (fractions of attention mass)."""

    layer: int
    head: int
    rule: str
    explained: float
    explained_lo: float
    explained_hi: float
    null_layer: float
    null_uniform: float
    n_queries: int
    labelled: bool
    by_rule: dict[str, float]


def _ratio(sums: dict[str, torch.Tensor], name: str, w: torch.Tensor) -> torch.Tensor:
    """``[b, head]``: explained attention under window weights ``w [b, window]``."""
    return (w @ sums[name]) / (w @ sums[f"{name}#n"])[:, None].clamp_min(1e-9)


def _median_others(values: torch.Tensor) -> torch.Tensor:
    """``[head]``: the median of the other heads' values (the same-shape null)."""
    heads = values.shape[0]
    if heads == 1:
        return torch.full_like(values, float("nan"))
    others = values[None, :].expand(heads, -1)[~torch.eye(heads, dtype=torch.bool)].view(heads, heads - 1)
    return others.median(1).values


def label_heads(
    layer: int, fit: dict[str, torch.Tensor], held: dict[str, torch.Tensor], seed: int = 0
) -> list[HeadLabel]:
    """Each head's rule, fitted on the ``fit`` sums and scored on the ``held`` sums (:func:`explained_sums`)."""
    names = [n for n in fit if "#" not in n]
    one = torch.ones(1, next(iter(fit.values())).shape[0], dtype=fit[names[0]].dtype)
    fit_explained = {n: _ratio(fit, n, one)[0] for n in names}
    lift = {}
    for name in names:
        uniform = float((fit[f"{name}#uniform"].sum() / fit[f"{name}#n"].sum().clamp_min(1e-9)))
        lift[name] = fit_explained[name] - uniform
        if float(fit[f"{name}#n"].sum()) == 0:  # the rule never speaks on the fit windows
            lift[name] = torch.full_like(lift[name], float("-inf"))
        else:  # a broader rule must add real mass over every narrower rule it contains
            parts = [fit_explained[p] for p in contained(name) if p in fit_explained]
            if parts:
                weak = fit_explained[name] < torch.stack(parts).max(0).values + COMPOSITE_GAIN
                lift[name] = torch.where(weak, torch.full_like(lift[name], float("-inf")), lift[name])
    stacked = torch.stack([lift[n] for n in names]).nan_to_num(float("-inf"))
    best = stacked.argmax(0)  # [head]
    held_windows = next(iter(held.values())).shape[0]
    weight = scores.window_weights(held_windows, scores.BOOTSTRAP, seed + layer).to(held[names[0]].dtype)
    ones = torch.ones(1, held_windows, dtype=weight.dtype)
    held_explained = {n: _ratio(held, n, ones)[0] for n in names}
    labels = []
    for head, index in enumerate(best.tolist()):
        name = names[index]
        value = float(held_explained[name][head])
        lo, hi = (float(x) for x in scores.interval(_ratio(held, name, weight)[:, head : head + 1]))
        null_layer = float(_median_others(held_explained[name])[head])
        n = int(held[f"{name}#n"].sum())
        null_uniform = float(held[f"{name}#uniform"].sum()) / max(n, 1)
        beats_layer = lo > null_layer or lo >= SHARED or null_layer != null_layer
        labelled = n > 0 and lo > null_uniform and beats_layer and value >= MIN_EXPLAINED
        by_rule = {r: round(float(held_explained[r][head]), 4) for r in names}
        labels.append(HeadLabel(layer, head, name, value, lo, hi, null_layer, null_uniform, n, labelled, by_rule))
    return labels
