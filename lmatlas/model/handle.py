"""Model: a Hugging Face causal LM, its tokenizer and its ArchSpec, composed (not subclassed).

>>> import lmatlas
>>> model = lmatlas.load()                                   # doctest: +SKIP
>>> with model.trace("The Eiffel Tower is in", capture=["attn.pattern", "L3.mlp.act"]) as cache:
...     cache.pattern(5, head=2)                             # [batch, pos, key_pos]
>>> with model.hooked(replace={"L3.attn.z": lambda z, site: z * 0}):
...     model.generate("The Eiffel Tower is in")             # layer 3's attention silenced
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from lmatlas.errors import NotACausalLMError
from lmatlas.model.arch import ArchSpec, HeadLayout, get_path, read_layout
from lmatlas.model.cache import ActivationCache
from lmatlas.model.families import spec_for_model_type
from lmatlas.model.hooks import HookSession, Replacement
from lmatlas.model.sites import COMPONENTS, Site, parse_sites
from lmatlas.model.weights import ModelWeights

Inputs = Union[str, Sequence[str], torch.Tensor, Mapping[str, torch.Tensor]]
SiteNames = Union[str, Site, Iterable[Union[str, Site]]]


@dataclass
class Provenance:
    """Where a model came from, stamped on every result."""

    source: str
    file: str | None = None  # the weights file hashed (a .gguf or the first safetensors shard)
    revision: str | None = None
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str | None:
        """SHA-256 of ``file`` (computed once, on first use)."""
        if self._sha256 is None and self.file:
            from lmatlas.model.loading import sha256_file

            self._sha256 = sha256_file(self.file)
        return self._sha256


class Model:
    """A loaded causal LM with lmatlas's map of it.

    Attributes:
        hf: the native ``*ForCausalLM`` module (hooks go on its modules).
        tokenizer: its tokenizer.
        spec: the family's :class:`~lmatlas.model.arch.ArchSpec`.
        layout: sizes (layers, heads, KV heads, d_head, neurons, vocab).
        W: per-head / per-neuron weight views (:class:`~lmatlas.model.weights.ModelWeights`).
        provenance: source, file and hash.
    """

    def __init__(self, hf: nn.Module, tokenizer: Any, spec: ArchSpec, provenance: Provenance):
        self.hf = hf
        self.tokenizer = tokenizer
        self.spec = spec
        self.layout: HeadLayout = read_layout(spec, hf)
        self.W = ModelWeights(spec, hf, self.layout)
        self.provenance = provenance

    @classmethod
    def from_hf(
        cls, hf: nn.Module, tokenizer: Any, source: str = "in-memory", file: str | None = None,
        sha256: str | None = None, revision: str | None = None,
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
                raise ValueError("This model has no tokenizer: pass token ids as a tensor.")
            batch = dict(self.tokenizer(inputs, return_tensors="pt", padding=not isinstance(inputs, str)))
        else:
            raise TypeError(f"Cannot run on {type(inputs).__name__}: pass text, a list of texts or token ids.")
        if "input_ids" not in batch:
            raise ValueError("Inputs need 'input_ids'.")
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """Plain forward pass: ``[batch, pos, d_vocab]`` logits (no gradients)."""
        with torch.no_grad():
            return self.hf(**self.tokenize(inputs), use_cache=False).logits

    def _replacements(self, replace: Mapping[str | Site, Replacement] | None) -> dict[Site, Replacement]:
        out: dict[Site, Replacement] = {}
        for name, value in (replace or {}).items():
            for site in parse_sites(name, self.layout):
                out[site] = value
        return out

    def hooked(
        self, capture: SiteNames = (), replace: Mapping[str | Site, Replacement] | None = None,
        keep_grad: bool = False,
    ) -> HookSession:
        """Hooks for any forward or ``generate`` inside a ``with`` block.

        ``replace`` maps site names to a tensor or to ``fn(value, site) -> tensor | None``;
        captured values land in the session's ``store`` (``{"L3.attn.z": tensor}``;
        captures of repeated forwards overwrite each other).
        """
        return HookSession(self, self.sites(capture) if capture else (), self._replacements(replace),
                           keep_grad=keep_grad)

    @contextmanager
    def trace(
        self,
        inputs: Inputs,
        capture: SiteNames = (),
        replace: Mapping[str | Site, Replacement] | None = None,
        grad: bool = False,
    ) -> Iterator[ActivationCache]:
        """Run one forward pass and capture sites: ``with model.trace(x, capture=[...]) as cache``.

        Args:
            inputs: text, a list of texts (padded on the tokenizer's side), or token ids.
            capture: site names to keep (``"attn.z"`` = every layer, ``"L3.mlp.act"`` = one).
            replace: site -> replacement applied in flight (see :mod:`lmatlas.model.hooks`).
            grad: keep the autograd graph (for attribution methods); otherwise runs under no_grad.
        """
        batch = self.tokenize(inputs)
        cache = ActivationCache(self.layout, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        session = HookSession(self, self.sites(capture) if capture else (), self._replacements(replace),
                              store=cache.values, extras=cache.extras, keep_grad=grad)
        with session, torch.set_grad_enabled(grad):
            cache.logits = self.hf(**batch, use_cache=False).logits
        yield cache

    def generate(self, inputs: Inputs, max_new_tokens: int = 32, **kwargs: Any) -> list[str]:
        """Greedy (by default) generation; returns only the new text of each sequence."""
        if self.tokenizer is None:
            raise ValueError("generate() needs a tokenizer.")
        batch = self.tokenize(inputs)
        kwargs.setdefault("do_sample", False)
        with torch.no_grad():
            out = self.hf.generate(**batch, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad if (pad := self.tokenizer.pad_token_id) is not None
                                   else self.tokenizer.eos_token_id, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def __repr__(self) -> str:
        lay = self.layout
        return (f"Model({self.provenance.source!r}, family={self.family}, layers={lay.n_layers}, "
                f"heads={lay.n_heads}/{lay.n_kv_heads}kv, neurons={lay.d_mlp}, vocab={lay.d_vocab})")
