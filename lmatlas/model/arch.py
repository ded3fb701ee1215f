"""ArchSpec: where each part of a transformer lives inside a Hugging Face model.

lmatlas never re-implements a model. It hooks the *native* modules, and an
:class:`ArchSpec` is the declarative map from the names lmatlas uses (embedding,
blocks, q/k/v/o, MLP in/gate/out, norms, unembedding) to attribute paths of the
Hugging Face module tree. Supporting a new family is one new entry in
``lmatlas.model.families.ARCH_SPECS`` plus a tiny-model test, never a copy of the
model's code.

Paths are dotted attribute paths. Model-level paths (``embed``, ``layers``,
``final_norm``, ``unembed``) start at the ``*ForCausalLM`` object; block-level paths
(``q``, ``o``, ``mlp_out``, ...) start at one decoder block.

Every decoder block is read as::

    resid.pre ──► [attn_norm] ──► attention(q, k, v) ──► z ──► o ──► [attn_post_norm] ──┐
        │                                                                 (attn write) │
        └──────────────────────────────────────────────────────────────────────► (+) resid.mid
    resid.mid ──► [mlp_norm] ──► in/gate ──► act ──► out ──► [mlp_post_norm] ──┐
        │                                                        (mlp write)   │
        └───────────────────────────────────────────────────────────────► (+) resid.post

With ``parallel_residual`` (GPT-NeoX) the MLP reads ``resid.pre`` instead of
``resid.mid``; the writes still add up the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from lmatlas.model.norms import NormKind


class QKVLayout(str, Enum):
    """How query, key and value projections are stored."""

    SEPARATE = "separate"  # three modules q, k, v
    CONCAT = "concat"  # one module, output [q (H*D) | k (KV*D) | v (KV*D)]  (Phi-3, GPT-2)
    PER_HEAD = "per_head"  # one module, output [head, (q|k|v), D] interleaved (GPT-NeoX)


@dataclass(frozen=True)
class ArchSpec:
    """Declarative description of one architecture family.

    Attributes:
        family: the lmatlas name of the family (``"llama"``, ``"gpt2"``, ...).
        model_types: the ``config.model_type`` values this entry serves.
        embed: token embedding module (its output is the first residual stream,
            including any ``sqrt(d_model)`` scaling done by the module).
        layers: the ``nn.ModuleList`` of decoder blocks.
        final_norm: the norm applied to the last residual stream before unembedding.
        unembed: the LM head (``[d_model] -> [vocab]``).
        attn: the attention module inside a block (the one that calls the
            attention interface).
        q, k, v: separate projections, or ``qkv`` with ``qkv_layout`` when fused.
        o: the output projection; its input is ``attn.z``.
        mlp: the MLP module inside a block.
        mlp_in: the up projection (or ``gate_up`` when gate and up are fused,
            gate first).
        mlp_gate: the gate projection of a gated MLP, ``None`` for a plain MLP.
        mlp_out: the down projection; its input is ``mlp.act``.
        attn_norm / mlp_norm: pre-sublayer norms (``None`` where the family has none).
        attn_post_norm / mlp_post_norm: norms applied to a sublayer's output before
            it is added to the residual stream (Gemma 2/3, OLMo-2).
        norm_kind: the family's norm convention, for every norm it has (see
            :mod:`lmatlas.model.norms`: ``rms``, ``rms_offset`` or ``layer``).
        conv1d: weights are GPT-2 ``Conv1D`` (``[in, out]``) rather than ``nn.Linear``
            (``[out, in]``).
        parallel_residual_attr: config attribute that, when true, makes attention
            and MLP read the same input (GPT-NeoX's ``use_parallel_residual``).
        text_config: the sub-config that holds the decoder's sizes, if any.
    """

    family: str
    model_types: tuple[str, ...]
    embed: str
    layers: str
    final_norm: str
    unembed: str
    attn: str
    o: str
    mlp: str
    mlp_out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: QKVLayout = QKVLayout.SEPARATE
    mlp_in: str | None = None
    mlp_gate: str | None = None
    gate_up: str | None = None
    attn_norm: str | None = None
    mlp_norm: str | None = None
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    norm_kind: NormKind = NormKind.RMS
    conv1d: bool = False
    parallel_residual_attr: str | None = None
    pos_embed: str | None = None
    text_config: str | None = None

    @property
    def attn_write(self) -> str:
        """The block-level module whose output the attention adds to the residual stream."""
        return self.attn_post_norm or self.o

    @property
    def mlp_write(self) -> str:
        """The block-level module whose output the MLP adds to the residual stream."""
        return self.mlp_post_norm or self.mlp

    @property
    def gated(self) -> bool:
        return self.mlp_gate is not None or self.gate_up is not None


@dataclass(frozen=True)
class HeadLayout:
    """Sizes of one model, read from its config and modules.

    ``n_heads`` query heads share ``n_kv_heads`` key/value heads: query head ``h``
    reads KV group ``h // (n_heads // n_kv_heads)`` (GQA; MQA when ``n_kv_heads == 1``).
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    parallel_residual: bool = False

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV group that query head ``head`` reads."""
        return head // self.group_size


def get_path(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path (``"model.layers"``) from ``root``."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def linear_weight(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` whatever the module type."""
    return module.weight.T if conv1d else module.weight


def read_layout(spec: ArchSpec, hf_model: nn.Module) -> HeadLayout:
    """Read a model's sizes: head counts from the config, widths from the modules."""
    config = hf_model.config
    if spec.text_config:
        config = getattr(config, spec.text_config)
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    d_model = int(config.hidden_size)
    d_head = int(getattr(config, "head_dim", None) or d_model // n_heads)
    layers = get_path(hf_model, spec.layers)
    block = layers[0]
    d_mlp = linear_weight(get_path(block, spec.mlp_out), spec.conv1d).shape[1]
    d_vocab = get_path(hf_model, spec.unembed).weight.shape[0]
    parallel = bool(spec.parallel_residual_attr and getattr(config, spec.parallel_residual_attr, False))
    return HeadLayout(
        n_layers=len(layers),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        d_mlp=int(d_mlp),
        d_vocab=int(d_vocab),
        parallel_residual=parallel,
    )
