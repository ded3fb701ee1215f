"""Per-head and per-neuron weight views, whatever the family's storage layout.

Conventions (TransformerLens-style, "input @ W"):

============  =====================================  ==========================================
accessor      shape                                  meaning
============  =====================================  ==========================================
``W_E``       ``[d_vocab, d_model]``                 token embedding (without any scaling)
``W_U``       ``[d_model, d_vocab]``                 unembedding (LM head)
``W_Q(l)``    ``[n_heads, d_model, d_head]``         query projection of each query head
``W_K(l)``    ``[n_kv_heads, d_model, d_head]``      key projection of each KV head
``W_V(l)``    ``[n_kv_heads, d_model, d_head]``      value projection of each KV head
``W_O(l)``    ``[n_heads, d_head, d_model]``         output projection of each query head
``W_in(l)``   ``[d_model, d_mlp]``                   MLP up projection
``W_gate(l)`` ``[d_model, d_mlp]``                   MLP gate projection (gated MLPs only)
``W_out(l)``  ``[d_mlp, d_model]``                   MLP down projection: row n is neuron n's
                                                     output direction
============  =====================================  ==========================================

Biases follow the same naming (``b_Q(l)`` is ``[n_heads, d_head]``, ``b_O(l)`` is
``[d_model]``) and are ``None`` where the family has none. Views are computed on
demand from the native parameters (fused ``qkv`` and ``gate_up`` are split here), so
they always reflect the live model. They do not include q/k norms or rotary
embeddings, which act on activations, not weights.
"""

from __future__ import annotations

import torch
from torch import nn

from lmatlas.model.arch import ArchSpec, HeadLayout, QKVLayout, get_path, linear_weight


class ModelWeights:
    """Weight views for one model. Built by :class:`lmatlas.model.handle.Model` as ``model.W``."""

    def __init__(self, spec: ArchSpec, hf_model: nn.Module, layout: HeadLayout):
        self.spec = spec
        self.hf_model = hf_model
        self.layout = layout
        self._blocks = get_path(hf_model, spec.layers)

    # -- whole-model matrices -------------------------------------------------
    @property
    def W_E(self) -> torch.Tensor:
        """``[d_vocab, d_model]`` token embedding matrix."""
        return get_path(self.hf_model, self.spec.embed).weight

    @property
    def W_U(self) -> torch.Tensor:
        """``[d_model, d_vocab]`` unembedding matrix."""
        return get_path(self.hf_model, self.spec.unembed).weight.T

    @property
    def b_U(self) -> torch.Tensor | None:
        """``[d_vocab]`` unembedding bias, if any."""
        return getattr(get_path(self.hf_model, self.spec.unembed), "bias", None)

    # -- attention ------------------------------------------------------------
    def _module(self, layer: int, path: str) -> nn.Module:
        return get_path(self._blocks[layer], path)

    def _qkv_rows(self, layer: int, which: str, bias: bool) -> torch.Tensor | None:
        """Rows of the q/k/v projection as ``[out_features(, in_features)]``."""
        spec, lay = self.spec, self.layout
        if spec.qkv is None:
            module = self._module(layer, getattr(spec, which))
            return module.bias if bias else linear_weight(module, spec.conv1d)
        module = self._module(layer, spec.qkv)
        full = module.bias if bias else linear_weight(module, spec.conv1d)
        if full is None:
            return None
        index = "qkv".index(which)
        if spec.qkv_layout is QKVLayout.PER_HEAD:
            per_head = full.reshape(lay.n_heads, 3, lay.d_head, *full.shape[1:])
            return per_head[:, index].reshape(lay.n_heads * lay.d_head, *full.shape[1:])
        sizes = [lay.n_heads * lay.d_head, lay.n_kv_heads * lay.d_head, lay.n_kv_heads * lay.d_head]
        return torch.split(full, sizes, dim=0)[index]

    def _heads_in(self, layer: int, which: str, n: int) -> torch.Tensor:
        rows = self._qkv_rows(layer, which, bias=False)  # [n * d_head, d_model]
        return rows.reshape(n, self.layout.d_head, self.layout.d_model).transpose(1, 2)

    def _heads_bias(self, layer: int, which: str, n: int) -> torch.Tensor | None:
        rows = self._qkv_rows(layer, which, bias=True)
        return None if rows is None else rows.reshape(n, self.layout.d_head)

    def W_Q(self, layer: int) -> torch.Tensor:
        """``[n_heads, d_model, d_head]``."""
        return self._heads_in(layer, "q", self.layout.n_heads)

    def W_K(self, layer: int) -> torch.Tensor:
        """``[n_kv_heads, d_model, d_head]``."""
        return self._heads_in(layer, "k", self.layout.n_kv_heads)

    def W_V(self, layer: int) -> torch.Tensor:
        """``[n_kv_heads, d_model, d_head]``."""
        return self._heads_in(layer, "v", self.layout.n_kv_heads)

    def b_Q(self, layer: int) -> torch.Tensor | None:
        return self._heads_bias(layer, "q", self.layout.n_heads)

    def b_K(self, layer: int) -> torch.Tensor | None:
        return self._heads_bias(layer, "k", self.layout.n_kv_heads)

    def b_V(self, layer: int) -> torch.Tensor | None:
        return self._heads_bias(layer, "v", self.layout.n_kv_heads)

    def W_O(self, layer: int) -> torch.Tensor:
        """``[n_heads, d_head, d_model]``: head ``h`` writes ``z_h @ W_O[h]``."""
        lay = self.layout
        weight = linear_weight(self._module(layer, self.spec.o), self.spec.conv1d)  # [d_model, H*D]
        return weight.T.reshape(lay.n_heads, lay.d_head, lay.d_model)

    def b_O(self, layer: int) -> torch.Tensor | None:
        """``[d_model]`` output projection bias, if any."""
        return getattr(self._module(layer, self.spec.o), "bias", None)

    # -- MLP --------------------------------------------------------------------
    def _gate_up(self, layer: int, index: int, bias: bool) -> torch.Tensor | None:
        module = self._module(layer, self.spec.gate_up)
        full = module.bias if bias else linear_weight(module, self.spec.conv1d)
        return None if full is None else full.chunk(2, dim=0)[index]

    def W_in(self, layer: int) -> torch.Tensor:
        """``[d_model, d_mlp]`` up projection."""
        if self.spec.gate_up:
            return self._gate_up(layer, 1, bias=False).T
        return linear_weight(self._module(layer, self.spec.mlp_in), self.spec.conv1d).T

    def b_in(self, layer: int) -> torch.Tensor | None:
        if self.spec.gate_up:
            return self._gate_up(layer, 1, bias=True)
        return getattr(self._module(layer, self.spec.mlp_in), "bias", None)

    def W_gate(self, layer: int) -> torch.Tensor | None:
        """``[d_model, d_mlp]`` gate projection, ``None`` for an ungated MLP."""
        if self.spec.gate_up:
            return self._gate_up(layer, 0, bias=False).T
        if self.spec.mlp_gate is None:
            return None
        return linear_weight(self._module(layer, self.spec.mlp_gate), self.spec.conv1d).T

    def W_out(self, layer: int) -> torch.Tensor:
        """``[d_mlp, d_model]``: neuron ``n`` writes ``act_n * W_out[n]``."""
        return linear_weight(self._module(layer, self.spec.mlp_out), self.spec.conv1d).T

    def b_out(self, layer: int) -> torch.Tensor | None:
        """``[d_model]`` down projection bias, if any."""
        return getattr(self._module(layer, self.spec.mlp_out), "bias", None)
