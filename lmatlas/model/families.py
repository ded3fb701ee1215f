"""The ArchSpec table: one declarative entry per supported architecture family.

To add a family:

1. Print the model (``print(AutoModelForCausalLM.from_config(cfg))``) and find the
   modules named in :class:`lmatlas.model.arch.ArchSpec`.
2. Add an entry below (most Llama-like families only change ``model_types``).
3. Add a tiny config to ``lmatlas.model.tiny.TINY_CONFIGS``; the parametrised
   tests then check that hooks reproduce the plain forward bit-exactly and that
   the per-head decomposition sums to the residual stream.
"""

from __future__ import annotations

from dataclasses import replace

from lmatlas.errors import UnsupportedArchitectureError
from lmatlas.model.arch import ArchSpec, QKVLayout
from lmatlas.model.norms import NormKind

# Llama and its many descendants: separate q/k/v/o, gated MLP, pre-norms.
_LLAMA = ArchSpec(
    family="llama",
    model_types=("llama",),
    embed="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp="mlp",
    mlp_in="mlp.up_proj",
    mlp_gate="mlp.gate_proj",
    mlp_out="mlp.down_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
)

# Gemma 2 and 3 wrap each sublayer in pre and post ("sandwich") RMS norms whose gain is 1 + weight.
_GEMMA_SANDWICH = replace(
    _LLAMA,
    family="gemma2",
    model_types=("gemma2",),
    mlp_norm="pre_feedforward_layernorm",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    norm_kind=NormKind.RMS_OFFSET,
)

ARCH_SPECS: dict[str, ArchSpec] = {
    spec.family: spec
    for spec in (
        _LLAMA,
        replace(_LLAMA, family="mistral", model_types=("mistral",)),
        replace(_LLAMA, family="qwen2", model_types=("qwen2",)),
        replace(_LLAMA, family="qwen3", model_types=("qwen3",)),
        replace(_LLAMA, family="gemma", model_types=("gemma",), norm_kind=NormKind.RMS_OFFSET),
        _GEMMA_SANDWICH,
        replace(_GEMMA_SANDWICH, family="gemma3", model_types=("gemma3_text",)),
        # OLMo-2 has no pre-norms: it normalises each sublayer's output instead.
        replace(
            _LLAMA,
            family="olmo2",
            model_types=("olmo2",),
            attn_norm=None,
            mlp_norm=None,
            attn_post_norm="post_attention_layernorm",
            mlp_post_norm="post_feedforward_layernorm",
        ),
        # Phi-3 fuses q/k/v into one projection and gate/up into another.
        replace(
            _LLAMA,
            family="phi3",
            model_types=("phi3",),
            q=None,
            k=None,
            v=None,
            qkv="self_attn.qkv_proj",
            qkv_layout=QKVLayout.CONCAT,
            mlp_in=None,
            mlp_gate=None,
            gate_up="mlp.gate_up_proj",
        ),
        ArchSpec(
            family="gpt2",
            model_types=("gpt2",),
            embed="transformer.wte",
            pos_embed="transformer.wpe",
            layers="transformer.h",
            final_norm="transformer.ln_f",
            unembed="lm_head",
            attn="attn",
            qkv="attn.c_attn",
            qkv_layout=QKVLayout.CONCAT,
            o="attn.c_proj",
            mlp="mlp",
            mlp_in="mlp.c_fc",
            mlp_out="mlp.c_proj",
            attn_norm="ln_1",
            mlp_norm="ln_2",
            norm_kind=NormKind.LAYER,
            conv1d=True,
        ),
        ArchSpec(
            family="gpt_neox",
            model_types=("gpt_neox",),
            embed="gpt_neox.embed_in",
            layers="gpt_neox.layers",
            final_norm="gpt_neox.final_layer_norm",
            unembed="lm_head",
            attn="attention",
            qkv="attention.query_key_value",
            qkv_layout=QKVLayout.PER_HEAD,
            o="attention.dense",
            mlp="mlp",
            mlp_in="mlp.dense_h_to_4h",
            mlp_out="mlp.dense_4h_to_h",
            attn_norm="input_layernorm",
            mlp_norm="post_attention_layernorm",
            norm_kind=NormKind.LAYER,
            parallel_residual_attr="use_parallel_residual",
        ),
    )
}

_BY_MODEL_TYPE: dict[str, ArchSpec] = {mt: spec for spec in ARCH_SPECS.values() for mt in spec.model_types}

HOW_TO_ADD = (
    "To add a family, add an ArchSpec entry to lmatlas/model/families.py naming its modules "
    "(see the module docstring) and a tiny config to lmatlas/model/tiny.py."
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` lmatlas can map, sorted."""
    return sorted(_BY_MODEL_TYPE)


def spec_for_model_type(model_type: str) -> ArchSpec:
    """The ArchSpec for a ``config.model_type``; a clear error when there is none."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Architecture family {model_type!r} is not supported. "
            f"Supported model types: {', '.join(supported_model_types())}. {HOW_TO_ADD}"
        ) from None
