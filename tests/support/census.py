"""A model whose heads are known because their weights were set by hand (the census tests' ground truth).

A two-layer, attention-only GPT-2 (MLPs zeroed) over the byte tokenizer. The residual
stream is split into named subspaces (``d_model = 544``, ``d_head = 136``):

=========  ==========  =========================================================
subspace   dims        content
=========  ==========  =========================================================
POS        0..135      one-hot position (learned position embedding ``wpe``)
TOK        136..199    the token: a random unit vector per token id (64 dims)
PREV       200..263    written by L0.H0: the *previous* token's TOK vector
CONST      264         1.0 in every token embedding (a bias feature)
JUNK       265..269    one dimension per "neutral" head's write, read by nothing
=========  ==========  =========================================================

Heads (every other weight is zero):

* ``L0.H0`` previous-token: query = one-hot position ``p``, key = one-hot position
  shifted by one, so the only large score is at key ``p - 1``; value = TOK, written to PREV.
* ``L0.H1`` attention sink: query = CONST, key = "position 0", so every query
  attends to the first token; value = CONST, written to its JUNK dimension.
* ``L0.H2`` neutral: no query/key (uniform attention); value = CONST -> JUNK.
* ``L0.H3`` dormant: all zero, it writes nothing.
* ``L1.H0`` induction: query = TOK of the current token, key = PREV (the token
  before each key), so it attends to the token after the earlier copy of the current
  one; value = TOK written back to TOK (twice as loud as the current token), which the
  unembedding (``W_U`` = the TOK vectors) reads: it copies.
* ``L1.H1..H3`` neutral: uniform attention, value = CONST -> JUNK.

The census must find exactly these: no other head may carry any of the labels.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmatlas.model.handle import Model
from lmatlas.model.tiny import byte_tokenizer

N_POS, D_TOK, D_HEAD, N_HEADS = 136, 64, 136, 4
POS, TOK, PREV, CONST, JUNK = 0, N_POS, N_POS + D_TOK, N_POS + 2 * D_TOK, N_POS + 2 * D_TOK + 1

D_MODEL = D_HEAD * N_HEADS
STRENGTH = 2.0  # query scale of the positional heads
MATCH = 4.0  # query scale of the induction head
VALUE = 1 / 12.0  # undoes the pre-attention LayerNorm's gain (about 1 / sqrt(3 / D_MODEL)) on the written vectors
EXPECTED = {
    "previous_token": {"L0.H0"},
    "attention_sink": {"L0.H1"},
    "induction": {"L1.H0"},
    "dormant": {"L0.H3"},
    "duplicate_token": set(),
    "local": set(),
}


def _head(n_in: int = D_MODEL) -> torch.Tensor:
    return torch.zeros(n_in, D_HEAD)


def _set_layer(block, heads: list[dict[str, torch.Tensor]]) -> None:
    """Write per-head ``W_Q/W_K/W_V`` ``[d_model, d_head]`` and ``W_O`` ``[d_head, d_model]`` into GPT-2's Conv1Ds."""
    w_q = torch.cat([h["Q"] for h in heads], dim=1)
    w_k = torch.cat([h["K"] for h in heads], dim=1)
    w_v = torch.cat([h["V"] for h in heads], dim=1)
    block.attn.c_attn.weight.copy_(torch.cat([w_q, w_k, w_v], dim=1))  # Conv1D: [in, out]
    block.attn.c_proj.weight.copy_(torch.cat([h["O"] for h in heads], dim=0))


def _neutral(junk: int) -> dict[str, torch.Tensor]:
    head = {"Q": _head(), "K": _head(), "V": _head(), "O": torch.zeros(D_HEAD, D_MODEL)}
    head["V"][CONST, 0] = VALUE
    head["O"][0, JUNK + junk] = 1.0
    return head


def handbuilt_model(seed: int = 0) -> Model:
    config = GPT2Config(
        vocab_size=260,
        n_embd=D_MODEL,
        n_layer=2,
        n_head=N_HEADS,
        n_inner=8,
        n_positions=N_POS,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    hf = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(config.vocab_size, D_TOK, generator=generator)
    tokens = tokens / tokens.norm(dim=1, keepdim=True)
    with torch.no_grad():
        for param in hf.parameters():
            param.zero_()
        for name, param in hf.named_parameters():  # LayerNorm gains back to 1
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    param.fill_(1.0)
        hf.transformer.wte.weight[:, TOK : TOK + D_TOK] = tokens
        hf.transformer.wte.weight[:, CONST] = 1.0
        hf.transformer.wpe.weight[:, POS : POS + N_POS] = torch.eye(N_POS)
        hf.lm_head.weight[:, TOK : TOK + D_TOK] = tokens

        previous = {"Q": _head(), "K": _head(), "V": _head(), "O": torch.zeros(D_HEAD, D_MODEL)}
        previous["Q"][POS : POS + N_POS, :N_POS] = STRENGTH * torch.eye(N_POS)
        previous["K"][POS : POS + N_POS - 1, 1:N_POS] = torch.eye(N_POS - 1)  # key p' -> head dim p' + 1
        previous["V"][TOK : TOK + D_TOK, :D_TOK] = VALUE * torch.eye(D_TOK)
        previous["O"][:D_TOK, PREV : PREV + D_TOK] = torch.eye(D_TOK)

        sink = {"Q": _head(), "K": _head(), "V": _head(), "O": torch.zeros(D_HEAD, D_MODEL)}
        sink["Q"][CONST, 0] = STRENGTH
        sink["K"][POS + 0, 0] = 1.0
        sink["V"][CONST, 0] = VALUE
        sink["O"][0, JUNK + 0] = 1.0

        dormant = {"Q": _head(), "K": _head(), "V": _head(), "O": torch.zeros(D_HEAD, D_MODEL)}
        _set_layer(hf.transformer.h[0], [previous, sink, _neutral(1), dormant])

        induction = {"Q": _head(), "K": _head(), "V": _head(), "O": torch.zeros(D_HEAD, D_MODEL)}
        induction["Q"][TOK : TOK + D_TOK, :D_TOK] = MATCH * torch.eye(D_TOK)
        induction["K"][PREV : PREV + D_TOK, :D_TOK] = torch.eye(D_TOK)
        induction["V"][TOK : TOK + D_TOK, :D_TOK] = VALUE * torch.eye(D_TOK)
        induction["O"][:D_TOK, TOK : TOK + D_TOK] = 2.0 * torch.eye(D_TOK)  # louder than the current token
        _set_layer(hf.transformer.h[1], [induction, _neutral(2), _neutral(3), _neutral(4)])
    return Model.from_hf(hf, byte_tokenizer(), source="handbuilt:gpt2")
