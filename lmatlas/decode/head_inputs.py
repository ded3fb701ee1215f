"""Token inputs of the weight-based head decodings: ids, embeddings, and what a layer's attention reads.

See :mod:`lmatlas.decode.heads` for the circuits these feed (OV, QK).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmatlas.decode.vocab import DecodeError
from lmatlas.model.sites import check_layer

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

#: Source/query tokens embedded per block (bounds the ``[block, d_model]`` buffer).
TOKEN_BLOCK = 4096
#: Source tokens sampled by :func:`copying_scores` unless told otherwise.
DEFAULT_SAMPLE = 1024


def _check_k(model: "Model", k: int) -> int:
    if not 1 <= k <= model.layout.d_vocab:
        raise DecodeError(f"k={k} is out of range: pick 1..{model.layout.d_vocab} (the vocabulary size).")
    return k


def token_ids(model: "Model", tokens: int | torch.Tensor | list[int] | None, seed: int = 0) -> torch.Tensor:
    """``[n]`` int64 token ids: ``None`` = the whole vocabulary, an int = that many sampled (seeded, sorted)."""
    V = model.layout.d_vocab
    if tokens is None:
        return torch.arange(V)
    if isinstance(tokens, int):
        if not 1 <= tokens <= V:
            raise DecodeError(f"Cannot sample {tokens} tokens: pick 1..{V} (the vocabulary size), or None for all.")
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(V, generator=generator)[:tokens].sort().values
    ids = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= V:
        raise DecodeError(f"Token ids must be non-empty and within 0..{V - 1}.")
    return ids


def embed_tokens(model: "Model", ids: torch.Tensor) -> torch.Tensor:
    """``[n, d_model]`` the native embedding module's output (with the family's scale), model dtype."""
    with torch.no_grad():
        return model.module("embed")(ids.to(model.device))


def attn_input(model: "Model", layer: int, x: torch.Tensor, *, norm_input: bool = True) -> torch.Tensor:
    """``[n, d_model]`` float32: embeddings ``x`` through layer ``layer``'s pre-attention norm (if any)."""
    check_layer(layer, model.layout)
    if norm_input and model.spec.attn_norm:
        with torch.no_grad():
            x = model.module("attn_norm", layer)(x)
    return x.float()


def head_inputs(model: "Model", layer: int, ids: torch.Tensor, *, norm_input: bool = True) -> torch.Tensor:
    """``[n, d_model]`` float32: tokens as layer ``layer``'s attention reads them (module docstring)."""
    return attn_input(model, layer, embed_tokens(model, ids), norm_input=norm_input)


def _blocks(ids: torch.Tensor, size: int = TOKEN_BLOCK):
    for start in range(0, ids.numel(), size):
        yield start, ids[start : start + size]
