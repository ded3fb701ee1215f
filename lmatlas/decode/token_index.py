"""The token side of the exact pruned top-k, prepared once (sorted, segmented, quantised), the row side,
and the check that a backend's kernels keep the bound (:mod:`lmatlas.decode.fast_topk`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmatlas.decode.lowprec import ETA, INFLATE, SCORERS, U32, Int8Scorer, Scorer, gamma, norm_up

_VALIDATED: dict[tuple[str, str], bool] = {}


# -- the token side, prepared once -------------------------------------------------------------------------
@dataclass
class TokenIndex:
    """Token rows prepared for one scorer: sorted by norm, segmented, quantised.

    Attributes:
        tokens: ``[V, d]`` the original token rows (a view, never copied).
        k: the largest top-k it serves.
        w, M: segment width and count (``M * w >= V``; the rest is zero padding).
        perm: ``[M*w]`` original token id of each column (``-1`` for padding).
        lp: ``[M*w, d]`` low-precision token rows in strided layout.
        seg_scale: ``[M]`` int8 segment scales (None for bf16).
        norm_u, norm_eu: ``[M*w]`` upper bounds of ``‖u‖`` and ``‖u - û‖`` per column.
        seg_norms: ``[2, M]`` their maxima over each segment.
    """

    scorer: Scorer
    tokens: torch.Tensor
    k: int
    w: int
    M: int
    perm: torch.Tensor
    lp: torch.Tensor
    seg_scale: torch.Tensor | None
    norm_u: torch.Tensor
    norm_eu: torch.Tensor
    seg_norms: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.seg_norms = torch.stack(
            [self.norm_u.view(self.w, self.M).amax(0), self.norm_eu.view(self.w, self.M).amax(0)]
        )


MAX_SEGMENT = 32  # tokens per segment (measured on SmolLM2: 16 and 64 are slower)


def segment_width(vocab: int, k: int) -> int:
    """Largest power of two ``<= MAX_SEGMENT`` leaving at least ``4k`` segments (at least 1)."""
    w = MAX_SEGMENT
    while w > 1 and vocab // w < 4 * k:
        w //= 2
    return w


def build_index(tokens: torch.Tensor, scorer: Scorer, k: int, chunk: int = 4096) -> TokenIndex:
    """Sort, segment and quantise ``tokens`` ``[V, d]`` for ``scorer`` (top-k up to ``k``).

    Works through the vocabulary ``chunk`` rows at a time (temporaries stay in cache);
    the only full-size result is the low-precision copy.
    """
    V, d = tokens.shape
    w = segment_width(V, k)
    M = math.ceil(V / w)
    with torch.no_grad():
        tokens = tokens.detach()
        norms = torch.cat([norm_up(tokens[i : i + chunk]) for i in range(0, V, chunk)])
        sorted_ids = torch.full((M * w,), -1, dtype=torch.int64, device=tokens.device)
        sorted_ids[:V] = torch.argsort(norms, descending=True)
        perm = sorted_ids.view(M, w).T.reshape(-1)  # sorted position j*w + i -> column i*M + j
        valid = perm >= 0
        norm_u = torch.where(valid, norms[perm.clamp_min(0)], 0.0)
        lp = torch.empty(M * w, d, dtype=scorer.lp_dtype, device=tokens.device)
        norm_eu = torch.empty(M * w, device=tokens.device)
        seg_scale = None
        if scorer.segment_scales:  # one scale per segment: its largest |entry|
            peak = torch.cat([tokens[i : i + chunk].float().abs().amax(1) for i in range(0, V, chunk)])
            seg_scale = Int8Scorer.scale_of(torch.where(valid, peak[perm.clamp_min(0)], 0.0).view(w, M).amax(0))
        for c0 in range(0, M * w, chunk):
            ids = perm[c0 : c0 + chunk]
            cols = tokens.index_select(0, ids.clamp_min(0)).float()
            cols[ids < 0] = 0
            scale = None if seg_scale is None else seg_scale.repeat(w)[c0 : c0 + chunk]
            lp[c0 : c0 + chunk], norm_eu[c0 : c0 + chunk] = scorer.quantize_tokens(cols, scale)
    return TokenIndex(scorer, tokens, k, w, M, perm, lp, seg_scale, norm_u, norm_eu)


# -- the row side ------------------------------------------------------------------------------------------
@dataclass
class _Rows:
    lp: torch.Tensor  # [n, d] low-precision rows
    scale: torch.Tensor | None  # [n] int8 row scales
    coef: torch.Tensor  # [n, 2]: c1 (times ‖u‖) and c2 (times ‖eu‖)


def _prepare_rows(a: torch.Tensor, scorer: Scorer) -> _Rows:
    d = a.shape[1]
    lp, scale, n_ah, n_ea = scorer.quantize_rows(a)
    g_lp = scorer.gamma_lp(d)
    c1 = n_ea + gamma(d) * norm_up(a) + g_lp * n_ah
    c2 = (1 + g_lp) * n_ah
    return _Rows(lp, scale, torch.stack([c1, c2], 1) * INFLATE)


def _rho(scorer: Scorer) -> float:
    return scorer.rho * INFLATE + 8 * U32


# -- validation of a backend ------------------------------------------------------------------------------
def validate_scorer(scorer: Scorer, device: torch.device | str = "cpu", d: int = 576) -> bool:
    """Check the scorer's bound on a random probe against float64 (cached per process and device)."""
    key = (scorer.name, str(device))
    if key not in _VALIDATED:
        try:
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(64, d, generator=gen) * torch.rand(64, 1, generator=gen) * 4
            u = torch.randn(2048, d, generator=gen) * torch.rand(2048, 1, generator=gen) * 4
            a[:, :3] *= 30  # outlier channels
            a, u = a.to(device), u.to(device)
            index = build_index(u, scorer, 20)
            rows = _prepare_rows(a, scorer)
            raw = scorer.matmul(
                rows.lp, index.lp, torch.empty(64, index.M * index.w, dtype=scorer.score_dtype, device=device)
            )
            seg_scale = None if index.seg_scale is None else index.seg_scale.repeat(index.w)[None, :]
            approx = scorer.dequant(raw, None if rows.scale is None else rows.scale[:, None], seg_scale)
            cols = torch.where((index.perm >= 0)[:, None], u[index.perm.clamp_min(0)], 0.0)
            exact = a.double() @ cols.double().T
            bound = approx.abs() * _rho(scorer) + rows.coef[:, :1] * index.norm_u + rows.coef[:, 1:] * index.norm_eu
            _VALIDATED[key] = bool(((exact - approx.double()).abs() <= bound.double() + ETA).all())
        except (RuntimeError, NotImplementedError):
            _VALIDATED[key] = False
    return _VALIDATED[key]


def auto_method(device: torch.device | str = "cpu") -> str:
    """``bf16`` where the CPU multiplies bfloat16 natively (AMX / AVX512-BF16) and its bound validates,
    else ``plain``.

    ``int8`` is never picked automatically: its per-row int8 error bound is ~6x looser
    than bfloat16's, so about 3.5% of the vocabulary survives per row (1,740 of 49,152 for
    SmolLM2's neurons) and the exact rescoring costs more than it saves (measured 2.7x
    *slower* than plain here, where ``torch._int_mm`` runs at only 1.5x the float32 GEMM
    rate). Ask for it explicitly where int8 GEMMs are much faster than float32 ones.
    On CUDA the plain float32 path is used (a GPU GEMM is fast, and its bfloat16
    kernels may reduce in reduced precision, which the bf16 bound does not cover).
    """
    if torch.device(device).type != "cpu":
        return "plain"
    native_bf16 = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return "bf16" if native_bf16 and validate_scorer(SCORERS["bf16"], device) else "plain"
