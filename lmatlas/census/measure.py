"""One forward over a battery, reduced to the per-head numbers the detectors score.

Most head behaviours are a reduction of the attention pattern over key positions:
the mass a query puts on the first key (a sink), on the key ``d`` positions back
(``d = 1``: the previous token; ``d = half``: the earlier copy of the current token
in a repeated sequence). :func:`readout` runs one forward with a function on
``attn.pattern`` of every layer that keeps only these reductions (the
``[batch, head, pos, key_pos]`` pattern of one layer lives only inside the call), and
optionally a function on ``attn.out`` for

* ``norms``: each head's output norm ``||attn.out||`` per position;
* ``copy``: each head's *copying rank*. At query ``q`` the copy target is the token at
  ``q - half + 1`` (what an induction head attends to; it equals the next token in a
  repeated sequence). The head's direct logit effect on a token ``t`` is
  ``out_h(q) . R[:, t]`` with ``R = diag(gain) @ W_U`` the final norm (its positive
  per-position scale dropped, centring kept for LayerNorm) followed by the unembedding
  (a monotone final softcap is ignored). The rank is the fraction of the row's
  ``N_COMPARE`` reference tokens (``meta["compare"]``) whose effect is below the
  target's (ties count half): ``~0.5`` for a head that does not copy, ``1.0`` for one
  that raises the token it attends to above every other;
* ``suppression``: the copy-suppression hit test at the same queries
  (:class:`lmatlas.census.suppression.SuppressionHits`, the ``copy_suppression`` detector).

The forward skips the LM head (``model.run(..., lm_head=False)``) and ends as soon as the last
layer's reductions are done (:func:`run_to_last`): the last block's MLP (and, when nothing reads
``attn.out``, its attention kernel) would feed only the LM head. Inside :func:`shared` readouts
are memoised by battery content, so detectors that use the same kind of battery share
one forward; the battery's ``meta["measure"]`` names what every user of that kind needs,
and a shared forward computes all of it.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from lmatlas.census.registry import Battery
from lmatlas.census.suppression import SuppressionHits, at_queries
from lmatlas.model.norms import final_readout

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

_PARTS = ("copy", "norm", "suppression")  #: the optional parts of a :class:`Readout`
WINDOW = 8  #: offsets ``0 .. WINDOW - 1`` (the recent window) are always measured
BATCH = 16  #: rows per forward

#: Readouts memoised inside :func:`shared`, per thread / async context (never shared between requests).
_MEMO: ContextVar[dict | None] = ContextVar("lmatlas_census_readout_memo", default=None)


@dataclass
class Readout:
    """Per-head reductions of one battery's forward; tensors are float32 on the CPU.

    Attributes:
        sink: ``[layer, batch, head, pos]`` attention mass on key position 0.
        offsets: ``d -> [layer, batch, head, pos]`` mass on key ``pos - d`` (0 where ``pos < d``).
        copy: ``[layer, batch, head, n_queries]`` copying rank at ``copy_queries`` (or ``None``).
        copy_queries: ``[n_queries]`` the query positions of ``copy`` (the second half).
        norm: ``[layer, batch, head, pos]`` norm of each head's write ``attn.out`` (or ``None``).
        suppression: ``[batch, layer, head, n_queries]`` bool copy-suppression hits at ``copy_queries``
            (or ``None``).
    """

    sink: torch.Tensor
    offsets: dict[int, torch.Tensor]
    copy: torch.Tensor | None = None
    copy_queries: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    suppression: torch.Tensor | None = None

    def has(self, offsets: Iterable[int], parts: Iterable[str]) -> bool:
        return set(offsets) <= set(self.offsets) and all(getattr(self, p) is not None for p in parts)


@contextmanager
def shared(memo: dict | None = None) -> Iterator[None]:
    """Memoise readouts by battery content for the duration of the block (used by ``run_census``).

    ``memo``: a dict to keep them in beyond the block (the atlas's census stage passes one per
    build, so that its units, one detector each, share the forwards of their common batteries).
    Inside an active block without a ``memo`` of its own, the outer memo stays in force.
    """
    if memo is None and _MEMO.get() is not None:
        yield
        return
    token = _MEMO.set({} if memo is None else memo)
    try:
        yield
    finally:
        _MEMO.reset(token)


def active_memo() -> dict | None:
    """The memo of the enclosing :func:`shared` block (``None`` outside one): other shared passes keep theirs here."""
    return _MEMO.get()


def content_key(model: "Model", battery: Battery) -> tuple:
    """What identifies a battery's forward: the model, the ids' shape and a hash of the ids (and ``compare``)."""
    return _content_key(model, battery)


def _content_key(model: "Model", battery: Battery) -> tuple:
    digest = hashlib.sha1(battery.input_ids.detach().cpu().numpy().tobytes())
    compare = battery.meta.get("compare")
    if compare is not None:
        digest.update(compare.detach().cpu().numpy().tobytes())
    return id(model), tuple(battery.input_ids.shape), digest.hexdigest()


def readout(
    model: "Model",
    battery: Battery,
    *,
    copy: bool = False,
    norms: bool = False,
    suppression: bool = False,
    offsets: Iterable[int] = (),
) -> Readout:
    """Run ``battery`` once and reduce it (see the module docstring); memoised inside :func:`shared`.

    Args:
        copy: compute copying ranks (needs ``meta["half"]`` and ``meta["compare"]``).
        norms: compute head output norms.
        suppression: compute copy-suppression hits (needs ``meta["half"]``, ``meta["prefix"]``, ``meta["compare"]``).
        offsets: extra key offsets to measure besides ``0 .. WINDOW - 1``.
    """
    parts = [name for name, wanted in (("copy", copy), ("norm", norms), ("suppression", suppression)) if wanted]
    wanted_offsets = set(range(WINDOW)) | {int(d) for d in offsets}
    memo = _MEMO.get()
    if memo is None:
        return _forward(model, battery, wanted_offsets, parts)
    key = _content_key(model, battery)
    hit = memo.get(key)
    if hit is not None and hit.has(wanted_offsets, parts):
        return hit
    declared = {"copy": "copy", "norms": "norm", "suppression": "suppression"}
    parts = sorted(set(parts) | {declared[m] for m in battery.meta.get("measure", ())})
    if "half" in battery.meta:
        wanted_offsets |= {battery.meta["half"] - 1, battery.meta["half"]}
    if hit is not None:
        wanted_offsets |= set(hit.offsets)
        parts = sorted(set(parts) | {p for p in _PARTS if getattr(hit, p) is not None})
    memo[key] = result = _forward(model, battery, wanted_offsets, parts)
    return result


class _CopyRanks:
    """The copying rank of the module docstring, one layer at a time (``ranks``: ``[layer, batch, head, n_q]``).

    The unembedding rows of each chunk's copy targets and reference tokens do not depend on the
    layer: :meth:`chunk` gathers them once per forward, :meth:`reduce` uses them at every layer.
    """

    def __init__(self, model: "Model", battery: Battery, queries: torch.Tensor):
        lay = model.layout
        self.queries, self.half = queries, battery.meta["half"]
        self.ranks = torch.zeros(lay.n_layers, battery.n_examples, lay.n_heads, len(queries))
        self.gain, self.centres = final_readout(model)
        self.unembed = model.module("unembed").weight  # [d_vocab, d_model]
        self.compare_all = battery.meta["compare"]

    def chunk(self, ids: torch.Tensor, rows: slice) -> None:
        """``ids`` ``[batch, pos]``: the battery's ``rows`` about to run."""
        self.rows = rows
        self.target = self.unembed[ids[:, self.queries.to(ids.device) - (self.half - 1)]].float()  # [batch, q, d]
        self.compare = self.unembed[self.compare_all[rows]].float()  # [batch, n_compare, d_model]

    def reduce(self, o: torch.Tensor, layer: int) -> None:
        """``o`` ``[batch, n_q, head, d_model]`` (:func:`~lmatlas.census.suppression.at_queries` of ``attn.out``)."""
        if self.centres:
            o = o - o.mean(-1, keepdim=True)
        o = o * self.gain
        effect = torch.einsum("bqhm,bqm->bqh", o, self.target)[..., None]
        others = torch.einsum("bqhm,bkm->bqhk", o, self.compare)
        rank = (others < effect).float().mean(-1) + 0.5 * (others == effect).float().mean(-1)
        self.ranks[layer, self.rows] = rank.transpose(1, 2).cpu()


def _forward(model: "Model", battery: Battery, offsets: set[int], parts: list[str]) -> Readout:
    ids = battery.input_ids
    n, pos = ids.shape
    lay = model.layout
    shape = (lay.n_layers, n, lay.n_heads, pos)
    sink = torch.zeros(shape)
    by_offset = {d: torch.zeros(shape) for d in sorted(offsets) if d < pos}
    norm = torch.zeros(shape) if "norm" in parts else None
    queries = copy = test = None
    if "copy" in parts or "suppression" in parts:
        half, prefix = battery.meta["half"], battery.meta["prefix"]
        queries = torch.arange(prefix + half, prefix + 2 * half)
    if "copy" in parts:
        copy = _CopyRanks(model, battery, queries)
    if "suppression" in parts:
        test = SuppressionHits(model, ids, queries, battery.meta["compare"], battery.meta["prefix"])

    for start in range(0, n, BATCH):
        rows = slice(start, min(start + BATCH, n))
        chunk = ids[rows]
        if copy is not None:
            copy.chunk(chunk, rows)

        def on_pattern(pattern: torch.Tensor, site) -> None:  # [batch, head, pos, key_pos]
            p = pattern.float()
            sink[site.layer, rows] = p[..., 0].cpu()
            for d, store in by_offset.items():
                store[site.layer, rows, :, d:] = p.diagonal(offset=-d, dim1=-2, dim2=-1).cpu()
            if test is not None:
                test.attended(pattern, site.layer)
            return None

        def on_out(out: torch.Tensor, site) -> None:  # [batch, pos, head, d_model]
            if norm is not None:
                norm[site.layer, rows] = out.float().norm(dim=-1).transpose(1, 2).cpu()
            out_q = None if queries is None else at_queries(out, queries)  # [batch, n_q, head, d_model]
            if copy is not None:
                copy.reduce(out_q, site.layer)
            if test is not None:
                test.reduce(out_q, site.layer, rows)
            return None

        replace = {"attn.pattern": on_pattern}
        if norm is not None or copy is not None or test is not None:
            replace["attn.out"] = on_out
        run_to_last(model, chunk, replace)
    return Readout(
        sink=sink,
        offsets=by_offset,
        copy=None if copy is None else copy.ranks,
        copy_queries=queries,
        norm=norm,
        suppression=None if test is None else test.hits,
    )


class _LastLayerRead(Exception):
    """Raised by the last layer's callback of :func:`run_to_last` once its reductions are done."""


def run_to_last(model: "Model", ids: torch.Tensor, replace: dict) -> None:
    """``model.run(ids, replace=replace, lm_head=False)``, ended right after the last layer's last callback.

    ``replace`` maps ``"attn.pattern"`` (and optionally ``"attn.out"``) to callbacks that reduce
    and return ``None``. Everything they read at the last layer is computed before its MLP (and
    its ``attn.pattern``, before its attention kernel), so the forward stops there: the numbers are
    those of the whole forward, bit for bit, since nothing they depend on changes. When another
    active session hooks a site (it may capture or edit something later in the forward), the
    forward runs to the end as before.
    """
    if model.hook_stack.sites:
        model.run(ids, replace=replace, lm_head=False)
        return
    last = model.layout.n_layers - 1
    final = "attn.out" if "attn.out" in replace else "attn.pattern"
    reduce = replace[final]

    def reduce_then_stop(value: torch.Tensor, site) -> None:
        reduce(value, site)
        if site.layer == last:
            raise _LastLayerRead
        return None

    try:
        model.run(ids, replace={**replace, final: reduce_then_stop}, lm_head=False)
    except _LastLayerRead:
        pass


def per_example(values: torch.Tensor) -> torch.Tensor:
    """``[layer, batch, head, pos] -> [batch, layer, head]``: the mean over the given query positions."""
    return values.mean(-1).permute(1, 0, 2).contiguous()


def positions(pos: int, start: int) -> torch.Tensor:
    """``[1, 1, 1, pos - start]`` float query positions ``start .. pos - 1`` (broadcast over layer, batch, head)."""
    return torch.arange(start, pos, dtype=torch.float32).view(1, 1, 1, -1)
