"""The training objective of a TopK dictionary: FVU plus the AuxK loss that revives dead latents.

For one batch ``x [B, d_in] -> y [B, d_out]`` (in the scaled space):

* ``FVU = sum |y - y_hat|^2 / sum |y - mean(y)|^2`` with ``y_hat`` decoded from the ``k`` kept latents;
* ``AuxK`` (Gao et al. 2024, appendix B.1): the top ``k_aux = d_out / 2`` of the *dead* latents
  (the caller's mask) decode a prediction ``e_hat`` of the residual ``e = y - y_hat`` (detached),
  ``|e - e_hat|^2``, scaled down when fewer than ``k_aux`` latents are dead
  (``min(dead / k_aux, 1)``). ``auxk_norm`` picks its denominator: ``"residual"`` divides by the
  residual's own variance ``sum |e - mean(e)|^2`` (the OpenAI code's ``normalized_mse``), so the
  term keeps its weight as the FVU falls; ``"total"`` divides by ``y``'s variance (sparsify).

The loss is ``FVU + auxk_alpha * AuxK``. Dead latents get a gradient only from AuxK (a latent
outside the top k has none from the FVU), so AuxK is what pulls them back to where the
data is.
"""

from __future__ import annotations

import torch

from lmatlas.features.sparse import sparse_decode, topk_encode


def step_loss(
    d,
    x: torch.Tensor,
    y: torch.Tensor,
    dead: torch.Tensor | None,
    *,
    k: int,
    auxk_alpha: float,
    auxk_norm: str = "residual",
    dtype: torch.dtype | None = None,
):
    """One batch: ``(loss, fvu, indices of the kept latents [B, k], their values [B, k])``.

    ``d`` is a dictionary (:mod:`lmatlas.features.dictionary`); ``dead`` ``[n_latents]`` bool or
    ``None``; ``dtype`` the precision of the selecting matmul.
    """
    xin = d.encoder_input(x)
    values, indices, pre = topk_encode(xin, d.W_enc, d.b_enc, k, dtype=dtype)
    out = sparse_decode(values, indices, d.W_dec) + d.b_dec
    if hasattr(d, "W_skip"):
        out = out + x @ d.W_skip
    error = y - out
    total = (y - y.mean(0)).pow(2).sum()
    fvu = error.pow(2).sum() / total
    loss = fvu
    if dead is not None and auxk_alpha > 0:
        dead_idx = dead.nonzero().squeeze(1)
        if len(dead_idx):
            half = max(1, y.shape[1] // 2)
            k_aux = min(half, len(dead_idx))
            scale = min(len(dead_idx) / half, 1.0)
            aux_values, aux_indices, _ = topk_encode(xin, d.W_enc, d.b_enc, k_aux, among=dead_idx, pre=pre)
            e_hat = sparse_decode(aux_values, aux_indices, d.W_dec)
            target = error.detach()
            norm = (target - target.mean(0)).pow(2).sum() if auxk_norm == "residual" else total
            loss = loss + auxk_alpha * scale * (e_hat - target).pow(2).sum() / norm.clamp_min(1e-12)
    return loss, fvu, indices, values


@torch.no_grad()
def heldout_fvu(d, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> tuple[float, float]:
    """``(FVU, L0)`` of ``d`` on ``x [n, d_in] -> y [n, d_out]`` (float32 selection, as in use)."""
    err = l0 = 0.0
    for lo in range(0, len(x), chunk):
        out, latents = d(x[lo : lo + chunk])
        err += float((y[lo : lo + chunk] - out).pow(2).sum())
        l0 += float((latents > 0).sum())
    return err / float((y - y.mean(0)).pow(2).sum()), l0 / len(x)
