"""DoLa: Decoding by Contrasting Layers (Chuang et al., 2023).

At each step, with ``q_j`` the next-token distribution read from layer ``j``
(:mod:`lmatlas.model.readout`) and ``N`` the final layer:

1. **Premature layer**: among the candidate layers of a bucket, the one whose
   distribution is farthest from the final one,
   ``M = argmax_{j in bucket} JSD(q_N || q_j)``, with
   ``JSD(p || q) = (KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2`` (per sequence).
2. **Adaptive plausibility constraint**: only tokens with
   ``q_N(x) >= alpha * max_w q_N(w)`` (``alpha = 0.1``) stay candidates.
3. **Contrast**: ``F(x) = log q_N(x) - log q_M(x)`` on those tokens, ``-inf`` elsewhere.
4. **Repetition penalty** (the paper's ``theta = 1.2``, as in CTRL): a token already in the
   sequence has its score divided by ``theta`` if positive, multiplied if negative
   (transformers' ``repetition_penalty`` logits processor), then the argmax.

Buckets follow the paper's code as transformers had it (for ``N <= 40`` layers):
``"low"`` = ``[s, N/2)``, ``"high"`` = ``[N/2, N)``, every second layer, with ``s = 2``
when the embeddings are tied (layer 0 would be read through its own transpose) and
``s = 0`` otherwise; for ``N > 40`` the first or last 20 layers. A list of layers is
taken as is (each must be in ``0 .. N - 1``).

With ``premature_layers=None`` the contrast is off and the output is greedy decoding's.

Two entry points::

    model.hf.generate(**batch, custom_generate=dola_generate, premature_layers="high",
                      repetition_penalty=1.2, do_sample=False, max_new_tokens=32)
    generate_dola(model, "What happens if you eat watermelon seeds?", max_new_tokens=32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from lmatlas.errors import InputError
from lmatlas.infer.decoding.loop import check_greedy, greedy_loop
from lmatlas.model.readout import LayerTap, exit_logits, exit_logits_at, n_layers_of, ties_embeddings

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

Layers = Union[str, Sequence[int], None]

#: The paper's repetition penalty and plausibility threshold.
REPETITION_PENALTY = 1.2
RELATIVE_TOP = 0.1


def candidate_layers(hf: nn.Module, layers: Layers) -> list[int]:
    """The premature candidates for ``layers`` (``"low"``, ``"high"``, a list, or ``None`` = contrast off)."""
    n = n_layers_of(hf)
    if layers is None:
        return []
    if isinstance(layers, str):
        start = 2 if ties_embeddings(hf) else 0
        if layers == "low":
            chosen = list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
        elif layers == "high":
            chosen = list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
        else:
            raise InputError(f"premature_layers={layers!r}: use 'low', 'high', a list of layers or None.")
        if not chosen:
            raise InputError(f"The {layers!r} bucket of a {n}-layer model is empty: pass a list of layers.")
        return chosen
    chosen = [int(layer) for layer in layers]
    if not chosen:
        raise InputError("premature_layers is an empty list: name at least one layer, or pass None for greedy.")
    for layer in chosen:
        if layer == n:
            raise InputError(
                f"Premature layer {layer} is the final layer of this {n}-layer model: the contrast "
                f"would be zero; choose layers in 0..{n - 1}."
            )
        if not 0 <= layer < n:
            raise InputError(
                f"Premature layer {layer} does not exist: this model has layers 0..{n} "
                f"(0 = embeddings, {n} = final); choose layers in 0..{n - 1}."
            )
    return sorted(set(chosen))


def js_divergence(final_logits: torch.Tensor, premature_logits: torch.Tensor) -> torch.Tensor:
    """``[n, batch]`` Jensen-Shannon divergence (nats) between ``[batch, V]`` and each of ``[n, batch, V]``."""
    log_p = F.log_softmax(final_logits.float(), -1)[None]
    log_q = F.log_softmax(premature_logits.float(), -1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def contrast(
    final_logits: torch.Tensor, premature_logits: torch.Tensor, relative_top: float = RELATIVE_TOP
) -> torch.Tensor:
    """``[batch, V]`` DoLa scores ``log q_N - log q_M`` on plausible tokens, ``-inf`` elsewhere."""
    log_final = F.log_softmax(final_logits.float(), -1)
    log_premature = F.log_softmax(premature_logits.float(), -1)
    threshold = log_final.max(-1, keepdim=True).values + math.log(relative_top)
    return torch.where(log_final >= threshold, log_final - log_premature, torch.tensor(-math.inf))


@dataclass
class DolaTrace:
    """What DoLa chose at each step: ``layers[t]`` is ``[batch]`` premature layers of step ``t``."""

    candidates: list[int] = field(default_factory=list)
    layers: list[list[int]] = field(default_factory=list)


def top_k_scores(
    model: nn.Module, final: torch.Tensor, hidden: torch.Tensor, top_k: int, relative_top: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cheaper DoLa: ``(scores [batch, V], chosen [batch])`` with the premature layers read on the
    final layer's ``top_k`` tokens only.

    Both distributions are renormalised over those tokens (the plausible tokens are among them
    whenever ``top_k`` covers them), the premature layer is the one with the largest JSD there,
    and the contrast is taken there; every other token scores ``-inf``. With ``top_k = d_vocab``
    this is the published method.
    """
    ids = final.topk(min(top_k, final.shape[-1]), dim=-1).indices  # [batch, k]
    premature = exit_logits_at(model, hidden, ids)  # [n, batch, k]
    final_k = final.gather(-1, ids)  # [batch, k]
    chosen = js_divergence(final_k, premature).argmax(0)  # [batch]
    picked = premature[chosen, torch.arange(final.shape[0])]  # [batch, k]
    inside = contrast(final_k, picked, relative_top)  # [batch, k]
    return torch.full_like(final, -math.inf).scatter(-1, ids, inside), chosen


def dola_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    premature_layers: Layers = "high",
    relative_top: float = RELATIVE_TOP,
    dola_trace: DolaTrace | None = None,
    dola_top_k: int | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """A ``custom_generate`` callable for ``model.generate``: DoLa greedy decoding (see the module docstring).

    Extra ``generate`` arguments: ``premature_layers`` (``"low"``, ``"high"``, a list of layers,
    ``None`` = no contrast), ``relative_top`` (alpha), ``dola_trace`` (a :class:`DolaTrace`
    filled with the chosen layers), ``dola_top_k`` (score the premature layers on the final
    layer's top-k tokens only: :func:`top_k_scores`; ``None`` = the published method). Pass
    ``repetition_penalty=1.2`` for the paper's setting.
    """
    if dola_top_k is not None and dola_top_k < 1:
        raise InputError(f"dola_top_k={dola_top_k}: score at least one token (or None for the whole vocabulary).")
    check_greedy(generation_config, "DoLa")
    if not 0.0 < relative_top <= 1.0:
        raise InputError(f"relative_top={relative_top}: the plausibility threshold must be in (0, 1].")
    layers = candidate_layers(model, premature_layers)
    if dola_trace is not None:
        dola_trace.candidates = layers
    if not layers:
        return greedy_loop(
            model,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            model_kwargs,
            lambda outputs, ids: outputs.logits[:, -1].float(),
            streamer,
        )

    with LayerTap(model, layers) as tap:

        def scores(outputs: Any, ids: torch.Tensor) -> torch.Tensor:
            final = outputs.logits[:, -1].float()
            hidden = torch.stack([tap.last[layer] for layer in layers])  # [n, batch, d_model]
            if dola_top_k is not None:
                out, chosen = top_k_scores(model, final, hidden, dola_top_k, relative_top)
                if dola_trace is not None:
                    dola_trace.layers.append([layers[int(i)] for i in chosen])
                return out
            premature = exit_logits(model, hidden)  # [n, batch, V]: one matmul
            chosen = js_divergence(final, premature).argmax(0)  # [batch]
            if dola_trace is not None:
                dola_trace.layers.append([layers[int(i)] for i in chosen])
            picked = premature[chosen, torch.arange(final.shape[0])]  # [batch, V]
            return contrast(final, picked, relative_top)

        return greedy_loop(
            model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs, scores, streamer
        )


def generate_dola(
    model: "Model",
    prompt: Any,
    max_new_tokens: int = 32,
    *,
    premature_layers: Layers = "high",
    relative_top: float = RELATIVE_TOP,
    repetition_penalty: float = REPETITION_PENALTY,
    chat: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """DoLa on an lmatlas model: ``{"text", "token_ids", "premature_layers", "candidates"}``.

    Shorthand for ``lmatlas.generate(model, prompt, strategy=Dola(...))``; ``kwargs`` (``edit=``,
    ``kv=``, transformers' options) go to it, and everything is checked before any compute.
    """
    from lmatlas.infer.compose import generate_one
    from lmatlas.infer.decoding.strategies import Dola

    strategy = Dola(premature_layers, relative_top, repetition_penalty)
    return generate_one(model, prompt, max_new_tokens, strategy, chat=chat, **kwargs)
