"""Capture and replace site values in flight, with hooks on the native modules.

A :class:`HookSession` is installed for the duration of a ``with`` block. It puts
PyTorch hooks on the Hugging Face modules named by the model's ArchSpec, and,
only when q/k/v/pattern are asked for, an attention probe (see
:mod:`lmatlas.model.attention`). Where each site is read:

=============  ==============================================================
site           where
=============  ==============================================================
resid.pre      forward pre-hook on the block (its ``hidden_states`` input)
resid.post     forward hook on the block (its output)
resid.mid      forward hook on the attention write: ``resid.pre + write``
attn.q/k/v     attention probe, inside the registered attention function
attn.pattern   attention probe (eager pattern next to the fast kernel)
(any probe)    ``probes={layer: probe}``: your own :class:`~lmatlas.model.attention.Probe`,
               run after the site probe of that layer (e.g. streaming statistics)
attn.z         forward pre-hook on the output projection ``o``
attn.out       forward hook on the attention write: ``z_h @ W_O[h]`` per head,
               times the frozen scale of a post-attention norm if any
mlp.act        forward pre-hook on the down projection ``mlp_out``
mlp.out        forward hook on the MLP write (``mlp`` or its post norm)
=============  ==============================================================

A *replacement* is a tensor of the site's shape, or a function
``fn(value, site) -> tensor | None`` (``None`` keeps the value). Replacing
``attn.out`` adds the change of the per-head sum to the write; replacing
``resid.mid`` rewrites the attention write so that ``resid.pre + write`` equals
the new value. A site that is both captured and replaced is captured *after*
replacement: the cache holds what the model actually used.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Union

import torch

from lmatlas.errors import SiteError
from lmatlas.model.arch import NormKind, get_path
from lmatlas.model.attention import AttentionProbe, Probe, ProbeChain, wrapper_name
from lmatlas.model.sites import Site, check_layer

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

Replacement = Union[torch.Tensor, Callable[[torch.Tensor, Site], Union[torch.Tensor, None]]]


def post_norm_scale(norm: torch.nn.Module, x: torch.Tensor, kind: NormKind) -> torch.Tensor:
    """``[batch, pos, d_model]`` float32 factor with ``norm(x) == x * factor`` for an RMS norm.

    Freezing this factor at its measured value makes the norm linear, so a sum of
    per-head inputs maps to a sum of per-head outputs.
    """
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = norm.variance_epsilon
    weight = norm.weight.float()
    gain = 1.0 + weight if kind is NormKind.RMS_OFFSET else weight
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * gain


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


class _AttentionProbe(Probe):
    """Sees q/k/v and the pattern of one layer inside the registered attention function."""

    def __init__(self, session: "HookSession", layer: int):
        self.session, self.layer = session, layer
        self.wants_pattern = session.wants(Site(layer, "attn.pattern"))

    def on_qkv(self, query, key, value):
        # The attention interface passes [batch, head, pos, d_head]; sites are [batch, pos, head, d_head].
        out = []
        for name, tensor in (("attn.q", query), ("attn.k", key), ("attn.v", value)):
            new = self.session.apply(Site(self.layer, name), tensor.transpose(1, 2))
            out.append(tensor if new is None else new.transpose(1, 2))
        return tuple(out)

    def on_pattern(self, pattern):
        return self.session.apply(Site(self.layer, "attn.pattern"), pattern)


class HookSession:
    """Hooks for one ``with`` block: captures go to ``store``, replacements are applied.

    Args:
        model: the lmatlas model.
        capture: sites whose values are stored in ``store`` (keyed by site name).
        replace: site -> replacement.
        store: where captured tensors go (``{"L3.attn.z": tensor}``); per-layer
            attention-bias terms of the decomposition go to ``extras``.
        keep_grad: keep captured tensors attached to the autograd graph.
        probes: ``layer -> probe`` installed on that layer's attention module in
            addition to the sites (an :class:`~lmatlas.model.attention.Probe`, for
            example one whose ``on_call`` reduces the pattern chunk by chunk). The
            model then runs lmatlas's attention function, whose output still comes
            from the base kernel unless a probe replaces something.
    """

    def __init__(
        self,
        model: "Model",
        capture: Iterable[Site] = (),
        replace: dict[Site, Replacement] | None = None,
        store: dict[str, torch.Tensor] | None = None,
        extras: dict[str, torch.Tensor | None] | None = None,
        keep_grad: bool = False,
        probes: Mapping[int, AttentionProbe] | None = None,
    ):
        self.model = model
        self.capture = set(capture)
        self.replace = dict(replace or {})
        self.store = store if store is not None else {}
        self.extras = extras if extras is not None else {}
        self.keep_grad = keep_grad
        self.probes = {check_layer(layer, model.layout): probe for layer, probe in (probes or {}).items()}
        self._handles: list[Any] = []
        self._probed: list[torch.nn.Module] = []
        self._saved_attn: str | None = None
        self._scratch: dict[tuple[int, str], torch.Tensor] = {}

    # -- the one place values are captured and replaced ----------------------------------------
    def wants(self, site: Site) -> bool:
        return site in self.capture or site in self.replace

    def apply(self, site: Site, value: torch.Tensor) -> torch.Tensor | None:
        """Replace (if asked) then capture (if asked). Returns the new value or ``None`` if unchanged."""
        new = None
        if site in self.replace:
            replacement = self.replace[site]
            new = replacement(value, site) if callable(replacement) else replacement
            if new is not None:
                new = torch.as_tensor(new, dtype=value.dtype, device=value.device)
                try:
                    new = new.expand_as(value)  # scalars and broadcastable tensors
                except RuntimeError:
                    raise SiteError(
                        f"Replacement for {site} has shape {tuple(new.shape)}, expected {tuple(value.shape)} "
                        f"({site.info.shape})."
                    ) from None
        if site in self.capture:
            kept = value if new is None else new
            self.store[str(site)] = kept if self.keep_grad else kept.detach()
        return new

    # -- installation ------------------------------------------------------------------------------
    def __enter__(self) -> "HookSession":
        try:
            self._install()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._probed:
            module._lmatlas_probe = None
        self._probed.clear()
        if self._saved_attn is not None:
            self.model.hf.config._attn_implementation = self._saved_attn
            self._saved_attn = None
        self._scratch.clear()

    def _install(self) -> None:
        by_layer: dict[int, set[str]] = defaultdict(set)
        for site in self.capture | set(self.replace):
            by_layer[site.layer].add(site.component)
        spec, blocks = self.model.spec, self.model.blocks
        needs_attention_fn = False
        for layer in sorted(set(by_layer) | set(self.probes)):
            components, block = by_layer.get(layer, set()), blocks[layer]
            if components & {"resid.pre", "resid.mid"}:
                self._hook(block, pre=True, fn=self._resid_pre(layer))
            if "resid.post" in components:
                self._hook(block, pre=False, fn=self._resid_post(layer))
            probes: list[AttentionProbe] = []
            if components & {"attn.q", "attn.k", "attn.v", "attn.pattern"}:
                probes.append(_AttentionProbe(self, layer))
            if layer in self.probes:
                probes.append(self.probes[layer])
            if probes:
                attention = get_path(block, spec.attn)
                attention._lmatlas_probe = probes[0] if len(probes) == 1 else ProbeChain(probes)
                self._probed.append(attention)
                needs_attention_fn = True
            if components & {"attn.z", "attn.out"}:
                self._hook(get_path(block, spec.o), pre=True, fn=self._attn_z(layer))
            if components & {"attn.out", "resid.mid"}:
                self._hook(get_path(block, spec.attn_write), pre=False, fn=self._attn_write(layer, components))
            if "mlp.act" in components:
                self._hook(get_path(block, spec.mlp_out), pre=True, fn=self._mlp_act(layer))
            if "mlp.out" in components:
                self._hook(get_path(block, spec.mlp_write), pre=False, fn=self._mlp_out(layer))
        if needs_attention_fn:
            config = self.model.hf.config
            self._saved_attn = config._attn_implementation
            config._attn_implementation = wrapper_name(self._saved_attn or "eager")

    def _hook(self, module: torch.nn.Module, pre: bool, fn: Callable) -> None:
        if pre:
            self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(fn))

    # -- hook functions, one per hook point ----------------------------------------------------------
    def _resid_pre(self, layer: int) -> Callable:
        site = Site(layer, "resid.pre")

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = self.apply(site, hidden)
            self._scratch[(layer, "resid.pre")] = hidden if new is None else new
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def _resid_post(self, layer: int) -> Callable:
        site = Site(layer, "resid.post")

        def hook(module, args, output):
            new = self.apply(site, _first(output))
            return None if new is None else _with_first(output, new)

        return hook

    def _attn_z(self, layer: int) -> Callable:
        site, lay = Site(layer, "attn.z"), self.model.layout

        def hook(module, args, kwargs):
            flat = args[0]  # [batch, pos, head * d_head]
            z = flat.view(*flat.shape[:-1], lay.n_heads, lay.d_head)
            new = self.apply(site, z)
            self._scratch[(layer, "attn.z")] = z if new is None else new
            if new is None:
                return None
            return (new.reshape(flat.shape), *args[1:]), kwargs

        return hook

    def _attn_write(self, layer: int, components: set[str]) -> Callable:
        spec, weights = self.model.spec, self.model.W

        def hook(module, args, output):
            write = _first(output)  # [batch, pos, d_model]
            new_write = None
            if "attn.out" in components:
                z = self._scratch[(layer, "attn.z")]
                per_head = torch.einsum("bphd,hdm->bphm", z, weights.W_O(layer))
                bias = weights.b_O(layer)
                if spec.attn_post_norm:
                    scale = post_norm_scale(module, args[0], spec.post_norm_kind)
                    per_head = (per_head.float() * scale.unsqueeze(2)).to(write.dtype)
                    bias = None if bias is None else (bias.float() * scale).to(write.dtype)
                self.extras[f"L{layer}.attn.bias"] = bias if bias is None or self.keep_grad else bias.detach()
                new_heads = self.apply(Site(layer, "attn.out"), per_head)
                if new_heads is not None:
                    new_write = write + (new_heads - per_head).sum(dim=2)
            if "resid.mid" in components:
                pre = self._scratch[(layer, "resid.pre")]
                current = write if new_write is None else new_write
                new_mid = self.apply(Site(layer, "resid.mid"), pre + current)
                if new_mid is not None:
                    new_write = new_mid - pre
            return None if new_write is None else _with_first(output, new_write)

        return hook

    def _mlp_act(self, layer: int) -> Callable:
        site = Site(layer, "mlp.act")

        def hook(module, args, kwargs):
            new = self.apply(site, args[0])
            return None if new is None else ((new, *args[1:]), kwargs)

        return hook

    def _mlp_out(self, layer: int) -> Callable:
        site = Site(layer, "mlp.out")

        def hook(module, args, output):
            new = self.apply(site, _first(output))
            return None if new is None else _with_first(output, new)

        return hook
