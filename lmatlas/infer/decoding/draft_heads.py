"""Medusa-1 style draft heads: small residual blocks on the last hidden state, sharing the unembedding.

Head ``k`` (``k = 1 .. K``) reads ``h_t`` ``[d_model]``, the final-normed hidden state
that gives the model's next token ``x_{t+1}``, and guesses the token ``k`` places later::

    logits_k(h_t) = lm_head( h_t + SiLU(W_k h_t + b_k) )          # guess for x_{t+1+k}

``W_k`` ``[d_model, d_model]`` starts at zero, so an untrained head repeats the model's
own next token. Training is self-distillation: the model decodes greedily from prompts
(instructions through its chat template, or windows of a corpus:
:mod:`lmatlas.infer.decoding.distill`), and each head learns, by cross-entropy with the
unembedding frozen, the token the model itself produced ``k`` places later; held-out
sequences give each head's top-1 agreement. The file is safetensors with metadata naming the base model (the card's
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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmatlas.errors import DraftHeadsError, InputError
from lmatlas.model.provenance import check_made_for, weights_fingerprint

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

_log = logging.getLogger(__name__)
FORMAT = "lmatlas-draft-heads/1"


class DraftHeads(nn.Module):
    """``K`` residual blocks: ``forward(h [..., d]) -> [K, ..., d]``; ``propose`` drafts tokens."""

    def __init__(
        self, n_heads: int, d_model: int, meta: dict[str, Any] | None = None, vocab: torch.Tensor | None = None
    ):
        super().__init__()
        if n_heads < 1:
            raise InputError(f"n_heads={n_heads}: train at least one draft head.")
        self.weight = nn.Parameter(torch.zeros(n_heads, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_heads, d_model))
        self.register_buffer("vocab", None if vocab is None else vocab.long())
        self.meta = dict(meta or {})
        self._rows: tuple | None = None

    @property
    def n_heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.weight.dtype)
        pre = torch.einsum("kod,...d->k...o", self.weight, x) + self.bias.view(self.n_heads, *([1] * (x.dim() - 1)), -1)
        return x.unsqueeze(0) + F.silu(pre)

    def check(self, hf: nn.Module) -> None:
        """Refuse heads trained for another model (weights fingerprint differs)."""
        mine = weights_fingerprint(hf)
        if self.meta.get("weights") not in (None, mine):
            raise DraftHeadsError(
                f"These draft heads were trained for another model ({self.meta.get('source')}, weights "
                f"{self.meta.get('weights')}; this model's are {mine}): train heads for it with "
                f"`lmatlas train-draft-heads MODEL`."
            )

    def _unembedding(self, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W [v, d_model], b [v] or None)``: the unembedding rows of :attr:`vocab` (all rows without one),
        cut once per unembedding matrix."""
        weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
        if self.vocab is None:
            return weight, bias
        key = (weight.data_ptr(), weight.shape, weight.dtype)
        if self._rows is None or self._rows[0] != key:
            self._rows = (key, weight[self.vocab].contiguous(), None if bias is None else bias[self.vocab])
        return self._rows[1], self._rows[2]

    @torch.no_grad()
    def guess(self, lm_head: nn.Module, hidden: torch.Tensor, k: int | None = None, with_prob: bool = False) -> Any:
        """``[k, ...]`` token ids: each head's argmax for ``hidden`` ``[..., d_model]``, over :attr:`vocab`
        (the draft vocabulary kept at training, the most frequent tokens of the model's own text) if set.
        With ``with_prob``, also ``[k, ...]`` the head's softmax probability of its guess (over the same rows)."""
        weight, bias = self._unembedding(lm_head)
        states = self(hidden)[:k].to(weight.dtype)  # [k, ..., d_model]
        logits = F.linear(states, weight, bias).float()  # [k, ..., v]
        best = logits.argmax(-1)
        tokens = best if self.vocab is None else self.vocab[best]
        if not with_prob:
            return tokens
        return tokens, torch.softmax(logits, -1).gather(-1, best.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def propose(self, hf: nn.Module, hidden: torch.Tensor, k: int, min_prob: float = 0.0) -> list[int]:
        """Up to ``k`` tokens after the last one, from ``hidden`` ``[d_model]`` (one small unembedding matmul).

        ``min_prob`` > 0 stops the draft at the first head whose own probability of its guess is
        below it: on a CPU a verifying forward costs more per drafted token, so unlikely guesses
        are better not drafted (the output stays greedy's either way)."""
        tokens, probs = self.guess(hf.get_output_embeddings(), hidden, min(k, self.n_heads), with_prob=True)
        keep = len(tokens)
        if min_prob > 0:
            below = (probs < min_prob).nonzero()
            keep = int(below[0]) if len(below) else keep
        return tokens[:keep].tolist()


def model_key(model: "Model") -> str:
    sha = model.card().get("file_sha256")
    return (sha or weights_fingerprint(model.hf))[:16]


def default_path(model: "Model") -> Path:
    root = Path(os.environ.get("LMATLAS_CACHE", Path.home() / ".cache" / "lmatlas")).expanduser()
    return root / "draft-heads" / f"{model_key(model)}.safetensors"


def save_draft_heads(heads: DraftHeads, model: "Model", path: str | Path) -> Path:
    """Write ``heads`` for ``model`` (atomically: a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card = model.card()
    meta = {
        "format": FORMAT,
        "source": str(card["source"]),
        "file_sha256": str(card.get("file_sha256")),
        "weights": weights_fingerprint(model.hf),
        "n_heads": str(heads.n_heads),
        "d_model": str(heads.weight.shape[-1]),
        "train": json.dumps(heads.meta.get("train", {})),
    }
    tmp = path.with_suffix(".tmp")
    tensors = {"weight": heads.weight.detach().contiguous(), "bias": heads.bias.detach().contiguous()}
    if heads.vocab is not None:
        tensors["vocab"] = heads.vocab.detach().contiguous()
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_draft_heads(model: "Model", path: str | Path | None = None) -> DraftHeads:
    """Load and check draft heads for ``model`` (default: :func:`default_path`)."""
    from safetensors import safe_open

    path = Path(path) if path is not None else default_path(model)
    if not path.exists():
        raise DraftHeadsError(
            f"No draft heads for this model at {path}: train them with `lmatlas train-draft-heads [MODEL]` "
            f"(a few minutes on CPU), or pass the path of a heads file."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            weight, bias = handle.get_tensor("weight"), handle.get_tensor("bias")
            vocab = handle.get_tensor("vocab") if "vocab" in handle.keys() else None
    except Exception as error:  # safetensors raises several types for a damaged file
        raise DraftHeadsError(f"{path} is not a draft-heads file ({error}).") from None
    if meta.get("format") != FORMAT:
        raise DraftHeadsError(f"{path} is not a draft-heads file (format {meta.get('format')!r}).")
    recorded = {**meta, "file_sha256": None if meta.get("file_sha256") in ("", "None") else meta.get("file_sha256")}
    check_made_for(
        recorded, model, str(path), DraftHeadsError, "train heads for it with `lmatlas train-draft-heads MODEL`."
    )
    heads = DraftHeads(
        weight.shape[0], weight.shape[-1], meta={**meta, "train": json.loads(meta.get("train", "{}"))}, vocab=vocab
    )
    with torch.no_grad():
        heads.weight.copy_(weight)
        heads.bias.copy_(bias)
    return heads.to(model.device)


def train_draft_heads(
    model: "Model",
    n_heads: int = 3,
    *,
    data: str | None = None,
    n_prompts: int = 64,
    prompt_len: int = 24,
    new_tokens: int = 64,
    minutes: float = 4.0,
    max_steps: int = 400,
    batch: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    texts: list[str] | None = None,
    heldout: float = 0.125,
    draft_vocab: int | None = 4096,
    progress: Any = True,
) -> DraftHeads:
    """Self-distil ``n_heads`` draft heads (see the module docstring) within about ``minutes``.

    ``data``: ``"chat"`` (the model's answers to a table of instructions; the default when the
    tokenizer has a chat template) or ``"corpus"`` (continuations of ``texts`` windows of
    ``prompt_len`` tokens); see :mod:`lmatlas.infer.decoding.distill`. Generating the data
    stops once half the budget is spent. A ``heldout`` fraction of the sequences is kept out of
    training to measure each head's top-1 agreement with the model's own tokens
    (``meta["train"]["heldout_top1"]``, before and after training). ``draft_vocab``: the heads
    draft among the most frequent tokens of the training targets only (``None``: the whole
    vocabulary), which makes each draft a small matmul instead of a full unembedding; the
    coverage of held-out targets is reported (a token outside it is simply never drafted).
    """
    from lmatlas.infer.decoding.distill import head_agreement

    if n_heads < 1:
        raise InputError(f"n_heads={n_heads}: train at least one draft head.")
    if new_tokens <= n_heads + 1:
        raise InputError(f"new_tokens={new_tokens}: generate more than n_heads + 1 = {n_heads + 1} tokens per prompt.")
    if draft_vocab is not None and draft_vocab < 1:
        raise InputError(f"draft_vocab={draft_vocab}: keep at least one token (or None for all).")
    if data is None:
        data = "chat" if getattr(model.tokenizer, "chat_template", None) is not None else "corpus"
    torch.manual_seed(seed)
    start, budget = time.perf_counter(), minutes * 60
    train, test, used_prompts = _distilled(
        model, data, n_heads, n_prompts, prompt_len, new_tokens, texts, seed, heldout, start + budget / 2, progress
    )
    data_seconds = time.perf_counter() - start
    lm_head = model.hf.get_output_embeddings()
    vocab, coverage = _draft_vocabulary(train[1], test[1], draft_vocab, lm_head.weight.shape[0])
    heads = DraftHeads(n_heads, train[0].shape[1], vocab=vocab).to(model.device)
    before = head_agreement(heads, lm_head, *test)
    losses = _fit(heads, lm_head, train, max_steps, batch, lr, seed, start + budget, progress)
    heads.eval()
    after = head_agreement(heads, lm_head, *test)
    heads.meta["train"] = {
        "n_heads": n_heads,
        "data": data,
        "prompts": used_prompts,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "steps": len(losses),
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "data_seconds": round(data_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "positions": int(train[0].shape[0]),
        "heldout_positions": int(test[0].shape[0]),
        "first_loss": sum(losses[:10]) / max(len(losses[:10]), 1),
        "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1),
        "draft_vocab": None if vocab is None else int(vocab.numel()),
        "draft_vocab_coverage": round(coverage, 4),
        "heldout_top1_untrained": [round(a, 4) for a in before],
        "heldout_top1": [round(a, 4) for a in after],
    }
    heads.meta["weights"] = weights_fingerprint(model.hf)
    return heads


Pairs = tuple[torch.Tensor, torch.Tensor]  # (states [rows, d_model], labels [n_heads, rows])


def _distilled(
    model: "Model",
    data: str,
    n_heads: int,
    n_prompts: int,
    prompt_len: int,
    new_tokens: int,
    texts: list[str] | None,
    seed: int,
    heldout: float,
    deadline: float,
    progress: Any,
) -> tuple[Pairs, Pairs, int]:
    """``(train, test, prompts used)``: the model's own continuations as (state, next tokens) pairs;
    generation stops at ``deadline`` (``time.perf_counter()``), a ``heldout`` fraction kept for testing."""
    from lmatlas.infer.decoding.distill import continuations, head_targets, prompt_token_lists
    from lmatlas.progress import progress_task

    prompts = prompt_token_lists(model, data, n_prompts, prompt_len, texts, seed)
    train_parts, test_parts = [], []
    chunk = 16
    with progress_task("Draft heads: the model's own continuations", total=len(prompts), enabled=progress) as task:
        for i in range(0, len(prompts), chunk):
            hidden, tokens = continuations(model, prompts[i : i + chunk], new_tokens)
            n_test = int(round(heldout * hidden.shape[0])) if hidden.shape[0] > 1 else 0
            train_parts.append(head_targets(hidden[n_test:], tokens[n_test:], n_heads))
            if n_test:
                test_parts.append(head_targets(hidden[:n_test], tokens[:n_test], n_heads))
            task.update(min(i + chunk, len(prompts)))
            if i > 0 and time.perf_counter() > deadline:
                _log.info("Draft heads: data generation stopped at %d prompts (half the time budget)", i + chunk)
                break
    states = torch.cat([s for s, _ in train_parts]).to(model.device)  # [rows, d]
    labels = torch.cat([l for _, l in train_parts], 1).to(model.device)  # [K, rows]
    if states.shape[0] == 0:
        raise InputError("No usable positions: the model stopped too early; raise new_tokens or use data='corpus'.")
    test_states = torch.cat([s for s, _ in test_parts]).to(model.device) if test_parts else states[:0]
    test_labels = torch.cat([l for _, l in test_parts], 1).to(model.device) if test_parts else labels[:, :0]
    return (states, labels), (test_states, test_labels), min(len(prompts), len(train_parts) * chunk)


def _draft_vocabulary(
    labels: torch.Tensor, test_labels: torch.Tensor, size: int | None, d_vocab: int
) -> tuple[torch.Tensor | None, float]:
    """``(the ``size`` most frequent training targets, sorted; the share of held-out targets they cover)``."""
    if size is None:
        return None, 1.0
    counts = torch.bincount(labels.reshape(-1).cpu(), minlength=d_vocab)
    vocab = torch.argsort(counts, descending=True)[: min(size, int((counts > 0).sum()))].sort().values
    coverage = float(torch.isin(test_labels.cpu(), vocab).float().mean()) if test_labels.numel() else 1.0
    return vocab, coverage


def _fit(
    heads: DraftHeads,
    lm_head: nn.Module,
    train: Pairs,
    max_steps: int,
    batch: int,
    lr: float,
    seed: int,
    deadline: float,
    progress: Any,
) -> list[float]:
    """Train ``heads`` (the unembedding frozen) by cross-entropy on ``train`` until ``max_steps`` or
    ``deadline``; returns the loss of every step."""
    from lmatlas.progress import progress_task

    states_all, labels = train
    optimiser = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for param in lm_head.parameters():
        param.requires_grad_(False)
    with progress_task("Draft heads: training", total=max_steps, enabled=progress) as task:
        while len(losses) < max_steps and time.perf_counter() < deadline:
            rows = torch.randint(states_all.shape[0], (min(batch, states_all.shape[0]),), generator=generator)
            states = heads(states_all[rows])  # [K, b, d]
            logits = lm_head(states.to(lm_head.weight.dtype)).float()  # [K, b, V]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, rows].reshape(-1))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            task.update(len(losses), description=f"Draft heads: training (loss {losses[-1]:.3f})")
    return losses
