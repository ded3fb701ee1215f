"""Hook sessions: capture and replace site values in flight, nestable and differentiable.

A :class:`HookSession` is what one ``with`` block adds to a model's hooks::

    with model.hooked(replace={"L3.attn.z": fn}):            # outer
        with model.hooked(capture=["L3.attn.z"]) as inner:   # inner
            model.generate("...")

**Nesting.** Sessions stack on the model (:class:`~lmatlas.model.hook_stack.HookStack`)
and unwind in LIFO order, as TransformerLens's hook contexts do. At every site, in
every forward:

1. replacements apply in stacking order, **outer first**: each sees the value the
   previous one produced;
2. then every session that captures the site stores the final value, the one the
   model actually uses (captures of repeated forwards overwrite each other);
3. attention probes (:mod:`lmatlas.model.attention`) chain in the same order.

Leaving a session (normally or by an exception) removes exactly what it added; the
sessions around it keep working. Leaving out of order is an error.

**Gradients.** Run the forward with gradients enabled (``Model.run(..., grad=True)``
or your own ``torch.enable_grad()``) and a session with ``keep_grad=True`` stores
tensors that lie on the path to the logits, for all twelve components:
``torch.autograd.grad(loss, cache["L3.attn.pattern"])`` is the derivative of the
loss with respect to that site, with the site's replacement semantics (the pattern
multiplies the values; ``attn.out`` adds its per-head change to the write;
``resid.mid`` sets the stream). Sites computed next to the native path (q/k/v
transposes, the eager pattern, per-head writes, the mid stream) are spliced into
it with ``exact.detach() + (site_path - site_path.detach())``: the value is the
native one bit for bit, the gradient flows through the site.

Where each site is read (hook points):

=============  ==============================================================
resid.pre      forward pre-hook on the block (its ``hidden_states`` input)
resid.post     forward hook on the block (its output)
resid.mid      forward hook on the attention write: ``resid.pre + write``
attn.q/k/v     attention probe, inside the registered attention function
attn.pattern   attention probe (eager pattern next to the fast kernel)
(any probe)    ``probes={layer: probe}``: your own attention probe, run after the
               site probe of that layer (e.g. streaming statistics)
attn.z         forward pre-hook on the output projection ``o``
attn.out       forward hook on the attention write: ``z_h @ W_O[h]`` per head,
               times the scale of a post-attention norm if any
mlp.in         forward pre-hook on the MLP (its input, after the pre-MLP norm)
mlp.act        forward pre-hook on the down projection ``mlp_out``
mlp.out        forward hook on the MLP write (``mlp`` or its post norm)
(features)     ``L15.resid.post.F``: spliced into the site they write (see
               :mod:`lmatlas.model.dictionary_sites`); a transcoder's ``L15.mlp.F``
               reads ``mlp.in`` and writes ``mlp.out``
=============  ==============================================================

Replacements (tensors, numbers or ``fn(value, ctx)``) and position selectors
(``"L3.resid.post@-1"``) are described in :mod:`lmatlas.model.replacement` and
:mod:`lmatlas.model.positions`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

from lmatlas.model.attention import AttentionProbe
from lmatlas.model.replacement import BoundReplacement, Replacement
from lmatlas.model.sites import Site, check_layer

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

__all__ = ["HookSession", "Replacement", "BoundReplacement"]


class HookSession:
    """Hooks for one ``with`` block: captures go to ``store``, replacements are applied.

    Args:
        model: the lmatlas model.
        capture: sites whose values are stored in ``store`` (keyed by site name).
        replace: bound replacements, applied in order (see :meth:`Model.hooked`, which
            builds them from ``{site_name: value}``).
        store: where captured tensors go (``{"L3.attn.z": tensor}``); per-layer
            attention-bias terms of the residual decomposition go to ``extras``.
        keep_grad: store captured tensors attached to the autograd graph (needs a
            forward with gradients enabled).
        probes: ``layer -> probe`` installed on that layer's attention module after the
            site probes (an :class:`~lmatlas.model.attention.Probe`, for example one whose
            ``on_call`` reduces the pattern chunk by chunk).
        prompt_len: the prompt length that negative positions count from (default:
            the length of the first forward of a sequence).
    """

    def __init__(
        self,
        model: "Model",
        capture: Iterable[Site] = (),
        replace: Iterable[BoundReplacement] | Mapping[Site, Replacement] = (),
        store: dict[str, torch.Tensor] | None = None,
        extras: dict[str, torch.Tensor | None] | None = None,
        keep_grad: bool = False,
        probes: Mapping[int, AttentionProbe] | None = None,
        prompt_len: int | None = None,
    ):
        self.model = model
        self.capture = frozenset(capture)
        if isinstance(replace, Mapping):
            replace = [BoundReplacement(site, value) for site, value in replace.items()]
        self.replacements: tuple[BoundReplacement, ...] = tuple(replace)
        self.store = store if store is not None else {}
        self.extras = extras if extras is not None else {}
        self.keep_grad = keep_grad
        self.probes = {check_layer(layer, model.layout): probe for layer, probe in (probes or {}).items()}
        self.prompt_len = prompt_len
        self.active = False

    @property
    def sites(self) -> set[Site]:
        """Every site this session captures or replaces."""
        return set(self.capture) | {r.site for r in self.replacements}

    def __enter__(self) -> "HookSession":
        self.model.hook_stack.push(self)
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self.model.hook_stack.pop(self)  # raises (and stays active) when left out of order
            self.active = False

    def __repr__(self) -> str:
        return (
            f"HookSession(capture={sorted(map(str, self.capture))}, "
            f"replace={[r.name for r in self.replacements]}, keep_grad={self.keep_grad})"
        )
