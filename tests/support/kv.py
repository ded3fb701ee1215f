"""The head-wise KV cache tests' shared pieces: families, a plain-PyTorch attention reference, greedy
generation through Hugging Face with a given cache, seeded prompts."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmatlas.model.handle import Model
from lmatlas.model.tiny import _SPECIAL_IDS, TINY_CONFIGS, byte_tokenizer, tiny_model

FAMILIES = sorted(TINY_CONFIGS) + ["mistral_sliding"]


SINK, RECENT, PROMPT, NEW = 3, 6, 30, 8


def load(family: str) -> Model:
    if family != "mistral_sliding":
        return tiny_model(family)
    config = AutoConfig.for_model("mistral", **{**_SPECIAL_IDS, **TINY_CONFIGS["mistral"], "sliding_window": 8})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    return Model.from_hf(hf, byte_tokenizer(), source="tiny:mistral_sliding")


def plain_scores(query, key, value, attention_mask, kwargs):
    """float64 scores ``[b, head, n, n]`` (scaled, soft-capped), the values repeated per query head, and the
    causal mask AND the model's mask as booleans (``True`` = visible): the parts every reference shares."""
    n_heads, n_kv, n = query.shape[1], key.shape[1], query.shape[2]
    rep = n_heads // n_kv
    keys, values = key.repeat_interleave(rep, 1).double(), value.repeat_interleave(rep, 1).double()
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    scores = query.double() @ keys.transpose(2, 3) * scaling
    if kwargs.get("softcap") is not None:
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    allowed = (torch.arange(n)[None, :] <= torch.arange(n)[:, None]).expand(1, n_heads, n, n).clone()
    if attention_mask is not None:
        allowed &= attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask > -1e30
    return scores, values, allowed


def attend(query, scores, values, allowed):
    """Softmax over the visible keys: ``[b, pos, head, d]`` in the query's dtype, as attention functions return."""
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ values
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def generate(model: Model, ids: torch.Tensor, cache=None, **kwargs):
    with torch.no_grad():
        return model.hf.generate(
            ids,
            max_new_tokens=NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            past_key_values=cache,
            pad_token_id=258,
            **kwargs,
        )


def prompt(seed: int = 0, length: int = PROMPT) -> torch.Tensor:
    return torch.randint(0, 250, (1, length), generator=torch.Generator().manual_seed(seed))
