"""The low-precision kernels of the exact pruned top-k: quantisation, product and their error constants.

The bound they serve, and why each constant is what it is, is derived in
:mod:`lmatlas.decode.fast_topk`.
"""

from __future__ import annotations

import torch

U32 = 2.0**-24  # float32 unit roundoff
ETA = 1e-30
INFLATE = 1.0 + 1e-5
ROW_BYTES_BUDGET = 64 * 2**20  # bytes of low-precision scores per row block


def gamma(d: int) -> float:
    """``γ_d``: relative error bound of a float32 dot product of length ``d``."""
    return d * U32 / (1 - d * U32)


def norm_up(x: torch.Tensor) -> torch.Tensor:
    """``[n]`` float32 upper bounds of the row norms of ``x`` ``[n, d]`` (float32 arithmetic, rounded up)."""
    if x.dtype == torch.float64:
        return (torch.linalg.vector_norm(x, dim=1) * INFLATE).float()
    d = x.shape[1]
    return torch.linalg.vector_norm(x.float(), dim=1) * (1 + 2 * gamma(d) + 4 * U32)


# -- the low-precision kernels -----------------------------------------------------------------------------
class Scorer:
    """One low-precision kernel: quantisation, product, dequantisation and its error constants.

    ``quantize_rows(x)`` returns ``(low-precision x, per-row scales or None, ‖x̂‖ up, ‖x - x̂‖ up)``;
    ``quantize_tokens(x, scale)`` returns ``(low-precision x, ‖x - x̂‖ up)`` with the given
    per-row scales (``segment_scales`` scorers) or none.
    """

    name = "base"
    lp_dtype = torch.float32
    score_dtype = torch.float32
    segment_scales = False
    rho = 0.0

    def gamma_lp(self, d: int) -> float:
        raise NotImplementedError

    def quantize_rows(self, x: torch.Tensor):
        raise NotImplementedError

    def quantize_tokens(self, x: torch.Tensor, scale: torch.Tensor | None):
        raise NotImplementedError

    def matmul(self, a: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def dequant(raw: torch.Tensor, row_scale: torch.Tensor | None, seg_scale: torch.Tensor | None) -> torch.Tensor:
        """Low-precision scores as float32; scales broadcast against ``raw`` (positive)."""
        out = raw.float()
        if row_scale is not None:
            out = out * (row_scale * seg_scale)
        return out

    def segment_max(self, raw_view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row and segment of ``raw_view`` ``[nb, w, M]``: ``(value, upper)`` raw scores ``[nb, M]``.

        ``value`` is some member's score (it makes the threshold), ``upper`` is at least
        every member's score (it tests the segment). Here both are the maximum.
        """
        ext = raw_view.amax(1)
        return ext, ext

    @staticmethod
    def negate_(raw: torch.Tensor) -> None:
        """Negate the scores in place (exactly): the bottom-k is the top-k of ``-s``."""
        raw.neg_()


class BF16Scorer(Scorer):
    name = "bf16"
    lp_dtype = torch.bfloat16
    score_dtype = torch.bfloat16
    rho = 2.0**-8 / (1 - 2.0**-8)

    def gamma_lp(self, d: int) -> float:
        return gamma(d)

    @staticmethod
    def _round(x):
        lp = x.to(torch.bfloat16)
        return lp.masked_fill_(lp.abs() < 2.0**-126, 0)  # no subnormals: the kernel may flush them

    def quantize_rows(self, x):
        lp = self._round(x)
        return lp, None, norm_up(lp), norm_up(x - lp.float())  # x - lp is exact in float32

    def quantize_tokens(self, x, scale):
        lp = self._round(x)
        return lp, norm_up(x - lp.float())

    def matmul(self, a, u, out=None):
        return torch.matmul(a, u.T, out=out)

    def segment_max(self, raw_view):
        # The maximum of the int16 bit patterns is the largest member when a segment has a
        # non-negative one (bfloat16 orders like int16 there), else its most negative member:
        # a member either way, and 0 bounds an all-negative segment from above. 3x faster.
        key = raw_view.view(torch.int16).amax(1).view(torch.bfloat16)
        return key, key.clamp_min(0)

    @staticmethod
    def negate_(raw):
        raw.view(torch.int16).bitwise_xor_(-32768)  # flip the sign bit: 2x faster than neg_ on bfloat16


class Int8Scorer(Scorer):
    name = "int8"
    lp_dtype = torch.int8
    score_dtype = torch.int32
    segment_scales = True
    rho = 2.01 * U32

    def gamma_lp(self, d: int) -> float:
        return 0.0

    @staticmethod
    def scale_of(peak: torch.Tensor) -> torch.Tensor:
        """Scale that maps ``[-peak, peak]`` onto ``[-127, 127]``."""
        return (peak / 127).clamp_min(1e-30)

    @staticmethod
    def _quant(x, scale):
        q = torch.clamp(torch.round(x / scale[:, None]), -127, 127)
        xh = q.double() * scale.double()[:, None]  # exact in float64
        return q.to(torch.int8), xh

    def quantize_rows(self, x):
        scale = self.scale_of(x.abs().amax(1))
        q, xh = self._quant(x, scale)
        return q, scale, norm_up(xh), norm_up(x.double() - xh)

    def quantize_tokens(self, x, scale):
        q, xh = self._quant(x, scale)
        return q, norm_up(x.double() - xh)

    def matmul(self, a, u, out=None):
        return torch._int_mm(a, u.T, out=out)


#: The low-precision kernels, by name.
SCORERS: dict[str, Scorer] = {s.name: s for s in (BF16Scorer(), Int8Scorer())}
METHODS = ("auto", "plain", *SCORERS)
