"""Model: a Hugging Face causal LM, its tokenizer and its ArchSpec, composed (not subclassed).

>>> import lmatlas
>>> model = lmatlas.load()                                   # doctest: +SKIP
>>> cache = model.run("The Eiffel Tower is in", capture=["attn.pattern", "L3.mlp.act"])   # doctest: +SKIP
>>> cache.pattern(5, head=2)                                 # [batch, pos, key_pos]  # doctest: +SKIP
>>> with model.hooked(replace={"L3.attn.z": lambda z, ctx: z * 0}):                    # doctest: +SKIP
...     model.generate("The Eiffel Tower is in")             # layer 3's attention silenced
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from lmatlas.errors import InputError, NotACausalLMError, SiteError
from lmatlas.model import comparison, generation
from lmatlas.model.arch import ArchSpec, HeadLayout, get_path, read_layout
from lmatlas.model.cache import ActivationCache
from lmatlas.model.dictionary_sites import DictionaryRegistry
from lmatlas.model.families import spec_for_model_type
from lmatlas.model.generation import describe_edit
from lmatlas.model.hook_stack import HookStack
from lmatlas.model.hooks import HookSession
from lmatlas.model.positions import split_site_name
from lmatlas.model.provenance import Provenance
from lmatlas.model.replacement import BoundReplacement, Replacement
from lmatlas.model.sites import COMPONENTS, Site, check_layer, parse_sites
from lmatlas.model.weights import ModelWeights
from lmatlas.model.work import WorkCounter

if TYPE_CHECKING:
    from lmatlas.model.edited import EditedModel

Inputs = Union[str, Sequence[str], torch.Tensor, Mapping[str, torch.Tensor]]
SiteNames = Union[str, Site, Iterable[Union[str, Site]]]


class Model:
    """A loaded causal LM with lmatlas's map of it.

    Attributes:
        hf: the native ``*ForCausalLM`` module (hooks go on its modules).
        tokenizer: its tokenizer.
        spec: the family's :class:`~lmatlas.model.arch.ArchSpec`.
        layout: sizes (layers, heads, KV heads, d_head, neurons, vocab).
        W: per-head / per-neuron weight views (:class:`~lmatlas.model.weights.ModelWeights`).
        provenance: source, file and hash.
        hook_stack: the active hook sessions of this model (see :mod:`lmatlas.model.hooks`).
        dictionaries: the sparse dictionaries attached to sites (``attach``/``detach``); their latents
            are sites (``L15.resid.post.F123``, see :mod:`lmatlas.model.dictionary_sites`).
        memo: what upper layers compute once per model and keep (``{module name: value}``, e.g. the
            corpus statistics of mean ablation); they never set attributes on the model itself.
        work: forwards, tokens and layer-tokens run so far (:mod:`lmatlas.model.work`).
    """

    def __init__(self, hf: nn.Module, tokenizer: Any, spec: ArchSpec, provenance: Provenance):
        self.hf = hf
        self.tokenizer = tokenizer
        self.spec = spec
        self.layout: HeadLayout = read_layout(spec, hf)
        self.W = ModelWeights(spec, hf, self.layout)
        self.provenance = provenance
        self.hook_stack = HookStack(self)
        self.dictionaries = DictionaryRegistry(self.layout)
        self.memo: dict[str, Any] = {}
        self.work = WorkCounter()

    @classmethod
    def from_hf(
        cls,
        hf: nn.Module,
        tokenizer: Any,
        source: str = "in-memory",
        file: str | None = None,
        sha256: str | None = None,
        revision: str | None = None,
    ) -> "Model":
        """Wrap an already-loaded Hugging Face causal LM (``sha256`` of ``file`` if already known)."""
        if hf.get_output_embeddings() is None:
            raise NotACausalLMError(
                f"{type(hf).__name__} has no language-model head: lmatlas needs a *ForCausalLM model."
            )
        spec = spec_for_model_type(hf.config.model_type)
        return cls(hf.eval(), tokenizer, spec, Provenance(source=source, file=file, revision=revision, _sha256=sha256))

    # -- structure -------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return get_path(self.hf, self.spec.layers)

    def module(self, part: str, layer: int | None = None) -> nn.Module:
        """The native module the family's ArchSpec names ``part``: model-wide (``"embed"``, ``"unembed"``,
        ``"final_norm"``) or, with ``layer``, inside that block (``"attn"``, ``"attn_norm"``, ``"mlp_norm"``,
        ``"q"``, ``"o"``, ...). Upper layers read modules through this, never by walking ``hf`` themselves."""
        path = getattr(self.spec, part)
        return get_path(self.hf if layer is None else self.blocks[check_layer(layer, self.layout)], path)

    @property
    def device(self) -> torch.device:
        return get_path(self.hf, self.spec.embed).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return get_path(self.hf, self.spec.embed).weight.dtype

    @property
    def family(self) -> str:
        return self.spec.family

    def sites(self, names: SiteNames | None = None) -> list[Site]:
        """Expand site names (``"attn.z"``, ``"L3.mlp.act"``, ...); all sites when ``names`` is None."""
        if names is None:
            names = list(COMPONENTS)
        if isinstance(names, (str, Site)):
            names = [names]
        out: list[Site] = []
        for name in names:
            self.dictionaries.check_name(str(name))
            out.extend(parse_sites(name, self.layout))
        return sorted(set(out))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.hf.parameters())

    def card(self) -> dict[str, Any]:
        """The model card: family, sizes, parameters, dtype and provenance."""
        lay = self.layout
        return {
            "source": self.provenance.source,
            "family": self.family,
            "model_type": self.hf.config.model_type,
            "architecture": type(self.hf).__name__,
            "layers": lay.n_layers,
            "d_model": lay.d_model,
            "query_heads": lay.n_heads,
            "kv_heads": lay.n_kv_heads,
            "d_head": lay.d_head,
            "neurons_per_layer": lay.d_mlp,
            "vocab": lay.d_vocab,
            "parameters": self.n_params(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "parallel_residual": lay.parallel_residual,
            "file": self.provenance.file,
            "file_sha256": self.provenance.sha256,
            "revision": self.provenance.revision,
            **({"edit": self.active_edits} if self.active_edits else {}),
        }

    # -- running -----------------------------------------------------------------------------------
    def tokenize(self, inputs: Inputs) -> dict[str, torch.Tensor]:
        """Turn text, token ids or a tokenizer output into ``{"input_ids": [batch, pos], "attention_mask": ...}``."""
        if isinstance(inputs, Mapping):
            batch = {k: torch.as_tensor(v) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        elif isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
            batch = {"input_ids": ids}
        elif isinstance(inputs, str) or (isinstance(inputs, Sequence) and all(isinstance(s, str) for s in inputs)):
            if self.tokenizer is None:
                raise InputError("This model has no tokenizer: pass token ids as a tensor.")
            batch = dict(self.tokenizer(inputs, return_tensors="pt", padding=not isinstance(inputs, str)))
        else:
            raise InputError(f"Cannot run on {type(inputs).__name__}: pass text, a list of texts or token ids.")
        ids = batch.get("input_ids")
        if ids is None:
            raise InputError("Inputs need 'input_ids'.")
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise InputError(
                f"Token ids must be integers shaped [batch, pos] or [pos], got {tuple(ids.shape)} {ids.dtype}."
            )
        if ids.shape[-1] == 0:
            raise InputError("The input is empty (no tokens): pass some text or token ids.")
        generation.check_context(self, int(ids.shape[-1]))
        if int(ids.min()) < 0 or int(ids.max()) >= self.layout.d_vocab:
            raise InputError(
                f"Token ids must lie in [0, {self.layout.d_vocab}) (the vocabulary), "
                f"got values in [{int(ids.min())}, {int(ids.max())}]."
            )
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """Plain forward pass: ``[batch, pos, d_vocab]`` logits (no gradients, no hooks of lmatlas's own)."""
        batch = self.tokenize(inputs)
        self.work.add(*batch["input_ids"].shape[:2], self.layout.n_layers)
        with torch.no_grad():
            return self.hf(**batch, use_cache=False).logits

    def replacements(self, replace: "Mapping[str | Site, Replacement] | Any | None") -> list[BoundReplacement]:
        """Bind ``{site_name[@positions]: tensor | number | fn}`` to sites (``"attn.z"`` = every layer).

        ``replace`` may also be an :class:`~lmatlas.edit.Edit` or an intervention (anything with
        ``bind(model)``), or a list of already bound replacements.
        """
        if replace is None:
            return []
        if hasattr(replace, "bind"):
            return replace.bind(self)
        if isinstance(replace, (list, tuple)) and all(isinstance(r, BoundReplacement) for r in replace):
            return list(replace)
        out: list[BoundReplacement] = []
        for name, value in replace.items():
            site_name, positions = split_site_name(str(name))
            self.dictionaries.check_name(site_name)
            for site in parse_sites(site_name, self.layout):
                out.append(BoundReplacement(site, value, positions))
        return out

    def hooked(
        self,
        capture: SiteNames = (),
        replace: Mapping[str | Site, Replacement] | None = None,
        keep_grad: bool = False,
        prompt_len: int | None = None,
    ) -> HookSession:
        """Hooks for any forward or ``generate`` inside a ``with`` block (sessions nest; see :mod:`lmatlas.model.hooks`).

        ``replace`` maps site names (with optional ``@positions``) to a tensor, a number or
        ``fn(value, ctx) -> tensor | None`` (see :mod:`lmatlas.model.replacement`);
        captured values land in the session's ``store`` (``{"L3.attn.z": tensor}``;
        captures of repeated forwards overwrite each other). ``prompt_len`` fixes what
        negative positions count from (default: the first forward of each sequence).
        """
        session = HookSession(
            self,
            self.sites(capture) if capture else (),
            self.replacements(replace),
            keep_grad=keep_grad,
            prompt_len=prompt_len,
        )
        session.edit = describe_edit(replace)
        return session

    def edit(self, edit: Any) -> HookSession:
        """``with model.edit(edit):`` applies an :class:`~lmatlas.edit.Edit` (or one intervention) to every
        forward and ``generate`` inside the block; ``model.card()["edit"]`` records it meanwhile."""
        return self.hooked(replace=edit)

    def edited(self, edit: Any) -> "EditedModel":
        """A handle that runs this model under ``edit`` (checked now); ``self`` stays untouched."""
        from lmatlas.model.edited import EditedModel

        return EditedModel(self, edit)

    @property
    def active_edits(self) -> list[str]:
        """Descriptions of the edits applied by the active hook sessions (outer first)."""
        return [line for session in self.hook_stack.sessions for line in (getattr(session, "edit", None) or [])]

    def run(
        self,
        inputs: Inputs,
        *,
        capture: SiteNames = (),
        replace: Mapping[str | Site, Replacement] | None = None,
        grad: bool = False,
        stop_after: int | None = None,
        lm_head: bool = True,
        prompt_len: int | None = None,
    ) -> ActivationCache:
        """Run one forward pass with hooks: ``cache = model.run(x, capture=[...], replace={...})``.

        Args:
            inputs: text, a list of texts (padded on the tokenizer's side), or token ids ``[batch, pos]``.
            capture: site names to keep (``"attn.z"`` = every layer, ``"L3.mlp.act"`` = one).
            replace: ``{site[@positions]: tensor | number | fn(value, ctx)}`` applied in flight
                (see :mod:`lmatlas.model.replacement`); positions must lie inside the input.
            grad: run with gradients and keep every captured tensor on the autograd path to
                the logits (``torch.autograd.grad(loss, cache[site])`` works for every site).
            stop_after: stop after block ``stop_after`` (nothing later is computed; no logits).
            lm_head: compute the logits (``False``: only the decoder blocks run).
            prompt_len: what negative positions count from (default: the input's length).

        Returns:
            :class:`~lmatlas.model.cache.ActivationCache` with the captured values, the
            ``input_ids`` and (``lm_head`` and no ``stop_after``) ``logits`` ``[batch, pos, d_vocab]``.
        """
        batch = self.tokenize(inputs)
        n = int(batch["input_ids"].shape[1])
        bound = self.replacements(replace)
        for replacement in bound:
            if replacement.positions is not None:
                _check_inside(replacement, n, prompt_len or n)
        stop = None if stop_after is None else check_layer(int(stop_after), self.layout)
        self.work.add(batch["input_ids"].shape[0], n, self.layout.n_layers if stop is None else stop + 1)
        cache = ActivationCache(self.layout, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        session = HookSession(
            self,
            self.sites(capture) if capture else (),
            bound,
            store=cache.values,
            extras=cache.extras,
            keep_grad=grad,
            prompt_len=prompt_len,
        )
        session.edit = describe_edit(replace)
        cache.edit = self.active_edits + (session.edit or [])
        with session, torch.set_grad_enabled(grad):
            stopper = self.blocks[stop].register_forward_hook(_stop_forward) if stop is not None else None
            try:
                if lm_head and stop is None:
                    cache.logits = self.hf(**batch, use_cache=False).logits
                else:
                    self.hf.base_model(**batch, use_cache=False)
            except _StopForward:
                pass
            finally:
                if stopper is not None:
                    stopper.remove()
        return cache

    def generate(
        self,
        inputs: Inputs,
        max_new_tokens: int = 32,
        *,
        edit: Any = None,
        kv: Any = None,
        strategy: Any = None,
        compare: bool = False,
        chat: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Generate (greedy by default) and return the new text: a string for one prompt, a list for a list.

        A thin pass-through to :func:`lmatlas.model.generation.generate` (``lmatlas.generate`` takes
        the same arguments, also as names, and returns the whole
        :class:`~lmatlas.model.generation.Generation`).

        Args:
            edit: an :class:`~lmatlas.edit.Edit` (or intervention) applied at every step.
            kv: a KV policy (``KVPlan``, ``SnapPlan`` from :mod:`lmatlas.infer`): a fresh cache per call.
            strategy: a decoding strategy value (``Dola()``, ``Speculative()``, ... from
                :mod:`lmatlas.infer.decoding`).
            compare: return a :class:`~lmatlas.model.comparison.Comparison` of the unedited and the
                edited continuation, each token's log-probability under both (needs ``edit``).
            chat: apply the tokenizer's chat template to a single prompt (instruct models need it).
            kwargs: passed to ``transformers``' ``generate`` (``do_sample``, ``past_key_values``, ...).
        """
        if compare:
            return comparison.compare(self, inputs, edit, max_new_tokens, kv=kv, strategy=strategy, chat=chat, **kwargs)
        return generation.generate(
            self, inputs, max_new_tokens, edit=edit, kv=kv, strategy=strategy, chat=chat, **kwargs
        ).text

    def __repr__(self) -> str:
        lay = self.layout
        return (
            f"Model({self.provenance.source!r}, family={self.family}, layers={lay.n_layers}, "
            f"heads={lay.n_heads}/{lay.n_kv_heads}kv, neurons={lay.d_mlp}, vocab={lay.d_vocab})"
        )


class _StopForward(Exception):
    """Raised after the ``stop_after`` block: nothing later is needed."""


def _stop_forward(module, args, output):
    raise _StopForward


def _check_inside(replacement: BoundReplacement, n: int, prompt_len: int) -> None:
    """A position selector of a plain forward must name positions inside the input (``0 .. n - 1``)."""
    positions = replacement.positions
    positions.check(prompt_len, replacement.name)
    start, stop, indices = positions.absolute(prompt_len)
    outside = [p for p in (indices or ()) if p >= n]
    if indices is None and start is not None and start >= n:
        outside = [start]
    if outside:
        raise SiteError(
            f"Position @{positions} of {replacement.name} is outside the input: it has {n} tokens (positions 0..{n - 1})."
        )
