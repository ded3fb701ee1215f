"""Models the tests share: tiny random models of every family, cached per session, and a tiny Llama on disk."""

from __future__ import annotations

import torch

from lmatlas.model.tiny import TINY_CONFIGS, byte_tokenizer, tiny_hf_model, tiny_model

TINY_TYPES = sorted(TINY_CONFIGS)


_TINY: dict[str, object] = {}


def get_tiny(model_type: str):
    """A cached tiny model (tests must not leave edits behind: hooks are scoped by `with`)."""
    if model_type not in _TINY:
        _TINY[model_type] = tiny_model(model_type)
    return _TINY[model_type]


def save_tiny(path, layers=2, seed=0):
    """A tiny random Llama (``layers`` blocks, seeded) and its byte tokenizer, saved to ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "num_hidden_layers": layers})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def save_tiny_hf(path, family: str = "llama"):
    """``lmatlas.model.tiny``'s random ``family`` model and the byte tokenizer saved to ``path`` (returned)."""
    tiny_hf_model(family).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
