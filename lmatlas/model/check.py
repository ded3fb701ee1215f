"""``lmatlas.check(model)``: prove that lmatlas sees the model as it really runs.

Two checks, on one prompt:

(a) **Hooks are transparent.** A forward with every site of every layer hooked
    (captured, nothing replaced; q/k/v/pattern through lmatlas's attention
    function) must give *bit-identical* logits to the plain forward.
(b) **The residual stream is the sum of its writes.** The stream entering block 0,
    plus every head's ``attn.out``, every output-projection bias and every
    ``mlp.out``, must equal the stream leaving the last block. The error is
    measured relative to the stream's largest magnitude and must stay under
    ``tolerance`` (default ``1e-4`` in float32, ``2e-2`` in 16-bit dtypes: the
    parts are summed in a different order than the model sums them). It is also
    checked block by block, so a failure names its layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from lmatlas.errors import FidelityError

if TYPE_CHECKING:
    from lmatlas.model.handle import Inputs, Model

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
LOW_PRECISION_TOLERANCE = 2e-2


@dataclass
class FidelityReport:
    """What :func:`check` measured."""

    model: str
    dtype: str
    n_tokens: int
    logits_exact: bool
    max_logit_diff: float
    decomposition_rel_error: float
    tolerance: float
    layer_rel_errors: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.logits_exact
            and self.decomposition_rel_error <= self.tolerance
            and all(err <= self.tolerance for err in self.layer_rel_errors)
        )

    def raise_if_failed(self) -> "FidelityReport":
        if not self.passed:
            worst = max(range(len(self.layer_rel_errors)), key=self.layer_rel_errors.__getitem__, default=None)
            raise FidelityError(
                f"Fidelity check failed for {self.model}: logits exact={self.logits_exact} "
                f"(max diff {self.max_logit_diff:.3g}); decomposition error {self.decomposition_rel_error:.3g} "
                f"(tolerance {self.tolerance:g}; worst block L{worst})."
            )
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.abs().max() / ref.abs().max().clamp_min(1e-12))


def check(model: "Model", prompt: "Inputs" = DEFAULT_PROMPT, tolerance: float | None = None) -> FidelityReport:
    """Run both fidelity checks and return a :class:`FidelityReport` (``report.passed``)."""
    tolerance = tolerance if tolerance is not None else TOLERANCE.get(model.dtype, LOW_PRECISION_TOLERANCE)
    plain = model.forward(prompt)
    cache = model.run(prompt, capture=model.sites())
    hooked = cache.logits
    exact = bool(torch.equal(plain, hooked))
    max_diff = float((plain.float() - hooked.float()).abs().max())

    parts, labels = cache.decompose_resid()
    final = cache.resid(model.layout.n_layers - 1, "post").float()
    total_error = _rel(parts.float().sum(0) - final, final)

    layer_errors = []
    for layer in range(model.layout.n_layers):
        writes = cache.head_out(layer).float().sum(2) + cache.mlp_out(layer).float()
        bias = cache.attn_bias(layer)
        if bias is not None:
            writes = writes + bias.float()
        delta = cache.resid(layer, "post").float() - cache.resid(layer, "pre").float()
        layer_errors.append(_rel(writes - delta, cache.resid(layer, "post").float()))

    n_tokens = int(cache.input_ids.shape[-1])
    return FidelityReport(
        model=model.provenance.source,
        dtype=str(model.dtype).removeprefix("torch."),
        n_tokens=n_tokens,
        logits_exact=exact,
        max_logit_diff=max_diff,
        decomposition_rel_error=total_error,
        tolerance=tolerance,
        layer_rel_errors=layer_errors,
    )
