"""DeCoRe: Decoding by Contrasting Retrieval Heads (Gema et al., 2024), entropy-weighted.

Two copies of the same model run side by side, each with its own KV cache: the base
model and the same model with its retrieval heads masked (each head's ``attn.z``
zeroed through an :class:`~lmatlas.edit.Ablate` edit). At each step, with ``b`` and
``m`` their next-token logits ``[batch, d_vocab]``::

    alpha_t = H(softmax(b))                       # entropy of the base distribution, nats
    alpha_t = min(alpha_t, alpha_cap)             # optional cap
    scores  = (1 + alpha_t) * b - alpha_t * m     # then the logits processors and the argmax

so the contrast is strongest when the base model is unsure. Masking the heads that copy
from the context makes the masked model answer from memory; subtracting it pushes the
decoding toward the context. The random-heads control (:func:`random_heads`) masks as
many heads chosen at random among the others.

Heads come from the census's ``retrieval`` detector (:func:`retrieval_heads`: an atlas,
or a census run on the spot) or are given as ``["L5.H3", ...]``. An empty head set is an
error; ``masked_heads=None`` in :func:`decore_generate` masks nothing (``m == b``), which
reproduces greedy decoding (the control the tests use).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from lmatlas.errors import InputError
from lmatlas.infer.decoding.loop import check_greedy, greedy_loop

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def head_names(model: "Model", heads: Sequence[str]) -> list[str]:
    """Check ``["L5.H3", ...]`` against the model's sizes; an empty list is an error."""
    heads = list(heads)
    if not heads:
        raise InputError(
            "DeCoRe needs at least one head to mask: pass heads such as ['L5.H3'], or take the "
            "census's retrieval heads (retrieval_heads(model) / --heads from an atlas)."
        )
    lay = model.layout
    out = []
    for name in heads:
        try:
            layer_part, head_part = str(name).split(".")
            layer, head = int(layer_part.removeprefix("L")), int(head_part.removeprefix("H"))
        except ValueError:
            raise InputError(f"Head {name!r}: write heads as 'L<layer>.H<head>' (e.g. 'L5.H3').") from None
        if not (layer_part.startswith("L") and head_part.startswith("H")):
            raise InputError(f"Head {name!r}: write heads as 'L<layer>.H<head>' (e.g. 'L5.H3').")
        if not (0 <= layer < lay.n_layers and 0 <= head < lay.n_heads):
            raise InputError(
                f"Head {name!r} does not exist: this model has layers 0..{lay.n_layers - 1} and "
                f"heads 0..{lay.n_heads - 1}."
            )
        out.append(f"L{layer}.H{head}")
    return sorted(set(out), key=lambda h: tuple(int(p[1:]) for p in h.split(".")))


def masking_edit(heads: Sequence[str]) -> Any:
    """The :class:`~lmatlas.edit.Edit` that zeroes each head's ``attn.z``."""
    from lmatlas.edit import Ablate, Edit

    return Edit(tuple(Ablate(head) for head in heads))


def retrieval_heads(model: "Model", top: int = 10, atlas: Any = None) -> list[str]:
    """The ``top`` heads by the census's retrieval score (from ``atlas`` if given, else a census run now)."""
    if top < 1:
        raise InputError(f"top={top}: take at least one retrieval head.")
    if atlas is not None:
        from lmatlas.atlas import Atlas

        atlas = Atlas.open(atlas) if isinstance(atlas, str) else atlas
        table = atlas.sql(
            "SELECT layer, head, score FROM head_scores WHERE detector = 'retrieval' ORDER BY score DESC"
        ).to_pylist()
        if not table:
            raise InputError("This atlas has no retrieval scores: build it with the census stage.")
        return [f"L{row['layer']}.H{row['head']}" for row in table[:top]]
    from lmatlas.census.run import run_census

    score = run_census(model, detectors=["retrieval"])["retrieval"].score  # [layer, head]
    order = torch.argsort(score.flatten(), descending=True)[:top]
    n_heads = score.shape[1]
    return [f"L{int(i) // n_heads}.H{int(i) % n_heads}" for i in order]


def random_heads(model: "Model", n: int, exclude: Sequence[str] = (), seed: int = 0) -> list[str]:
    """``n`` heads drawn at random (seeded) among those not in ``exclude``: the control."""
    lay = model.layout
    pool = [f"L{l}.H{h}" for l in range(lay.n_layers) for h in range(lay.n_heads) if f"L{l}.H{h}" not in set(exclude)]
    if not 1 <= n <= len(pool):
        raise InputError(f"Cannot draw {n} random heads from {len(pool)}.")
    return head_names(model, random.Random(seed).sample(pool, n))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """``[batch]`` entropy (nats) of ``softmax(logits [batch, V])``."""
    log_p = torch.log_softmax(logits.float(), -1)
    return -(log_p.exp() * log_p).sum(-1)


def decore_scores(
    base: torch.Tensor, masked: torch.Tensor, alpha_cap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [batch, V], alpha [batch])``: ``(1 + a) * base - a * masked`` with ``a`` the base entropy."""
    alpha = entropy(base)
    if alpha_cap is not None:
        alpha = alpha.clamp(max=alpha_cap)
    return (1 + alpha[:, None]) * base.float() - alpha[:, None] * masked.float(), alpha


def decore_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    lmatlas_model: "Model | None" = None,
    masked_heads: Sequence[str] | None = (),
    alpha_cap: float | None = None,
    decore_trace: list | None = None,
    masked_cache: Any = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """A ``custom_generate`` callable: DeCoRe greedy decoding (see the module docstring).

    Extra ``generate`` arguments: ``lmatlas_model`` (the :class:`~lmatlas.model.handle.Model`
    wrapping ``model``, which applies the edit), ``masked_heads`` (``["L5.H3", ...]``;
    ``None`` masks nothing), ``alpha_cap``, ``decore_trace`` (a list receiving each step's alpha),
    ``masked_cache`` (an empty cache for the masked copy, e.g. a KV policy's; default a ``DynamicCache``).
    """
    from transformers import DynamicCache

    check_greedy(generation_config, "DeCoRe")
    if lmatlas_model is None or lmatlas_model.hf is not model:
        raise InputError("DeCoRe needs lmatlas_model=<the lmatlas Model wrapping this module> (it applies the edit).")
    edit = None
    if masked_heads is not None:
        edit = masking_edit(head_names(lmatlas_model, masked_heads)).bind(lmatlas_model)  # checked once
    if input_ids.shape[0] != 1 and model_kwargs.get("attention_mask") is not None:
        raise InputError("DeCoRe decodes one sequence (or an unpadded batch) at a time.")
    masked_cache = masked_cache if masked_cache is not None else DynamicCache(config=model.config)

    def scores(outputs: Any, ids: torch.Tensor) -> torch.Tensor:
        base = outputs.logits[:, -1].float()
        seen = masked_cache.get_seq_length()
        with lmatlas_model.hooked(replace=edit) if edit is not None else torch.no_grad():
            masked = (
                model(input_ids=ids[:, seen:], past_key_values=masked_cache, use_cache=True, logits_to_keep=1)
                .logits[:, -1]
                .float()
            )
        out, alpha = decore_scores(base, masked, alpha_cap)
        if decore_trace is not None:
            decore_trace.append(float(alpha[0]))
        return out

    return greedy_loop(
        model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs, scores, streamer
    )


def generate_decore(
    model: "Model",
    prompt: Any,
    max_new_tokens: int = 32,
    *,
    heads: Sequence[str] | None = None,
    alpha_cap: float | None = None,
    chat: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """DeCoRe on an lmatlas model: ``{"text", "token_ids", "heads", "alphas"}``.

    Shorthand for ``lmatlas.generate(model, prompt, strategy=DeCoRe(...))``. ``heads`` default to
    the census's top 10 retrieval heads (:func:`retrieval_heads`); given heads are checked
    before any compute; ``kwargs`` (``edit=``, ``kv=``, transformers' options) go to ``generate``.
    """
    from lmatlas.infer.compose import generate_one
    from lmatlas.infer.decoding.strategies import DeCoRe

    strategy = DeCoRe(tuple(heads) if heads is not None else None, alpha_cap)
    return generate_one(model, prompt, max_new_tokens, strategy, chat=chat, **kwargs)
