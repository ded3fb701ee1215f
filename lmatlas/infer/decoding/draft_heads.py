"""Medusa-1 style draft heads: small residual blocks on the last hidden state, sharing the unembedding.

Head ``k`` (``k = 1 .. K``) reads ``h_t`` ``[d_model]``, the final-normed hidden state
that gives the model's next token ``x_{t+1}``, and guesses the token ``k`` places later::

    logits_k(h_t) = lm_head( h_t + SiLU(W_k h_t + b_k) )          # guess for x_{t+1+k}

``W_k`` ``[d_model, d_model]`` starts at zero, so an untrained head repeats the model's
own next token. Training is self-distillation: the model decodes greedily from prompts
cut from a corpus (the atlas's default corpus unless given), and each head learns, by
cross-entropy with the unembedding frozen, the token the model itself produced ``k``
places later. The file is safetensors with metadata naming the base model (the card's
file SHA-256 and a weights fingerprint); loading it for another model is refused.

Default location: ``$LMATLAS_CACHE/draft-heads/<model key>.safetensors`` (written by
``lmatlas train-draft-heads [MODEL]``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmatlas.errors import InputError, LmatlasError
from lmatlas.model.provenance import weights_fingerprint

_log = logging.getLogger(__name__)
FORMAT = "lmatlas-draft-heads/1"


class DraftHeadsError(LmatlasError):
    """Draft heads are missing, unreadable, or were trained for another model."""


class DraftHeads(nn.Module):
    """``K`` residual blocks: ``forward(h [..., d]) -> [K, ..., d]``; ``propose`` drafts tokens."""

    def __init__(self, n_heads: int, d_model: int, meta: dict[str, Any] | None = None):
        super().__init__()
        if n_heads < 1:
            raise InputError(f"n_heads={n_heads}: train at least one draft head.")
        self.weight = nn.Parameter(torch.zeros(n_heads, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_heads, d_model))
        self.meta = dict(meta or {})

    @property
    def n_heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.weight.dtype)
        pre = torch.einsum("kod,...d->k...o", self.weight, x) + self.bias.view(
            self.n_heads, *([1] * (x.dim() - 1)), -1)
        return x.unsqueeze(0) + F.silu(pre)

    def check(self, hf: nn.Module) -> None:
        """Refuse heads trained for another model (weights fingerprint differs)."""
        mine = weights_fingerprint(hf)
        if self.meta.get("weights") not in (None, mine):
            raise DraftHeadsError(
                f"These draft heads were trained for another model ({self.meta.get('source')}, weights "
                f"{self.meta.get('weights')}; this model's are {mine}): train heads for it with "
                f"`lmatlas train-draft-heads MODEL`.")

    @torch.no_grad()
    def propose(self, hf: nn.Module, hidden: torch.Tensor, k: int) -> list[int]:
        """Up to ``k`` tokens after the last one, from ``hidden`` ``[d_model]`` (one unembedding matmul)."""
        k = min(k, self.n_heads)
        states = self(hidden)[:k].to(hf.get_output_embeddings().weight.dtype)   # [k, d_model]
        return hf.get_output_embeddings()(states).argmax(-1).tolist()


def model_key(model: Any) -> str:
    sha = model.card().get("file_sha256")
    return (sha or weights_fingerprint(model.hf))[:16]


def default_path(model: Any) -> Path:
    root = Path(os.environ.get("LMATLAS_CACHE", Path.home() / ".cache" / "lmatlas")).expanduser()
    return root / "draft-heads" / f"{model_key(model)}.safetensors"


def save_draft_heads(heads: DraftHeads, model: Any, path: str | Path) -> Path:
    """Write ``heads`` for ``model`` (atomically: a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card = model.card()
    meta = {"format": FORMAT, "source": str(card["source"]), "file_sha256": str(card.get("file_sha256")),
            "weights": weights_fingerprint(model.hf), "n_heads": str(heads.n_heads),
            "d_model": str(heads.weight.shape[-1]), "train": json.dumps(heads.meta.get("train", {}))}
    tmp = path.with_suffix(".tmp")
    save_file({"weight": heads.weight.detach().contiguous(), "bias": heads.bias.detach().contiguous()},
              str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_draft_heads(model: Any, path: str | Path | None = None) -> DraftHeads:
    """Load and check draft heads for ``model`` (default: :func:`default_path`)."""
    from safetensors import safe_open

    path = Path(path) if path is not None else default_path(model)
    if not path.exists():
        raise DraftHeadsError(
            f"No draft heads for this model at {path}: train them with `lmatlas train-draft-heads [MODEL]` "
            f"(a few minutes on CPU), or pass the path of a heads file.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            weight, bias = handle.get_tensor("weight"), handle.get_tensor("bias")
    except Exception as error:  # safetensors raises several types for a damaged file
        raise DraftHeadsError(f"{path} is not a draft-heads file ({error}).") from None
    if meta.get("format") != FORMAT:
        raise DraftHeadsError(f"{path} is not a draft-heads file (format {meta.get('format')!r}).")
    card = model.card()
    if meta.get("file_sha256") != str(card.get("file_sha256")) or meta.get("weights") != weights_fingerprint(model.hf):
        raise DraftHeadsError(
            f"{path} holds draft heads trained for another model ({meta.get('source')}, file hash "
            f"{meta.get('file_sha256')}); this model's card hash is {card.get('file_sha256')}. Train heads for it "
            f"with `lmatlas train-draft-heads MODEL`.")
    heads = DraftHeads(weight.shape[0], weight.shape[-1], meta={**meta, "train": json.loads(meta.get("train", "{}"))})
    with torch.no_grad():
        heads.weight.copy_(weight)
        heads.bias.copy_(bias)
    return heads.to(model.device)


def self_distillation_data(model: Any, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [n, pos, d_model], tokens [n, pos])``: the model's greedy continuations of ``prompts``
    ``[n, prompt_len]`` and the final-normed hidden state at every position (positions after an
    end token are marked ``-100`` in ``tokens``)."""
    from lmatlas.infer.decoding.speculative import _NormTap

    hf = model.hf
    with torch.no_grad():
        out = hf.generate(input_ids=prompts.to(model.device), do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=model.tokenizer.eos_token_id or 0)
        with _NormTap(hf) as tap:
            hf(input_ids=out, use_cache=False)
        hidden = tap.value.float()
    tokens = out.clone()
    tokens[:, : prompts.shape[1]] = -100          # only the model's own tokens are targets
    return hidden, tokens


def train_draft_heads(
    model: Any, n_heads: int = 3, *, n_prompts: int = 64, prompt_len: int = 24, new_tokens: int = 64,
    minutes: float = 4.0, max_steps: int = 400, batch: int = 128, lr: float = 3e-3, seed: int = 0,
    texts: list[str] | None = None, progress: Any = True,
) -> DraftHeads:
    """Self-distil ``n_heads`` draft heads (see the module docstring) within about ``minutes``."""
    from lmatlas.atlas.corpus import corpus_windows, default_texts

    if n_heads < 1:
        raise InputError(f"n_heads={n_heads}: train at least one draft head.")
    from lmatlas.progress import progress_task

    torch.manual_seed(seed)
    start = time.perf_counter()
    prompts = corpus_windows(model, texts or default_texts(), n_sequences=n_prompts, seq_len=prompt_len)
    hiddens, targets = [], []
    with progress_task("Draft heads: the model's own continuations", total=prompts.shape[0],
                       enabled=progress) as task:
        for i in range(0, prompts.shape[0], 16):
            h, t = self_distillation_data(model, prompts[i:i + 16], new_tokens)
            hiddens.append(h)
            targets.append(t)
            task.update(min(i + 16, prompts.shape[0]))
    hidden, tokens = torch.cat(hiddens), torch.cat(targets)                 # [n, pos, d], [n, pos]
    # rows: (sequence, position t) with h_t; head k's target is tokens[t + 1 + k]
    n, pos, d = hidden.shape
    lm_head = model.hf.get_output_embeddings()
    heads = DraftHeads(n_heads, d).to(model.device)
    optimiser = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    span = pos - 1 - n_heads
    flat_h = hidden[:, :span].reshape(-1, d)
    labels = torch.stack([tokens[:, 1 + k + 1: 1 + k + 1 + span] for k in range(n_heads)]).reshape(n_heads, -1)
    usable = (labels >= 0).all(0).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    losses, step, budget = [], 0, minutes * 60
    for param in lm_head.parameters():
        param.requires_grad_(False)
    with progress_task("Draft heads: training", total=max_steps, enabled=progress) as task:
        while step < max_steps and time.perf_counter() - start < budget:
            rows = usable[torch.randint(len(usable), (min(batch, len(usable)),), generator=generator)]
            states = heads(flat_h[rows])                                           # [K, b, d]
            logits = lm_head(states.to(lm_head.weight.dtype)).float()             # [K, b, V]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, rows].reshape(-1))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            step += 1
            task.update(step, description=f"Draft heads: training (loss {losses[-1]:.3f})")
    heads.meta["train"] = {"n_heads": n_heads, "prompts": int(prompts.shape[0]), "prompt_len": prompt_len,
                           "new_tokens": new_tokens, "steps": step, "batch": batch, "lr": lr, "seed": seed,
                           "seconds": round(time.perf_counter() - start, 1), "positions": int(len(usable)),
                           "first_loss": sum(losses[:10]) / max(len(losses[:10]), 1),
                           "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1)}
    heads.meta["weights"] = weights_fingerprint(model.hf)
    return heads.eval()
