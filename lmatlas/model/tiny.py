"""Tiny random models of every supported family, for fast tests and examples.

``tiny_hf_model("qwen3")`` builds a randomly initialised ``*ForCausalLM`` from a
small config (2 layers, GQA where the family allows it) and ``byte_tokenizer()``
a real 🤗 fast tokenizer over the 256 byte values, so that a tiny model can be
traced on text without any download. ``tiny_model(family)`` wraps both in an
lmatlas :class:`~lmatlas.model.handle.Model`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# Shared sizes: d_model 64, 4 query heads of 16 dims, 2 KV heads, 96 MLP neurons, 2 layers.
_COMMON: dict[str, Any] = dict(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
_SPECIAL_IDS: dict[str, Any] = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)

#: One small config per family: ``model_type -> config kwargs``.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=None),
    "qwen2": dict(_COMMON),  # q/k/v carry biases
    "qwen3": dict(_COMMON, head_dim=16),  # per-head q/k RMS norms
    "gemma": dict(_COMMON, head_dim=16, num_key_value_heads=1),
    "gemma2": dict(
        _COMMON,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(
        _COMMON,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "olmo2": dict(_COMMON),
    "phi3": dict(_COMMON),
    "gpt2": dict(
        vocab_size=260,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=96,
        n_positions=256,
        tie_word_embeddings=False,
    ),
    "gpt_neox": dict(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        use_parallel_residual=True,
        rotary_pct=0.5,
        attention_bias=True,
        tie_word_embeddings=False,
    ),
}


def tiny_hf_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised tiny ``*ForCausalLM`` of ``model_type``, in eval mode.

    Biases are initialised to random values (Hugging Face initialises them to zero),
    so that tests see every term of the residual decomposition.
    """
    kwargs = TINY_CONFIGS[model_type]
    config = AutoConfig.for_model(model_type, **{**_SPECIAL_IDS, **kwargs})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-255 are bytes, then ``<bos>``, ``<eos>``, ``<pad>``, ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for i, special in enumerate(["<bos>", "<eos>", "<pad>", "<unk>"]):
        vocab[special] = 256 + i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model of ``model_type`` wrapped as an lmatlas ``Model`` (``float64`` for gradient checks)."""
    from lmatlas.model.handle import Model

    hf = tiny_hf_model(model_type, seed=seed, dtype=dtype)
    return Model.from_hf(hf, byte_tokenizer(), source=f"tiny:{model_type}")
