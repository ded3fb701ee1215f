"""The hooks of one model: the stack of active sessions and the PyTorch hooks that serve them.

Each :class:`~lmatlas.model.model.Model` owns one :class:`HookStack`
(``model.hook_stack``; per model, never per process, so two models in two threads do
not see each other's hooks). Entering a :class:`~lmatlas.model.hooks.HookSession`
pushes it; the stack then hooks the union of the sites of all active sessions,
once per hook point, and dispatches every value through all of them (replacements
outer first, then captures; see :mod:`lmatlas.model.hooks`). Leaving pops it and
re-hooks what remains.

A forward pre-hook on the decoder (``model.hf.base_model``) records where each call
is (:class:`~lmatlas.model.positions.CallInfo`): the absolute positions of its tokens
(from the KV cache's length), the generation step and the prompt length.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from lmatlas.errors import HookOrderError
from lmatlas.model.arch import get_path
from lmatlas.model.attention import AttentionProbe, Probe, ProbeChain, wrapper_name
from lmatlas.model.dictionary_sites import Attached
from lmatlas.model.dictionary_sites import write as write_features
from lmatlas.model.norms import frozen_scale
from lmatlas.model.positions import CallInfo
from lmatlas.model.replacement import BoundReplacement
from lmatlas.model.sites import Site

if TYPE_CHECKING:
    from lmatlas.model.handle import Model
    from lmatlas.model.hooks import HookSession

_ATTENTION_FN_SITES = frozenset({"attn.q", "attn.k", "attn.v", "attn.pattern"})


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def splice(exact: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """``exact``'s value with ``path``'s gradient: ``exact.detach() + (path - path.detach())``.

    ``path - path.detach()`` is exactly zero for finite values, so the result equals
    ``exact`` bit for bit, while autograd sees only ``path``.
    """
    return exact.detach() + (path - path.detach())


class _SiteProbe(Probe):
    """Dispatches q/k/v and the pattern of one layer (inside the attention function) to the stack."""

    def __init__(self, stack: "HookStack", layer: int, wants_pattern: bool):
        self.stack, self.layer, self.wants_pattern = stack, layer, wants_pattern

    @property
    def route_grad(self) -> bool:
        """Splice the eager pattern into the output (so gradients reach ``attn.pattern``)."""
        return torch.is_grad_enabled() and Site(self.layer, "attn.pattern") in self.stack.capturers

    def on_qkv(self, query, key, value):
        # The attention interface passes [batch, head, pos, d_head]; sites are [batch, pos, head, d_head].
        call = self.stack.current_call(query.shape[0], query.shape[2])
        out = []
        for name, tensor in (("attn.q", query), ("attn.k", key), ("attn.v", value)):
            site = Site(self.layer, name)
            if site not in self.stack.sites:
                out.append(tensor)
                continue
            where = call.key_positions(tensor.shape[2]) if site.info.key_positions else call.positions
            seen = tensor.transpose(1, 2)
            new = self.stack.apply(site, seen, where)
            out.append((seen if new is None else new).transpose(1, 2))  # the model consumes the site's tensor
        return tuple(out)

    def on_pattern(self, pattern):
        call = self.stack.current_call(pattern.shape[0], pattern.shape[2])
        return self.stack.apply(Site(self.layer, "attn.pattern"), pattern, call.positions)


class HookStack:
    """The active sessions of one model and the hooks installed for them."""

    def __init__(self, model: "Model"):
        self.model = model
        self.sessions: list["HookSession"] = []
        self.sites: frozenset[Site] = frozenset()
        self.replacers: dict[Site, list[BoundReplacement]] = {}
        self.capturers: dict[Site, list["HookSession"]] = {}
        self.spliced: dict[Site, list[Attached]] = {}  # written site -> dictionaries spliced there
        self.call: CallInfo | None = None
        self._handles: list[Any] = []
        self._probed: list[torch.nn.Module] = []
        self._saved_attn: str | None = None
        self._scratch: dict[tuple[int, str], torch.Tensor] = {}

    # -- the stack -----------------------------------------------------------------------------------
    def push(self, session: "HookSession") -> None:
        self.sessions.append(session)
        try:
            self._refresh()
        except BaseException:
            self.sessions.pop()
            self._refresh()
            raise

    def pop(self, session: "HookSession") -> None:
        if not self.sessions or self.sessions[-1] is not session:
            raise HookOrderError(
                "Hook sessions must be left in the reverse order they were entered (nest them with `with`); "
                f"the innermost active session is {self.sessions[-1] if self.sessions else None!r}."
            )
        self.sessions.pop()
        self._refresh()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the model as if no session were active (e.g. to measure clean statistics), then restore them."""
        saved, call = self.sessions, self.call
        self.sessions = []
        self._refresh()
        try:
            yield
        finally:
            self.sessions, self.call = saved, call
            self._refresh()

    # -- dispatch ------------------------------------------------------------------------------------------
    def current_call(self, batch: int, n: int) -> CallInfo:
        """The call being run (or a fresh-sequence stand-in when the decoder was called directly)."""
        call = self.call
        if call is None or call.batch != batch:
            prompt = self._prompt_len() or n
            return CallInfo(torch.arange(n), step=0, batch=batch, prompt_len=prompt)
        return call

    def apply(self, site: Site, value: torch.Tensor, where: torch.Tensor) -> torch.Tensor | None:
        """Replace (every session, outer first) then capture; returns the new value or ``None``."""
        new = None
        replacers = self.replacers.get(site)
        if replacers:
            call = self.current_call(value.shape[0], where.numel())
            for replacement in replacers:
                out = replacement.apply(value if new is None else new, where.to(value.device), call)
                if out is not None:
                    new = out
        for entry in self.spliced.get(site, ()):  # feature sites: x + decode(f') - decode(f), or replace mode
            current = value if new is None else new
            source = self._scratch[(site.layer, "mlp.in")] if entry.transcoder else current
            out = write_features(entry, current, source, where, self.apply, entry.error_site in self.sites)
            if out is not None:
                new = out
        for session in self.capturers.get(site, ()):
            kept = value if new is None else new
            session.store[str(site)] = kept if session.keep_grad else kept.detach()
        return new

    def _prompt_len(self) -> int | None:
        return next((s.prompt_len for s in self.sessions if s.prompt_len is not None), None)

    # -- installation ----------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        self._remove()
        if not self.sessions:
            return
        capturers: dict[Site, list] = defaultdict(list)
        replacers: dict[Site, list] = defaultdict(list)
        probes: dict[int, list[AttentionProbe]] = defaultdict(list)
        for session in self.sessions:
            for site in session.capture:
                capturers[site].append(session)
            for replacement in session.replacements:
                replacers[replacement.site].append(replacement)
            for layer, probe in session.probes.items():
                probes[layer].append(probe)
        self.capturers, self.replacers = dict(capturers), dict(replacers)
        self.sites = frozenset(capturers) | frozenset(replacers)
        spliced: dict[Site, list[Attached]] = defaultdict(list)
        for site in sorted(s for s in self.sites if s.is_feature):
            entry = self.model.dictionaries.get(site)  # raises (before any forward) when none is attached
            if entry not in spliced[entry.writes]:
                spliced[entry.writes].append(entry)
        for entry in self.model.dictionaries:  # replace mode: the dictionary stands in, in every hooked run
            if entry.mode == "replace" and entry not in spliced[entry.writes]:
                spliced[entry.writes].append(entry)
        self.spliced = dict(spliced)
        self.sites |= frozenset(spliced) | frozenset(e.site for entries in spliced.values() for e in entries)
        self._install(probes)

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._probed:
            module._lmatlas_probe = None
        self._probed.clear()
        if self._saved_attn is not None and not self.sessions:
            self.model.hf.config._attn_implementation = self._saved_attn
            self._saved_attn = None
        self._scratch.clear()
        self.sites, self.capturers, self.replacers, self.spliced = frozenset(), {}, {}, {}

    def _install(self, extra_probes: dict[int, list[AttentionProbe]]) -> None:
        by_layer: dict[int, set[str]] = defaultdict(set)
        for site in self.sites:
            by_layer[site.layer].add(site.component)
        spec, blocks = self.model.spec, self.model.blocks
        self._handles.append(self.model.hf.base_model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        probed = False
        for layer in sorted(set(by_layer) | set(extra_probes)):
            components, block = by_layer.get(layer, set()), blocks[layer]
            if components & {"resid.pre", "resid.mid"}:
                self._hook(block, pre=True, fn=self._resid_pre(layer))
            if "resid.post" in components:
                self._hook(block, pre=False, fn=self._plain_output(Site(layer, "resid.post")))
            chain: list[AttentionProbe] = []
            if components & _ATTENTION_FN_SITES:
                chain.append(_SiteProbe(self, layer, "attn.pattern" in components))
            chain.extend(extra_probes.get(layer, ()))
            if chain:
                attention = get_path(block, spec.attn)
                attention._lmatlas_probe = chain[0] if len(chain) == 1 else ProbeChain(chain)
                self._probed.append(attention)
                probed = True
            if components & {"attn.z", "attn.out"}:
                self._hook(get_path(block, spec.o), pre=True, fn=self._attn_z(layer))
            if components & {"attn.out", "resid.mid"}:
                self._hook(get_path(block, spec.attn_write), pre=False, fn=self._attn_write(layer, components))
            if components & {"mlp.in", "mlp.F", "mlp.E"}:  # a transcoder reads the MLP's normalised input
                self._hook(get_path(block, spec.mlp), pre=True, fn=self._mlp_in(layer))
            if "mlp.act" in components:
                self._hook(get_path(block, spec.mlp_out), pre=True, fn=self._mlp_act(layer))
            if "mlp.out" in components:
                self._hook(get_path(block, spec.mlp_write), pre=False, fn=self._plain_output(Site(layer, "mlp.out")))
        config = self.model.hf.config
        if probed and self._saved_attn is None:
            self._saved_attn = config._attn_implementation or "eager"
            config._attn_implementation = wrapper_name(self._saved_attn)
        elif not probed and self._saved_attn is not None:
            config._attn_implementation = self._saved_attn
            self._saved_attn = None

    def _hook(self, module: torch.nn.Module, pre: bool, fn: Callable) -> None:
        if pre:
            self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(fn))

    # -- hook functions, one per hook point ------------------------------------------------------------------
    def _on_call(self, module, args, kwargs) -> None:
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        if tokens is None:
            return
        batch, n = int(tokens.shape[0]), int(tokens.shape[1])
        past = kwargs.get("past_key_values")
        start = int(past.get_seq_length()) if past is not None else 0
        positions = torch.arange(start, start + n)
        previous = self.call
        if start == 0 or previous is None:
            self.call = CallInfo(positions, step=0, batch=batch, prompt_len=self._prompt_len() or n)
        else:
            self.call = CallInfo(positions, step=previous.step + 1, batch=batch, prompt_len=previous.prompt_len)

    def _positions(self, value: torch.Tensor) -> torch.Tensor:
        return self.current_call(value.shape[0], value.shape[1]).positions

    def _resid_pre(self, layer: int) -> Callable:
        site = Site(layer, "resid.pre")

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = self.apply(site, hidden, self._positions(hidden)) if site in self.sites else None
            self._scratch[(layer, "resid.pre")] = hidden if new is None else new
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def _plain_output(self, site: Site) -> Callable:
        """``resid.post`` (block output) and ``mlp.out`` (the MLP write): the output itself is the site."""

        def hook(module, args, output):
            value = _first(output)
            new = self.apply(site, value, self._positions(value))
            return None if new is None else _with_first(output, new)

        return hook

    def _attn_z(self, layer: int) -> Callable:
        site, lay = Site(layer, "attn.z"), self.model.layout

        def hook(module, args, kwargs):
            flat = args[0]  # [batch, pos, head * d_head]
            z = flat.view(*flat.shape[:-1], lay.n_heads, lay.d_head)
            new = self.apply(site, z, self._positions(z)) if site in self.sites else None
            used = z if new is None else new
            self._scratch[(layer, "attn.z")] = used
            if new is None and not torch.is_grad_enabled():
                return None
            return (used.reshape(flat.shape), *args[1:]), kwargs  # the projection consumes the site's tensor

        return hook

    def _attn_write(self, layer: int, components: set[str]) -> Callable:
        spec, weights = self.model.spec, self.model.W
        out_site, mid_site = Site(layer, "attn.out"), Site(layer, "resid.mid")

        def hook(module, args, output):
            write = _first(output)  # [batch, pos, d_model]
            grad = torch.is_grad_enabled()
            new_write = None
            if "attn.out" in components:
                z = self._scratch[(layer, "attn.z")]
                per_head = torch.einsum("bphd,hdm->bphm", z, weights.W_O(layer))
                bias = weights.b_O(layer)
                if spec.attn_post_norm:
                    scale = frozen_scale(module, args[0], spec.norm_kind)  # [batch, pos, d_model]
                    per_head = (per_head.float() * scale.unsqueeze(2)).to(write.dtype)
                    bias = None if bias is None else (bias.float() * scale).to(write.dtype)
                for session in self.capturers.get(out_site, ()):
                    session.extras[f"L{layer}.attn.bias"] = bias if bias is None or session.keep_grad else bias.detach()
                new_heads = self.apply(out_site, per_head, self._positions(write))
                if new_heads is not None or grad:
                    heads = per_head if new_heads is None else new_heads
                    value = write if new_heads is None else write + (new_heads - per_head).sum(dim=2)
                    path = heads.sum(dim=2) if bias is None else heads.sum(dim=2) + bias
                    new_write = splice(value, path) if grad else value
            if "resid.mid" in components:
                pre = self._scratch[(layer, "resid.pre")]
                current = write if new_write is None else new_write
                mid = pre + current
                new_mid = self.apply(mid_site, mid, self._positions(write))
                if new_mid is not None:
                    new_write = new_mid - pre
                elif grad:  # value: current; gradient: through mid (the direct residual path is cancelled)
                    new_write = splice(current, mid) - (pre - pre.detach())
            return None if new_write is None else _with_first(output, new_write)

        return hook

    def _mlp_in(self, layer: int) -> Callable:
        site = Site(layer, "mlp.in")

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            grad = torch.is_grad_enabled() and site in self.sites
            if grad:  # its own node (without a pre-norm it is resid.mid itself): only the MLP's reading
                hidden = hidden.view_as(hidden)
            new = self.apply(site, hidden, self._positions(hidden)) if site in self.sites else None
            used = hidden if new is None else new
            self._scratch[(layer, "mlp.in")] = used
            if new is None and not grad:
                return None
            if args:
                return (used, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": used}

        return hook

    def _mlp_act(self, layer: int) -> Callable:
        site = Site(layer, "mlp.act")

        def hook(module, args, kwargs):
            new = self.apply(site, args[0], self._positions(args[0]))
            return None if new is None else ((new, *args[1:]), kwargs)

        return hook
