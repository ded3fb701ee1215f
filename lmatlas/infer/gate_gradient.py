"""One-pass gradient ranking of KV heads: how fast the answer's log-probability falls as a head's gate closes.

A first-order approximation of the gate optimisation of :mod:`lmatlas.infer.duo_gates`:
with every gate at 1 (the model's own computation) one forward and one backward give

    score[layer, kv] = mean over prompts of  d log p(answer) / d gate[layer, kv]   at gate = 1

A positive score says that closing the gate (windowing the head) lowers the answer's
log-probability, by about ``score`` nats when the head alone is windowed (first order). Heads
are kept full in decreasing order of score (:func:`lmatlas.infer.duo_gates.gate_plan`). It
costs one forward + backward per prompt instead of an optimisation, and sees every head
at once on natural prompts, but only to first order: heads windowed *together* may
compound, which the trained gates see and this does not. The tests compare the
gradient with finite differences of the log-probability on a tiny model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from lmatlas.infer.duo_gates import GateCache, GateTrial
from lmatlas.progress import ProgressArg, progress_task

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def answer_logprob(model: "Model", gates: torch.Tensor, trial: GateTrial, sink: int, recent: int) -> torch.Tensor:
    """Summed log-probability of the answer tokens ``[start, stop)`` of ``trial``, gated by ``gates``."""
    start, stop = trial.answer
    ids = torch.tensor([trial.input_ids[:stop]])
    logits = model.hf(ids[:, : stop - 1], past_key_values=GateCache(model, gates, sink, recent), use_cache=True).logits
    rows = logits[0, start - 1 : stop - 1]
    logp = torch.log_softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)
    return logp.gather(-1, ids[0, start:stop, None]).sum()


def gradient_scores(
    model: "Model",
    trials: Sequence[GateTrial],
    sink: int = 4,
    recent: int = 256,
    progress: ProgressArg = True,
) -> torch.Tensor:
    """``[n_layers, n_kv_heads]``: the mean over ``trials`` of d log p(answer) / d gate at gate = 1."""
    lay = model.layout
    total = torch.zeros(lay.n_layers, lay.n_kv_heads)
    with progress_task("Gate gradients", total=len(trials), enabled=progress) as task:
        for trial in trials:
            gates = torch.ones(lay.n_layers, lay.n_kv_heads, requires_grad=True)
            (grad,) = torch.autograd.grad(answer_logprob(model, gates, trial, sink, recent), [gates])
            total += grad
            task.advance()
    return total / max(1, len(trials))
