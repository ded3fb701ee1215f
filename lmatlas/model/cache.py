"""ActivationCache: the values captured by one traced forward, with typed accessors.

``cache["L3.attn.z"]`` returns the raw tensor. The typed accessors take layer and
head/neuron numbers, check them against the model, map query heads to their KV
group, and say their shapes:

>>> cache = model.run("The cat sat", capture=["attn.pattern", "L2.attn.k"])   # doctest: +SKIP
>>> cache.pattern(0, head=3)        # [batch, pos, key_pos]                    # doctest: +SKIP
>>> cache.k(2, head=7)              # query head 7's KV group: [batch, key_pos, d_head]  # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from lmatlas.errors import SiteError
from lmatlas.model.arch import HeadLayout
from lmatlas.model.sites import Site, check_head, check_layer, check_neuron

_FEATURE_INDEX = re.compile(r"^(?P<site>L\d+\..+\.F)(?P<index>\d+)$")  # "L15.resid.post.F123"


@dataclass
class ActivationCache:
    """Captured site values of one forward pass.

    Attributes:
        layout: the model's sizes (for range checks and head → KV-group mapping).
        values: ``site name -> tensor`` as captured.
        extras: per-layer attention bias terms of the residual decomposition
            (``"L3.attn.bias" -> [batch, pos, d_model] | [d_model] | None``).
        input_ids: ``[batch, pos]`` the tokens that were run.
        logits: ``[batch, pos, d_vocab]`` the model's output logits.
    """

    layout: HeadLayout
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor | None] = field(default_factory=dict)
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    edit: list[str] = field(default_factory=list)  # provenance: the edits this forward ran under

    # -- raw access -----------------------------------------------------------------------------
    def __getitem__(self, name: str | Site) -> torch.Tensor:
        key = str(name)
        latent = _FEATURE_INDEX.match(key)
        if latent and key not in self.values and latent["site"] in self.values:  # one feature: [batch, pos]
            return self.values[latent["site"]][..., int(latent["index"])]
        if key not in self.values:
            raise SiteError(
                f"{key!r} was not captured. Captured sites: {', '.join(sorted(self.values)) or 'none'}. "
                f"Pass it in capture=[...] to model.run."
            )
        return self.values[key]

    def __contains__(self, name: object) -> bool:
        return str(name) in self.values

    def __iter__(self):
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def sites(self) -> list[str]:
        return sorted(self.values, key=lambda n: (int(n.split(".")[0][1:]), n))

    def _get(self, layer: int, component: str) -> torch.Tensor:
        return self[Site(check_layer(layer, self.layout), component)]

    def _head(self, value: torch.Tensor, layer: int, head: int | None, axis: int, kv: bool = False) -> torch.Tensor:
        if head is None:
            return value
        if kv:
            index = self.layout.kv_head(check_head(layer, head, self.layout))
        else:
            index = check_head(layer, head, self.layout)
        return value.select(axis, index)

    # -- typed accessors ---------------------------------------------------------------------------
    def resid(self, layer: int, where: str = "post") -> torch.Tensor:
        """``[batch, pos, d_model]`` residual stream at ``where`` in ``{"pre", "mid", "post"}``."""
        if where not in ("pre", "mid", "post"):
            raise SiteError(f"resid position must be 'pre', 'mid' or 'post', got {where!r}.")
        return self._get(layer, f"resid.{where}")

    def q(self, layer: int, head: int | None = None) -> torch.Tensor:
        """``[batch, pos, head, d_head]`` queries, or ``[batch, pos, d_head]`` for one head."""
        return self._head(self._get(layer, "attn.q"), layer, head, axis=2)

    def k(self, layer: int, head: int | None = None) -> torch.Tensor:
        """``[batch, key_pos, kv_head, d_head]`` keys; ``head`` is a *query* head, mapped to its KV group."""
        return self._head(self._get(layer, "attn.k"), layer, head, axis=2, kv=True)

    def v(self, layer: int, head: int | None = None) -> torch.Tensor:
        """``[batch, key_pos, kv_head, d_head]`` values; ``head`` is a *query* head, mapped to its KV group."""
        return self._head(self._get(layer, "attn.v"), layer, head, axis=2, kv=True)

    def z(self, layer: int, head: int | None = None) -> torch.Tensor:
        """``[batch, pos, head, d_head]`` per-head attention outputs before ``W_O``."""
        return self._head(self._get(layer, "attn.z"), layer, head, axis=2)

    def pattern(self, layer: int, head: int | None = None) -> torch.Tensor:
        """``[batch, head, pos, key_pos]`` attention probabilities, or ``[batch, pos, key_pos]`` for one head."""
        return self._head(self._get(layer, "attn.pattern"), layer, head, axis=1)

    def head_out(self, layer: int, head: int | None = None) -> torch.Tensor:
        """``[batch, pos, head, d_model]`` each head's write to the residual stream (``attn.out``)."""
        return self._head(self._get(layer, "attn.out"), layer, head, axis=2)

    def attn_bias(self, layer: int) -> torch.Tensor | None:
        """The output-projection bias as written to the residual stream (``None`` if the family has none)."""
        return self.extras.get(f"L{check_layer(layer, self.layout)}.attn.bias")

    def neurons(self, layer: int, neuron: int | None = None) -> torch.Tensor:
        """``[batch, pos, neuron]`` MLP neuron activations (``mlp.act``), or ``[batch, pos]`` for one."""
        value = self._get(layer, "mlp.act")
        return value if neuron is None else value[..., check_neuron(layer, neuron, self.layout)]

    def mlp_out(self, layer: int) -> torch.Tensor:
        """``[batch, pos, d_model]`` the MLP's write to the residual stream."""
        return self._get(layer, "mlp.out")

    # -- the residual stream as a sum of parts -------------------------------------------------------
    def decompose_resid(self, upto: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """Split the residual stream leaving block ``upto`` (default: the last) into its writes.

        Returns ``(parts, labels)``: ``parts`` is ``[n_parts, batch, pos, d_model]`` and
        the parts sum to ``resid.post`` of block ``upto``. Labels are ``"embed"`` (the
        residual stream entering block 0), ``"L3.H1"`` (a head), ``"L3.attn.bias"`` and
        ``"L3.mlp"``. Needs ``L0.resid.pre``, ``attn.out`` and ``mlp.out`` at every layer.
        """
        upto = self.layout.n_layers - 1 if upto is None else check_layer(upto, self.layout)
        embed = self._get(0, "resid.pre")
        parts, labels = [embed], ["embed"]
        for layer in range(upto + 1):
            heads = self.head_out(layer)
            for head in range(self.layout.n_heads):
                parts.append(heads[:, :, head])
                labels.append(f"L{layer}.H{head}")
            bias = self.attn_bias(layer)
            if bias is not None:
                parts.append(bias.expand_as(embed))
                labels.append(f"L{layer}.attn.bias")
            parts.append(self.mlp_out(layer))
            labels.append(f"L{layer}.mlp")
        return torch.stack([p.to(embed.dtype) for p in parts]), labels
