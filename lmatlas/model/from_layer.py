"""Run a model from block ``L`` on, given the residual stream that enters block ``L``.

A change at layer ``L`` (a steered neuron, an ablated head) leaves blocks ``0..L-1``
untouched, so a run that repeats them for every change repeats the same work. Capture
the stream once, then start every changed run at ``L``::

    clean = model.run(ids, capture=["resid.pre"])        # every block's input, once
    cache = run_from(model, 12, clean["L12.resid.pre"], replace={"L12.mlp.act": fn})
    # same logits and captured sites (of layers >= 12) as model.run(ids, replace={"L12.mlp.act": fn})

``resid`` is ``[batch, pos, d_model]``: what block ``L`` reads in the full run
(``L{L}.resid.pre``; for ``L = 0`` the embeddings, position embeddings included).

How: the model's own forward runs, so position ids, the attention mask (padding
included, when ``inputs`` carries it), rotary embeddings, Gemma's sliding and global
layer types and the final norm are computed exactly as in a full run. While it runs,
blocks ``0..L-1`` are the identity (nothing of theirs is computed) and a pre-hook on
block ``L`` hands it ``resid`` in place of what reached it; the token embedding is
still looked up and then discarded (a gather, no matmul). The result equals the full
run bit for bit when the batch is the same (tested on every tiny family). Like hook
sessions, a run changes the model's modules while it lasts: one run at a time per model.

Sites before ``L`` can be neither captured nor replaced (they are not computed):
asking is a :class:`~lmatlas.errors.SiteError`. ``model.work`` counts the blocks run
(``n_layers - L``, or ``stop_after + 1 - L``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from lmatlas.errors import InputError, SiteError
from lmatlas.model.sites import check_layer
from lmatlas.model.work import Work

if TYPE_CHECKING:
    from lmatlas.model.cache import ActivationCache
    from lmatlas.model.handle import Inputs, Model


def _identity(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """What a skipped block does: pass the stream on (every family's block returns the stream itself)."""
    return hidden_states


@contextmanager
def starting_at(model: "Model", layer: int, resid: torch.Tensor) -> Iterator[None]:
    """Inside the block, every forward of ``model`` skips blocks ``0..layer-1`` and feeds ``resid`` to ``layer``."""
    blocks = model.blocks
    saved = [blocks[i].__dict__.get("forward") for i in range(layer)]  # an instance forward (accelerate) is kept

    def feed(module, args, kwargs):
        if args:
            return (resid, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": resid}

    handle = blocks[layer].register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
    for i in range(layer):
        blocks[i].forward = _identity
    try:
        yield
    finally:
        handle.remove()
        for i, forward in enumerate(saved):
            if forward is None:
                del blocks[i].forward
            else:
                blocks[i].forward = forward


def _check_sites(model: "Model", layer: int, capture: Any, replace: Any) -> None:
    """Refuses sites before ``layer`` (they are not computed)."""
    sites = (model.sites(capture) if capture else []) + [r.site for r in model.replacements(replace)]
    early = sorted({str(s) for s in sites if s.layer < layer})
    if early:
        raise SiteError(
            f"A run that starts at block {layer} does not compute {', '.join(early)}: capture or replace "
            f"sites of layers >= {layer}, or start earlier."
        )


def run_from(
    model: "Model",
    layer: int,
    resid: torch.Tensor,
    inputs: "Inputs | None" = None,
    *,
    capture: Any = (),
    replace: Any = None,
    grad: bool = False,
    stop_after: int | None = None,
    lm_head: bool = True,
) -> "ActivationCache":
    """:meth:`Model.run` from block ``layer`` on, with ``resid [batch, pos, d_model]`` entering it.

    Args:
        inputs: the token ids (or tokenizer output) of the full run, needed only when its
            attention mask matters (padding); default: placeholder ids of ``resid``'s shape
            (positions ``0..pos-1``, no padding).
        capture, replace, grad, stop_after, lm_head: as :meth:`Model.run` (sites of layers >= ``layer``).

    Returns:
        the :class:`~lmatlas.model.cache.ActivationCache` of :meth:`Model.run` (logits and captured sites).
    """
    start = check_layer(int(layer), model.layout)
    if resid.dim() != 3 or resid.shape[-1] != model.layout.d_model:
        raise InputError(f"resid must be [batch, pos, {model.layout.d_model}], got {tuple(resid.shape)}.")
    if stop_after is not None and int(stop_after) < start:
        raise SiteError(f"stop_after={stop_after} lies before the start block {start}.")
    batch = model.tokenize(torch.zeros(resid.shape[:2], dtype=torch.long) if inputs is None else inputs)
    if tuple(batch["input_ids"].shape) != tuple(resid.shape[:2]):
        raise InputError(f"inputs are {tuple(batch['input_ids'].shape)} tokens but resid is {tuple(resid.shape[:2])}.")
    _check_sites(model, start, capture, replace)
    stream = resid.to(device=model.device, dtype=model.dtype)
    with starting_at(model, start, stream):
        cache = model.run(batch, capture=capture, replace=replace, grad=grad, stop_after=stop_after, lm_head=lm_head)
    skipped = int(cache.input_ids.numel()) * start  # model.run counted blocks 0..layer-1 too
    model.work._total = model.work.snapshot() - Work(0, 0, skipped)
    return cache
