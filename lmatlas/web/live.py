"""Live-model computations behind the explorer's typed-prompt panes.

Each function takes token ids already capped by :func:`prompt_ids` and runs one
forward through the model's hook API (:meth:`Model.run`), capturing only the site it
needs and stopping after the layer it reads (no later block, no logits):

* :func:`attention` — one head's pattern ``[pos, key_pos]`` (``L{l}.attn.pattern``),
  sent as its lower triangle in 16-bit fixed point (``round(p * 65535)``, absolute
  error below 1e-5), base64: about 5.6 MB of JSON at 2,048 tokens instead of 4M
  decimal numbers;
* :func:`activations` — one neuron's activation at every position (``L{l}.mlp.act``);
* :func:`lens` — the logit lens (:func:`lmatlas.decode.lens.logit_lens`).

The callers run them through the app's :class:`~lmatlas.web.gate.ModelGate`.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np
import torch

from lmatlas.decode.token_text import token_texts
from lmatlas.web.errors import Malformed

if TYPE_CHECKING:
    from lmatlas.model.cache import ActivationCache
    from lmatlas.model.handle import Model
    from lmatlas.web.state import Explorer

T = TypeVar("T")

ENCODING = "uint16 lower triangle (row i holds keys 0..i), little-endian, value/65535, base64"


def prompt_ids(model: "Model", prompt: str, limit: int) -> torch.Tensor:
    """``[1, pos]`` token ids of ``prompt``; :class:`Malformed` (422) beyond ``limit`` tokens."""
    if not prompt.strip():
        raise Malformed("The prompt is empty: type some text.")
    ids = model.tokenize(prompt)["input_ids"][:1]
    if ids.shape[1] > limit:
        raise Malformed(f"The prompt is {ids.shape[1]} tokens; this explorer takes at most {limit}. Shorten it.")
    return ids


def on_prompt(ex: "Explorer", what: str, prompt: str, limit: int, compute: Callable[..., T], *args: Any) -> T:
    """``compute(model, ids, *args)`` on the attached model, through the gate, for ``prompt`` capped at ``limit``.

    What every typed-prompt pane does: the explorer's no-model error names ``what``
    (:meth:`Explorer.need_model`), :func:`prompt_ids` checks the prompt (at most
    ``limit`` tokens) before the gate admits the request, and ``ids`` is ``[1, pos]``.
    """
    model = ex.need_model(what)
    ids = prompt_ids(model, prompt, limit)
    return ex.gate.run(lambda: compute(model, ids, *args))


def _run(model: "Model", ids: torch.Tensor, layer: int, site: str) -> "ActivationCache":
    """One forward up to block ``layer``, capturing ``L{layer}.{site}``."""
    return model.run(ids, capture=[f"L{layer}.{site}"], stop_after=layer, lm_head=False)


def tokens(model: "Model", ids: torch.Tensor) -> list[str]:
    return token_texts(model.tokenizer, ids[0].tolist())


def encode_lower_triangle(pattern: torch.Tensor) -> str:
    """``[n, n]`` probabilities -> base64 of the uint16 lower triangle, row-major (see :data:`ENCODING`)."""
    n = pattern.shape[0]
    rows, cols = torch.tril_indices(n, n)
    fixed = (pattern[rows, cols].float().clamp(0, 1) * 65535).round().to(torch.int32).numpy().astype("<u2")
    return base64.b64encode(fixed.tobytes()).decode("ascii")


def decode_lower_triangle(data: str, n: int) -> np.ndarray:
    """The inverse of :func:`encode_lower_triangle`: ``[n, n]`` float32 (zeros above the diagonal)."""
    values = np.frombuffer(base64.b64decode(data), dtype="<u2").astype(np.float32) / 65535
    out = np.zeros((n, n), dtype=np.float32)
    out[np.tril_indices(n)] = values
    return out


def attention(model: "Model", ids: torch.Tensor, layer: int, head: int) -> dict[str, Any]:
    cache = _run(model, ids, layer, "attn.pattern")
    pattern = cache.pattern(layer, head)[0]  # [pos, key_pos]
    return {
        "tokens": tokens(model, ids),
        "n": pattern.shape[0],
        "encoding": ENCODING,
        "data": encode_lower_triangle(pattern),
    }


def activations(model: "Model", ids: torch.Tensor, layer: int, neuron: int) -> dict[str, Any]:
    cache = _run(model, ids, layer, "mlp.act")
    return {"tokens": tokens(model, ids), "activations": cache.neurons(layer, neuron)[0].float().tolist()}


def lens(model: "Model", ids: torch.Tensor, k: int) -> dict[str, Any]:
    from lmatlas.decode.lens import logit_lens

    result = logit_lens(model, ids, k=k)
    rows, pos = result.shape
    cells = [
        [
            {
                "tokens": result.top_tokens[r][j],
                "probs": result.top_probs[r, j].tolist(),
                "final_prob": float(result.final_prob[r, j]),
                "entropy": float(result.entropy[r, j]),
            }
            for j in range(pos)
        ]
        for r in range(rows)
    ]
    return {"tokens": result.input_tokens, "final_tokens": result.final_tokens, "layers": result.labels, "cells": cells}
