"""Weight-based decoding through the model's own unembedding.

* :mod:`lmatlas.decode.vocab` — project vectors through the final norm and ``W_U``;
  chunked top-k / bottom-k tokens (:class:`TokenRanking`).
* :mod:`lmatlas.decode.fast_topk` — exact top-k for very many vectors: an int8
  scoring pass with a proven error bound, exact float32 rescoring of the survivors.
* :mod:`lmatlas.decode.neurons` — every MLP neuron of every layer: what it promotes
  and suppresses (its output row) and which tokens excite it (its input rows).
"""

from lmatlas.decode.vocab import (
    DecodeError,
    TokenRanking,
    final_norm_gain,
    project,
    top_and_bottom,
    topk_tokens,
    unembed_matrix,
)

__all__ = [
    "DecodeError",
    "TokenRanking",
    "final_norm_gain",
    "project",
    "top_and_bottom",
    "topk_tokens",
    "unembed_matrix",
]
