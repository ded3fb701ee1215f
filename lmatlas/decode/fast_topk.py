"""Exact top-k over the vocabulary for very many vectors: prune with low precision, rescore in float32.

Decoding every neuron of a model means the top-k of ``A @ U.T`` for ``A`` ``[n, d]``
(46,080 neuron directions for SmolLM2) against ``U`` ``[V, d]`` (49,152 token rows):
2.6 TFLOP of float32 GEMM, of which only the ``k`` largest scores per row matter.
This module computes exactly the same top-k sets with a cheap low-precision pass
and a *proven* error bound, re-scoring in float32 only the pairs the bound cannot
rule out (typically 1.5 k per row out of ``V``).

The bound
---------
Write ``a`` for a row of ``A`` and ``u`` for a token row, ``â``/``û`` for their
low-precision copies and ``ea = a - â``, ``eu = u - û`` (computed exactly, in
float64, once). The low-precision kernel returns ``ŝ``, an approximation of ``â·û``.
The score we rank by is ``s`` = the float32 dot product ``fl(a·u)`` of the rescoring
step. Then

    s - ŝ = (fl(a·u) - a·u) + ea·u + â·eu + (â·û - ŝ)

and, term by term (Cauchy–Schwarz for the middle two, the standard floating-point
dot-product bound ``|fl(x·y) - x·y| <= γ_d ‖x‖‖y‖`` with ``γ_d = d·2⁻²⁴/(1 - d·2⁻²⁴)``
for the others, and ``‖û‖ <= ‖u‖ + ‖eu‖``):

    |s - ŝ| <= c1(a)·‖u‖ + c2(a)·‖eu‖ + ρ·|ŝ| + η
    c1(a) = ‖ea‖ + γ_d·‖a‖ + γ_lp·‖â‖        c2(a) = (1 + γ_lp)·‖â‖

where ``γ_lp`` is the accumulation error of the low-precision kernel and ``ρ`` the
relative error of its output (table :data:`SCORERS`):

* ``bf16``: â, û rounded to bfloat16; products of two bfloat16 numbers are exact in
  float32 and the kernel accumulates in float32 (``γ_lp = γ_d``), then rounds the
  result to bfloat16 (round-to-nearest: ``|ŝ_acc - ŝ| <= 2⁻⁸|ŝ_acc|``, so
  ``ρ = 2⁻⁸/(1 - 2⁻⁸)``). On CPUs with AMX / AVX512-BF16 this runs at 3-4x the
  float32 GEMM rate.
* ``int8``: ``â = s_a·q_a`` with one scale per row, ``û = s_j·q_u`` with one scale
  per token *segment* (below); ``torch._int_mm`` sums int8 products exactly in int32
  (``γ_lp = 0``; ``127²·d < 2³¹`` for ``d < 133,000``) and the two float32 scale
  multiplications give ``ρ = 2.01·2⁻²⁴``.

``η = 1e-30`` absorbs underflow; every coefficient is inflated by ``1e-5`` relative
to cover the rounding of the bound's own float32 evaluation. Because both kernels'
assumptions (float32 accumulation, round-to-nearest) belong to the backend, each
scorer is *validated once per process* on a random probe against a float64
reference; a scorer whose bound fails there is not used (int8's bound needs no
assumption beyond exact integer arithmetic).

Pruning
-------
Let ``τ`` be a value with at least ``k`` tokens whose exact score is ``>= τ``: then
every token of the true top-k has ``s >= τ``, so any token with upper bound
``ŝ + ρ|ŝ| + c1‖u‖ + c2‖eu‖ < τ`` cannot be in it and is skipped. ``τ`` is the k-th
best exact score among ``k + 8`` candidates (the best token of each of the ``k + 8``
best segments below), which is almost the true k-th score. The survivors (a few
dozen per row) are rescored exactly and their top-k is the answer. Ties are broken
arbitrarily, as by ``torch.topk``. The bottom-k is the top-k of ``-s`` and reuses the
same low-precision scores.

Segments keep the per-pair work small: tokens are sorted by ``‖u‖`` and grouped into
``M`` segments of ``w`` consecutive tokens, laid out strided (column ``i·M + j`` holds
member ``i`` of segment ``j``) so that ``max``/``min`` over each segment is a
vectorised reduction over the middle axis of ``ŝ.view(rows, w, M)``. A segment is
opened only if its best score plus the largest bound of its members reaches ``τ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmatlas.decode.vocab import TokenRanking, topk_rows

U32 = 2.0**-24  # float32 unit roundoff
ETA = 1e-30
INFLATE = 1.0 + 1e-5
CANDIDATE_EXTRA = 8  # candidate segments beyond k for the threshold
ROW_BYTES_BUDGET = 64 * 2**20  # bytes of low-precision scores per row block

Progress = Callable[[int, int], None]


def gamma(d: int) -> float:
    """``γ_d``: relative error bound of a float32 dot product of length ``d``."""
    return d * U32 / (1 - d * U32)


# -- the low-precision kernels -----------------------------------------------------------------------------
class Scorer:
    """One low-precision kernel: how to quantise, multiply and dequantise, and its error constants."""

    name = "base"
    score_bytes = 4

    def gamma_lp(self, d: int) -> float:
        raise NotImplementedError

    rho = 0.0

    def quantize_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``x`` ``[n, d]`` float32 -> (low-precision copy, per-row scale or None, ``x̂`` as float64)."""
        raise NotImplementedError

    def quantize_tokens(self, u: torch.Tensor, w: int, M: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Token rows ``[M*w, d]`` in strided layout -> (copy, per-segment scale ``[M]`` or None, ``û`` float64)."""
        raise NotImplementedError

    def matmul(self, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def dequant(raw: torch.Tensor, row_scale: torch.Tensor | None, seg_scale: torch.Tensor | None) -> torch.Tensor:
        """Low-precision scores as float32; ``row_scale``/``seg_scale`` broadcast against ``raw``."""
        out = raw.float()
        if row_scale is not None:
            out = out * (row_scale * seg_scale)
        return out


class BF16Scorer(Scorer):
    name = "bf16"
    score_bytes = 2
    rho = 2.0**-8 / (1 - 2.0**-8)

    def gamma_lp(self, d: int) -> float:
        return gamma(d)

    @staticmethod
    def _round(x: torch.Tensor) -> torch.Tensor:
        lp = x.to(torch.bfloat16)
        return torch.where(lp.abs() < 2.0**-126, torch.zeros_like(lp), lp)  # no subnormals: the kernel may flush them

    def quantize_rows(self, x):
        lp = self._round(x)
        return lp, None, lp.double()

    def quantize_tokens(self, u, w, M):
        lp = self._round(u)
        return lp, None, lp.double()

    def matmul(self, a, u):
        return a @ u.T


class Int8Scorer(Scorer):
    name = "int8"
    score_bytes = 4
    rho = 2.01 * U32

    def gamma_lp(self, d: int) -> float:
        return 0.0

    @staticmethod
    def _quant(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(torch.round(x / scale), -127, 127)
        return q.to(torch.int8), q.double() * scale.double()

    def quantize_rows(self, x):
        scale = (x.abs().amax(1, keepdim=True) / 127).clamp_min(1e-30)
        q, xh = self._quant(x, scale)
        return q, scale.squeeze(1), xh

    def quantize_tokens(self, u, w, M):
        seg = u.abs().amax(1).view(w, M).amax(0)  # [M] largest |entry| of each segment
        scale = (seg / 127).clamp_min(1e-30)
        q, uh = self._quant(u, scale.repeat(w)[:, None])
        return q, scale, uh

    def matmul(self, a, u):
        return torch._int_mm(a, u.T)


#: The low-precision kernels, by name.
SCORERS: dict[str, Scorer] = {s.name: s for s in (BF16Scorer(), Int8Scorer())}
METHODS = ("auto", "plain", *SCORERS)
_VALIDATED: dict[tuple[str, str], bool] = {}


# -- the token side, prepared once -------------------------------------------------------------------------
@dataclass
class TokenIndex:
    """Token rows prepared for one scorer: sorted by norm, segmented, quantised.

    Attributes:
        tokens: ``[V, d]`` the original token rows (float32 or the model dtype; a view, not a copy).
        perm: ``[M*w]`` original token id of each column (``-1`` for padding).
        lp: ``[M*w, d]`` low-precision token rows, column ``i*M + j`` = member ``i`` of segment ``j``.
        seg_scale: ``[M]`` int8 segment scales (None for bf16).
        norm_u, norm_eu: ``[M*w]`` ``‖u‖`` and ``‖u - û‖`` of each column, float32 rounded up.
        seg_u, seg_eu: ``[M]`` their maxima over each segment.
    """

    scorer: Scorer
    tokens: torch.Tensor
    w: int
    M: int
    perm: torch.Tensor
    lp: torch.Tensor
    seg_scale: torch.Tensor | None
    norm_u: torch.Tensor
    norm_eu: torch.Tensor
    seg_u: torch.Tensor = field(init=False)
    seg_eu: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.seg_u = self.norm_u.view(self.w, self.M).amax(0)
        self.seg_eu = self.norm_eu.view(self.w, self.M).amax(0)

    @property
    def vocab(self) -> int:
        return self.tokens.shape[0]


def segment_width(vocab: int, k: int) -> int:
    """Largest power of two ``<= 32`` leaving at least ``4k`` segments (at least 1)."""
    w = 32
    while w > 1 and vocab // w < 4 * k + CANDIDATE_EXTRA:
        w //= 2
    return w


def _up(x: torch.Tensor) -> torch.Tensor:
    """float64 norms -> float32, rounded up (a bound stays a bound)."""
    return (x * INFLATE).float()


def build_index(tokens: torch.Tensor, scorer: Scorer, k: int) -> TokenIndex:
    """Sort, segment and quantise ``tokens`` ``[V, d]`` for ``scorer`` (top-k up to ``k``)."""
    V, d = tokens.shape
    w = segment_width(V, k)
    M = math.ceil(V / w)
    with torch.no_grad():
        u = tokens.detach().float()
        norms = u.double().norm(dim=1)
        order = torch.argsort(norms, descending=True)
        sorted_ids = torch.full((M * w,), -1, dtype=torch.int64, device=u.device)
        sorted_ids[:V] = order
        # sorted position p = j*w + i  ->  column c = i*M + j
        perm = sorted_ids.view(M, w).T.reshape(-1)
        valid = perm >= 0
        cols = torch.zeros(M * w, d, dtype=torch.float32, device=u.device)
        cols[valid] = u[perm[valid]]
        lp, seg_scale, uh = scorer.quantize_tokens(cols, w, M)
        norm_u = _up(cols.double().norm(dim=1))
        norm_eu = _up((cols.double() - uh).norm(dim=1))
    return TokenIndex(scorer, tokens, w, M, perm, lp, seg_scale, norm_u, norm_eu)


# -- validation of a backend ------------------------------------------------------------------------------
def validate_scorer(scorer: Scorer, device: torch.device | str = "cpu", d: int = 576) -> bool:
    """Check the scorer's bound on a random probe against float64 (cached per process and device)."""
    key = (scorer.name, str(device))
    if key not in _VALIDATED:
        try:
            gen = torch.Generator().manual_seed(0)
            a = (torch.randn(64, d, generator=gen) * torch.rand(64, 1, generator=gen) * 4).to(device)
            u = (torch.randn(1024, d, generator=gen) * torch.rand(1024, 1, generator=gen) * 4).to(device)
            a[:, :3] *= 30  # outlier channels
            index = build_index(u, scorer, 20)
            pa = _prepare_rows(a, scorer)
            raw = scorer.matmul(pa.lp, index.lp)
            row_scale = None if pa.scale is None else pa.scale[:, None]
            seg_scale = None if index.seg_scale is None else index.seg_scale.repeat(index.w)[None, :]
            approx = scorer.dequant(raw, row_scale, seg_scale)
            cols = torch.where((index.perm >= 0)[:, None], u[index.perm.clamp_min(0)], 0.0)
            exact = a.double() @ cols.double().T
            bound = _bound(approx, pa.c1[:, None], pa.c2[:, None], index.norm_u[None, :],
                           index.norm_eu[None, :], scorer.rho)
            _VALIDATED[key] = bool(((exact - approx.double()).abs() <= bound.double()).all())
        except (RuntimeError, NotImplementedError):
            _VALIDATED[key] = False
    return _VALIDATED[key]


def auto_method(device: torch.device | str = "cpu") -> str:
    """``bf16`` where the CPU multiplies bfloat16 natively (AMX / AVX512-BF16), else ``int8``, else ``plain``.

    On CUDA the plain float32 path is used (a GPU GEMM is fast, and its bfloat16
    kernels may reduce in reduced precision, which the bf16 bound does not cover).
    """
    if torch.device(device).type != "cpu":
        return "plain"
    fast_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    for name in (["bf16"] if fast_bf16 else []) + ["int8"]:
        if validate_scorer(SCORERS[name], device):
            return name
    return "plain"


# -- the row side and the pruned search ---------------------------------------------------------------------
@dataclass
class _Rows:
    lp: torch.Tensor
    scale: torch.Tensor | None  # [n] int8 row scales
    c1: torch.Tensor  # [n] coefficient of ‖u‖
    c2: torch.Tensor  # [n] coefficient of ‖eu‖


def _prepare_rows(a: torch.Tensor, scorer: Scorer) -> _Rows:
    d = a.shape[1]
    lp, scale, ah = scorer.quantize_rows(a)
    a64 = a.double()
    n_a, n_ah, n_ea = a64.norm(dim=1), ah.norm(dim=1), (a64 - ah).norm(dim=1)
    g_lp = scorer.gamma_lp(d)
    c1 = n_ea + gamma(d) * n_a + g_lp * n_ah
    c2 = (1 + g_lp) * n_ah
    return _Rows(lp, scale, _up(c1), _up(c2))


def _bound(approx, c1, c2, norm_u, norm_eu, rho):
    """Upper bound on ``|exact - approx|`` (broadcasting), inflated for its own rounding."""
    return (approx.abs() * (rho * INFLATE + 8 * U32) + c1 * norm_u + c2 * norm_eu) * INFLATE + ETA


@dataclass
class PrunedTopK:
    """Result of :func:`pruned_topk`.

    Attributes:
        top / bottom: ``TokenRanking`` ``[n, k]`` (None for a side not asked for).
        method: the kernel used (``bf16``, ``int8`` or ``plain``).
        rescored: mean number of exact float32 rescorings per row and side
            (``V`` for ``plain``).
    """

    top: TokenRanking | None
    bottom: TokenRanking | None
    method: str
    rescored: float


def _side(a, rows, index, raw_view, ext, sign, k, row_scale):  # noqa: C901 (one pass of the algorithm)
    """Top-k of ``sign * scores`` for one row block. ``ext``: ``[nb, M]`` dequantised segment extreme."""
    nb, M, w = a.shape[0], index.M, index.w
    dev = a.device
    best = sign * ext  # [nb, M] largest sign*ŝ of each segment
    kc = min(M, k + CANDIDATE_EXTRA)
    cand_seg = best.topk(kc, dim=1).indices  # [nb, kc]
    members = torch.gather(raw_view, 2, cand_seg[:, None, :].expand(nb, w, kc))  # [nb, w, kc] raw
    pick = (members.float() * sign).argmax(1)  # [nb, kc] (positive scales: raw order == score order)
    cand_tok = index.perm[pick * M + cand_seg]
    cand_exact = _exact(a, index.tokens, torch.arange(nb, device=dev)[:, None].expand(nb, kc), cand_tok) * sign
    tau = cand_exact.topk(k, dim=1).values[:, -1]  # [nb]; -inf if < k real candidates
    # segments that may hold a top-k token
    seg_ub = best + _bound(best, rows.c1[:, None], rows.c2[:, None], index.seg_u[None, :],
                           index.seg_eu[None, :], index.scorer.rho)
    n_idx, j_idx = (seg_ub >= tau[:, None]).nonzero(as_tuple=True)
    vals = raw_view[n_idx, :, j_idx]  # [P, w]
    cols = torch.arange(w, device=dev)[None, :] * M + j_idx[:, None]  # [P, w]
    seg_scale = None if index.seg_scale is None else index.seg_scale[j_idx][:, None]
    rs = None if row_scale is None else row_scale[n_idx][:, None]
    approx = sign * index.scorer.dequant(vals, rs, seg_scale)
    ub = approx + _bound(approx, rows.c1[n_idx][:, None], rows.c2[n_idx][:, None], index.norm_u[cols],
                         index.norm_eu[cols], index.scorer.rho)
    keep = ub >= tau[n_idx][:, None]
    pn = n_idx[:, None].expand_as(cols)[keep]
    tok = index.perm[cols[keep]]
    real = tok >= 0
    pn, tok = pn[real], tok[real]
    exact = _exact(a, index.tokens, pn, tok) * sign
    # per-row top-k of the survivors (pn is sorted: nonzero is row-major)
    counts = torch.bincount(pn, minlength=nb)
    width = max(int(counts.max()) if pn.numel() else 0, k)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(pn.numel(), device=dev) - starts[pn]
    padded = torch.full((nb, width), -math.inf, device=dev)
    padded_ids = torch.zeros((nb, width), dtype=torch.int64, device=dev)
    padded[pn, pos] = exact
    padded_ids[pn, pos] = tok
    vals_k, at = padded.topk(k, dim=1)
    ids_k = torch.gather(padded_ids, 1, at)
    short = (counts < k).nonzero().flatten()
    if short.numel():  # cannot happen with a valid bound; stay exact anyway
        fallback = topk_rows(a[short], index.tokens.T, k, largest=sign > 0)
        vals_k[short], ids_k[short] = fallback.logits * sign, fallback.ids
    return TokenRanking(ids=ids_k, logits=vals_k * sign), float(pn.numel())


def _exact(a: torch.Tensor, tokens: torch.Tensor, row_idx: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """float32 ``a[row_idx] · tokens[tok]`` (``-inf`` where ``tok < 0``), any shape of indices."""
    shape = tok.shape
    r, t = row_idx.reshape(-1), tok.reshape(-1)
    valid = t >= 0
    out = torch.full((t.numel(),), -math.inf, device=a.device)
    if valid.any():
        out[valid] = (a[r[valid]] * tokens[t[valid]].float()).sum(-1)
    return out.view(shape)


def pruned_topk(rows: torch.Tensor, tokens: torch.Tensor, k: int = 20, *, top: bool = True, bottom: bool = True,
                method: str = "auto", row_block: int | None = None, progress: Progress | None = None,
                index: TokenIndex | None = None) -> PrunedTopK:
    """Exact top-k / bottom-k of ``rows @ tokens.T``, pruned with a low-precision pass.

    Args:
        rows: ``[n, d]`` float32 vectors (already multiplied by any norm gain).
        tokens: ``[V, d]`` token rows (``W_U.T`` for the unembedding, ``W_E`` for the embedding);
            any float dtype, rescoring converts the rows it needs to float32.
        k: tokens per row and side.
        top, bottom: which sides to compute (the low-precision pass is shared).
        method: ``auto`` (see :func:`auto_method`), ``bf16``, ``int8`` or ``plain``
            (chunked float32, :func:`lmatlas.decode.vocab.topk_rows`).
        row_block: rows per block (default: as many as fit 64 MB of low-precision scores).
        progress: ``callback(rows_done, rows_total)``.
        index: a :class:`TokenIndex` of ``tokens`` to reuse.

    Returns:
        :class:`PrunedTopK`; ``ids``/``logits`` ``[n, k]``, best first (for ``bottom``: lowest first).
    """
    n, V = rows.shape[0], tokens.shape[0]
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: use one of {', '.join(METHODS)}.")
    if method == "auto":
        method = auto_method(rows.device)
    rows = rows.detach().float()
    if method == "plain":
        W = tokens.detach().T
        out_top = topk_rows(rows, W, k, largest=True) if top else None
        out_bot = topk_rows(rows, W, k, largest=False) if bottom else None
        if progress:
            progress(n, n)
        return PrunedTopK(out_top, out_bot, "plain", float(V))
    scorer = SCORERS[method]
    if index is None or index.scorer is not scorer or index.tokens is not tokens:
        index = build_index(tokens, scorer, k)
    if row_block is None:
        row_block = max(16, min(1024, ROW_BYTES_BUDGET // (index.M * index.w * scorer.score_bytes)))
    sides = [s for s, on in ((1, top), (-1, bottom)) if on]
    results: dict[int, list[TokenRanking]] = {s: [] for s in sides}
    rescored = 0.0
    with torch.no_grad():
        for r0 in range(0, n, row_block):
            a = rows[r0:r0 + row_block]
            prepared = _prepare_rows(a, scorer)
            raw = scorer.matmul(prepared.lp, index.lp)  # [nb, M*w]
            raw_view = raw.view(a.shape[0], index.w, index.M)
            row_scale = prepared.scale
            seg_scale = None if index.seg_scale is None else index.seg_scale[None, :]
            rs = None if row_scale is None else row_scale[:, None]
            for sign in sides:
                ext_raw = raw_view.amax(1) if sign > 0 else raw_view.amin(1)
                ext = scorer.dequant(ext_raw, rs, seg_scale)
                ranking, count = _side(a, prepared, index, raw_view, ext, sign, k, row_scale)
                results[sign].append(ranking)
                rescored += count
            if progress:
                progress(min(n, r0 + row_block), n)

    def cat(sign):
        if sign not in results:
            return None
        parts = results[sign]
        return TokenRanking(ids=torch.cat([p.ids for p in parts]), logits=torch.cat([p.logits for p in parts]))

    return PrunedTopK(cat(1), cat(-1), method, rescored / max(1, n * len(sides)))
