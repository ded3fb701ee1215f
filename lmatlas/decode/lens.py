"""The logit lens: read the residual stream after every layer as a next-token distribution.

For a prompt, the residual stream leaving block ``l`` (``L<l>.resid.post``,
``[pos, d_model]``) is pushed through what the model does after its last block::

    p_l = softmax( softcap( final_norm(resid_l) @ W_U + b_U ) )          # [pos, d_vocab]

(:func:`lmatlas.decode.vocab.project` with ``norm="full"``: the native final norm, so
the last layer's distribution *is* the model's output). Per layer and position it
reports the top tokens, the probability of the model's final prediction (its argmax
at that position), the entropy ``H(p_l)`` and ``KL(p_final || p_l)`` (both in nats),
where ``p_final`` is the softmax of the model's own logits. Early layers are not
trained to be read this way, so their distributions are only indicative (tuned
lenses exist for that reason); the numbers here are exact for what they are.

Memory: one ``[block, d_vocab]`` float32 slab at a time (``block`` positions of one
layer), never ``layers x pos x d_vocab``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.decode.token_text import token_texts
from lmatlas.decode.vocab import DecodeError, project

if TYPE_CHECKING:
    from lmatlas.model.handle import Inputs, Model

#: Positions projected at once (bounds the ``[block, d_vocab]`` buffer).
POS_BLOCK = 256


@dataclass
class LensResult:
    """The logit lens of one prompt: ``rows`` = layers (plus ``"embed"`` if asked), ``pos`` = positions.

    Attributes:
        input_ids: ``[pos]`` the prompt's tokens.
        labels: ``[rows]`` ``"L0"``, ``"L1"``, ... (``"embed"`` first when included).
        top_ids: ``[rows, pos, k]`` the most probable tokens at each layer and position.
        top_probs: ``[rows, pos, k]`` their probabilities.
        final_ids: ``[pos]`` the model's prediction at each position (argmax of its logits).
        final_prob: ``[rows, pos]`` the probability each layer gives to ``final_ids``.
        entropy: ``[rows, pos]`` entropy of each layer's distribution, nats.
        kl: ``[rows, pos]`` ``KL(final || layer)``, nats.
        input_tokens / top_tokens / final_tokens: the same ids as strings (``None`` without a tokenizer).
    """

    input_ids: torch.Tensor
    labels: list[str]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    final_ids: torch.Tensor
    final_prob: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    input_tokens: list[str] | None = None
    top_tokens: list[list[list[str]]] | None = None
    final_tokens: list[str] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, pos)``."""
        return tuple(self.final_prob.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: one entry per layer, each with one entry per position."""
        rows, pos = self.shape
        tokens = self.top_tokens or [[[None] * self.top_ids.shape[2]] * pos] * rows
        return {
            "input_ids": self.input_ids.tolist(),
            "input_tokens": self.input_tokens,
            "final_ids": self.final_ids.tolist(),
            "final_tokens": self.final_tokens,
            "layers": [
                {
                    "layer": self.labels[r],
                    "positions": [
                        {
                            "top": [
                                {"id": i, "token": t, "prob": p}
                                for i, t, p in zip(
                                    self.top_ids[r, j].tolist(), tokens[r][j], self.top_probs[r, j].tolist()
                                )
                            ],
                            "final_prob": float(self.final_prob[r, j]),
                            "entropy": float(self.entropy[r, j]),
                            "kl": float(self.kl[r, j]),
                        }
                        for j in range(pos)
                    ],
                }
                for r in range(rows)
            ],
        }


def _streams(model: "Model", inputs: "Inputs", include_embed: bool) -> tuple[torch.Tensor, list, torch.Tensor, list]:
    """``(input_ids [pos], streams [rows] of [pos, d_model], final logits [pos, d_vocab], labels)``."""
    capture = ["resid.post"] + (["L0.resid.pre"] if include_embed else [])
    cache = model.run(inputs, capture=capture)
    if cache.input_ids.shape[0] != 1:
        raise DecodeError(f"The logit lens reads one prompt at a time; got a batch of {cache.input_ids.shape[0]}.")
    n = model.layout.n_layers
    streams = [cache.resid(l, "post")[0] for l in range(n)]
    labels = [f"L{l}" for l in range(n)]
    if include_embed:
        streams, labels = [cache.resid(0, "pre")[0]] + streams, ["embed"] + labels
    return cache.input_ids[0], streams, cache.logits[0].float(), labels


def _top(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, ids)`` ``[n, k]``: ``torch.topk(p, k)``. For ``k = 1`` the row maximum, which is the
    same answer (the first of equal maxima, a NaN before any number) from one scan of each row."""
    if k == 1:
        return torch.max(p, dim=-1, keepdim=True)
    return torch.topk(p, k, dim=-1)


def _n_tokens(model: "Model", text: str) -> int:
    if model.tokenizer is None:
        return 0
    return len(model.tokenizer(text)["input_ids"])


def logit_lens(
    model: "Model", inputs: "Inputs", *, k: int = 5, include_embed: bool = False, texts: bool = True
) -> LensResult:
    """Run ``inputs`` (one prompt: text or ``[pos]`` / ``[1, pos]`` ids) and read every layer.

    Args:
        k: top tokens kept per layer and position.
        include_embed: also read the stream entering block 0 (``L0.resid.pre``) as row ``"embed"``.
        texts: also spell the tokens (``input_tokens``, ``top_tokens``, ``final_tokens``; needs a
            tokenizer). ``False`` leaves them ``None`` (the numbers are the same).
    """
    if not 1 <= k <= model.layout.d_vocab:
        raise DecodeError(f"k={k} is out of range: pick 1..{model.layout.d_vocab} (the vocabulary size).")
    if isinstance(inputs, str) and _n_tokens(model, inputs) == 0:
        raise DecodeError('The prompt is empty: give the text to read, e.g. `lmatlas lens "The capital of France is"`.')
    if not isinstance(inputs, str) and hasattr(inputs, "numel") and inputs.numel() == 0:
        raise DecodeError("The prompt has no tokens: give at least one token id.")
    input_ids, streams, final_logits, labels = _streams(model, inputs, include_embed)
    final_logp = torch.log_softmax(final_logits, -1)  # [pos, d_vocab]
    final_p = final_logp.exp()  # p_final, once: KL's weights for every layer
    final_ids = final_logits.argmax(-1)
    rows, pos = len(streams), input_ids.numel()
    top_ids = torch.empty(rows, pos, k, dtype=torch.int64)
    top_probs = torch.empty(rows, pos, k)
    final_prob, entropy, kl = (torch.empty(rows, pos) for _ in range(3))
    # three [block, d_vocab] buffers reused by every block: logits, probabilities, elementwise terms
    logits, p, terms = (torch.empty(min(pos, POS_BLOCK), model.layout.d_vocab, device=final_logp.device) for _ in "lpt")
    for r, stream in enumerate(streams):
        for start in range(0, pos, POS_BLOCK):
            sl = slice(start, start + POS_BLOCK)
            n = stream[sl].shape[0]
            logp = torch.log_softmax(project(model, stream[sl], norm="full", out=logits), -1)  # [n, d_vocab]
            torch.exp(logp, out=p[:n])
            values, ids = _top(p[:n], k)
            top_ids[r, sl], top_probs[r, sl] = ids.cpu(), values.cpu()
            final_prob[r, sl] = p[:n].gather(-1, final_ids[sl, None].to(p.device))[:, 0].cpu()
            entropy[r, sl] = -torch.mul(p[:n], logp, out=terms[:n]).sum(-1).cpu()
            # KL(final || layer) = sum p_final (log p_final - log p_layer)
            ref = final_logp[sl].to(p.device)
            kl[r, sl] = torch.sub(ref, logp, out=terms[:n]).mul_(final_p[sl].to(p.device)).sum(-1).cpu()
    tok = model.tokenizer if texts else None
    strings = (lambda ids: token_texts(tok, ids)) if tok is not None else None  # byte tokens as <0xE2>
    return LensResult(
        input_ids=input_ids.cpu(),
        labels=labels,
        top_ids=top_ids,
        top_probs=top_probs,
        final_ids=final_ids.cpu(),
        final_prob=final_prob,
        entropy=entropy,
        kl=kl,
        input_tokens=strings(input_ids.tolist()) if strings else None,
        top_tokens=[[strings(top_ids[r, j].tolist()) for j in range(pos)] for r in range(rows)] if strings else None,
        final_tokens=strings(final_ids.tolist()) if strings else None,
    )
