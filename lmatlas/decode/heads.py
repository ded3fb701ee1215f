"""What each attention head writes and reads, from its parameters alone (MAPS).

A head does two things: its **QK circuit** decides where it looks (query token ->
key token) and its **OV circuit** decides what it writes once it looks there
(source token -> residual-stream vector). Both are bilinear maps of token
embeddings, so they can be read through the vocabulary without running the model.

**Inputs.** A token enters as ``x = embed(id)``, produced by the native embedding
module (so Gemma's ``sqrt(d_model)`` scale is included; GPT-2's positional
embedding is not), then -- by default, ``norm_input=True`` -- through the layer's own
pre-attention norm (the native module), because that is what the head reads: it
puts every token on the same scale and applies the norm's per-dimension gain.
Families without a pre-norm (OLMo-2) use ``x`` as is.

**OV circuit** of query head ``h`` of layer ``l`` (GQA: it reads KV head
``kv = h // group_size``)::

    logits[s, t] = (x_s @ W_V[kv] + b_V[kv]) @ W_O[h] * post_gain * final_gain @ W_U[:, t]
                   \\______ left [n, d_head] _______/   \\_________ right [d_head, d_vocab] ________/

``post_gain`` is the gain of a post-attention norm (Gemma 2/3, OLMo-2; its
data-dependent ``rsqrt`` is one positive number per position and does not change
rankings), ``final_gain`` that of the final norm (``norm="gain"`` in
:mod:`lmatlas.decode.vocab`; no ``b_U``, no soft-capping: the logits are the head's
linear contribution). The value bias ``b_V`` is included: whatever the head
attends to, its attention weights sum to one, so it always writes ``b_V @ W_O``.
The product is computed in this factored form (rank ``d_head``), chunked over
source tokens and the output vocabulary by :func:`lmatlas.decode.vocab.topk_rows`:
never a ``d_vocab x d_vocab`` matrix. The logits are those of the direction (the
final norm's ``rsqrt`` is left out): compare them within a head or across heads,
not with the model's output logits.

* **copying score**: the fraction of source tokens ``s`` whose own id is among the
  head's top-``k`` outputs for ``s`` (a head that writes back what it reads, e.g.
  induction and name-mover heads); **suppression score**: the same for the
  bottom-``k`` (copy suppression). Over every token, or over a seeded random sample
  (``sources=1024``, the default of :func:`copying_scores`).

**QK circuit**: the attention logit of a query token ``a`` for a key token ``b``::

    score[a, b] = qnorm(x_a @ W_Q[h] + b_Q[h]) . knorm(x_b @ W_K[kv] + b_K[kv]) * scaling

with the family's q/k norms when its attention module has them (``q_norm`` /
``k_norm``, per head or over the whole projection) and the module's ``scaling``.
*Limitation:* rotary embeddings are left out -- this is exactly the score at
relative distance 0 (both rotated by the same angle), not at other distances; GPT-2's
absolute positions and attention soft-capping (Gemma 2, monotonic) are left out too.

The code lives in one module per concept: :mod:`lmatlas.decode.head_inputs` (token ids
and what a layer reads), :mod:`lmatlas.decode.ov` (the OV factors and :func:`decode_ov`),
:mod:`lmatlas.decode.lowrank_topk` (its exact top/bottom selection),
:mod:`lmatlas.decode.copying` (copying scores, promoting heads); this module gathers them.
"""

from lmatlas.decode.copying import CopyingScores, TokenPromotion, copying_scores, promoting_heads, self_hits
from lmatlas.decode.head_inputs import (
    DEFAULT_SAMPLE,
    TOKEN_BLOCK,
    _blocks,
    attn_input,
    embed_tokens,
    head_inputs,
    token_ids,
)
from lmatlas.decode.lowrank_topk import SEGMENT, score_rows, top_and_bottom_rows
from lmatlas.decode.ov import (
    OVDecoding,
    decode_ov,
    decode_ov_layer,
    ov_factors,
    ov_left,
    ov_right,
    ov_rights,
    ov_write,
    post_norm_gain,
)

__all__ = [
    "DEFAULT_SAMPLE",
    "SEGMENT",
    "TOKEN_BLOCK",
    "CopyingScores",
    "OVDecoding",
    "TokenPromotion",
    "_blocks",
    "attn_input",
    "copying_scores",
    "decode_ov",
    "decode_ov_layer",
    "embed_tokens",
    "head_inputs",
    "ov_factors",
    "ov_left",
    "ov_right",
    "ov_rights",
    "ov_write",
    "post_norm_gain",
    "promoting_heads",
    "score_rows",
    "self_hits",
    "token_ids",
    "top_and_bottom_rows",
]
