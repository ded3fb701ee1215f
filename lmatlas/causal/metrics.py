"""Metrics as plain callables on logits: ``metric(logits) -> [batch]`` (one number per prompt).

Each metric reads the logits at the last position of every prompt (``logits`` is
``[batch, pos, d_vocab]``) and returns a ``[batch]`` float tensor; patching and
attribution average it over the prompts. Build them with the factories below:

============================  ============================================================
``logit_diff(answer, wrong)``  ``logit[answer] - logit[wrong]`` (ids per prompt, ``[batch]``)
``probability(answer)``        softmax probability of ``answer``
``log_prob(answer)``           log-softmax of ``answer`` (``loss`` is its negative)
``loss(answer)``               cross-entropy of ``answer``
``kl_to(reference)``           ``KL(reference || model)`` at the last position
============================  ============================================================
"""

from __future__ import annotations

from typing import Callable

import torch

Metric = Callable[[torch.Tensor], torch.Tensor]


def _last(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].float()  # [batch, d_vocab]


def _ids(ids, logits: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(ids, device=logits.device).reshape(-1)
    if ids.numel() == 1:
        ids = ids.expand(logits.shape[0])
    if ids.numel() != logits.shape[0]:
        # a batch of k copies of n prompts (batched patching): repeat the ids per copy
        ids = ids.repeat(logits.shape[0] // ids.numel())
    return ids[:, None]


def logit_diff(answer, wrong) -> Metric:
    """``logit[answer] - logit[wrong]`` at the last position (token ids per prompt or one id)."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = _last(logits)
        return (last.gather(1, _ids(answer, last)) - last.gather(1, _ids(wrong, last)))[:, 0]

    metric.__name__ = "logit_diff"
    return metric


def _normalized(answer, normalize: Callable[..., torch.Tensor], name: str) -> Metric:
    """``normalize(logits)[answer]`` at the last position: one metric per normalisation (softmax, log-softmax)."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = _last(logits)
        return normalize(last, -1).gather(1, _ids(answer, last))[:, 0]

    metric.__name__ = name
    return metric


def probability(answer) -> Metric:
    return _normalized(answer, torch.softmax, "probability")


def log_prob(answer) -> Metric:
    return _normalized(answer, torch.log_softmax, "log_prob")


def loss(answer) -> Metric:
    inner = log_prob(answer)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return -inner(logits)

    metric.__name__ = "loss"
    return metric


def kl_to(reference_logits: torch.Tensor) -> Metric:
    """``KL(p_ref || p_model)`` at the last position; ``reference_logits`` is ``[batch, pos, vocab]``."""
    reference = torch.log_softmax(_last(reference_logits), -1)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(_last(logits), -1)
        ref = reference.to(log_p.device)
        if ref.shape[0] != log_p.shape[0]:
            ref = ref.repeat(log_p.shape[0] // ref.shape[0], 1)
        return (ref.exp() * (ref - log_p)).sum(-1)

    metric.__name__ = "kl"
    return metric


def sequence_loss(ids) -> Metric:
    """Mean next-token cross-entropy of each row of ``ids`` ``[batch, pos]`` (every position, not the last).

    The metric reads ``logits [k * batch, pos, V]`` (``k`` copies of the batch, as batched patching runs them)
    and returns ``[k * batch]``. Without gradients it computes the loss row by row on the contiguous
    ``logits[b, :-1]`` ``[pos - 1, V]``: no ``[k * batch, pos - 1, V]`` copy, the same values bit for bit as
    one cross-entropy over the flattened positions (each position's loss is the same computation; each
    row's mean reduces the same ``pos - 1`` numbers). With gradients it takes that flattened form, whose
    backward writes one logits-sized gradient rather than one per row.
    """
    ids = torch.as_tensor(ids)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        targets = ids.to(logits.device)
        if targets.shape[0] != logits.shape[0]:
            targets = targets.repeat(logits.shape[0] // targets.shape[0], 1)
        if logits.requires_grad:
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), reduction="none"
            )
            return losses.view(logits.shape[0], -1).mean(-1)
        rows = [
            torch.nn.functional.cross_entropy(logits[b, :-1].float(), targets[b, 1:], reduction="none")
            for b in range(logits.shape[0])
        ]
        return torch.stack(rows).mean(-1)

    metric.__name__ = "sequence_loss"
    return metric
