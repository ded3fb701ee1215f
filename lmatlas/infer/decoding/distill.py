"""Self-distillation data for draft heads: the model's own greedy continuations, and how well heads guess them.

Two sources of prompts:

==========  ==================================================================================
``chat``    instructions from a small table (:data:`TEMPLATES` x :data:`TOPICS`) through the
            tokenizer's chat template: the model's own answers, the text ``generate --chat`` makes
``corpus``  windows cut from a corpus (the atlas's default corpus unless given): plain continuations
==========  ==================================================================================

Each batch of prompts is left-padded and decoded greedily by the model
(:func:`continuations`), then run once teacher-forced to read the final-normed hidden state
``h_t`` ``[d_model]`` at every position. Only the model's own tokens are targets: prompt and
padding positions, and positions after an end token, are ``-100``.

:func:`head_targets` pairs each usable ``h_t`` with the tokens head ``k`` must guess
(``x_{t+1+k}``, ``k = 1 .. K``, where ``x_{t+1}`` is the model's own next token), and
:func:`head_agreement` measures the top-1 agreement of each head on held-out sequences.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Sequence

import torch

from lmatlas.errors import InputError
from lmatlas.model.generation import pad_token_id

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

TEMPLATES = (
    "Explain {} in simple terms.",
    "Write a short paragraph about {}.",
    "What are the advantages and disadvantages of {}?",
    "Give three interesting facts about {}.",
    "Write a short story that involves {}.",
    "How would you teach a beginner about {}?",
)
TOPICS = (
    "volcanoes",
    "the printing press",
    "honey bees",
    "electric cars",
    "chess",
    "the Roman Empire",
    "black holes",
    "coffee",
    "the internet",
    "rainforests",
    "solar panels",
    "the human heart",
    "jazz music",
    "earthquakes",
    "the Moon landing",
    "recycling",
    "dinosaurs",
    "money",
    "sleep",
    "the Olympic Games",
    "glaciers",
    "submarines",
    "public libraries",
    "mushrooms",
    "trains",
    "the immune system",
    "origami",
    "hurricanes",
    "the stock market",
    "penguins",
    "bread baking",
    "satellites",
    "the Great Wall of China",
    "robots",
    "coral reefs",
    "time zones",
    "musical scales",
    "spiders",
    "democracy",
    "wind turbines",
)
SOURCES = ("chat", "corpus")


def chat_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` instructions (template x topic pairs in a seeded order; they repeat past 240)."""
    pairs = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    random.Random(seed).shuffle(pairs)
    return [pairs[i % len(pairs)] for i in range(n)]


def prompt_token_lists(
    model: "Model", source: str, n: int, prompt_len: int, texts: Sequence[str] | None, seed: int = 0
) -> list[list[int]]:
    """The token ids of ``n`` prompts from ``source`` (``chat`` or ``corpus``); checked before any compute."""
    if source not in SOURCES:
        raise InputError(f"Unknown distillation source {source!r}: use one of {', '.join(SOURCES)}.")
    if source == "chat":
        if getattr(model.tokenizer, "chat_template", None) is None:
            raise InputError(f"{model.card()['source']} has no chat template: train on a corpus (data='corpus').")
        from lmatlas.model.generation import prompt_ids

        return [prompt_ids(model, text, True)["input_ids"][0].tolist() for text in chat_prompts(n, seed)]
    from lmatlas.corpus import corpus_windows, default_texts

    return corpus_windows(model, list(texts or default_texts()), n_sequences=n, seq_len=prompt_len).tolist()


def stop_ids(model: "Model") -> set[int]:
    from lmatlas.infer.decoding.speculative import _eos_ids

    stops = _eos_ids(model.hf, None)
    if model.tokenizer.eos_token_id is not None:
        stops.add(int(model.tokenizer.eos_token_id))
    return stops


def continuations(
    model: "Model", prompts: Sequence[Sequence[int]], new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [n, pos, d_model], tokens [n, pos])`` for a batch of prompts (see the module docstring)."""
    from lmatlas.model.readout import FinalNormTap

    hf = model.hf
    pad = pad_token_id(model.tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
        mask[i, width - len(prompt) :] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=pad,
        ).cpu()
        full = torch.cat([mask, torch.ones((len(prompts), out.shape[1] - width), dtype=torch.long)], 1)
        positions = (full.cumsum(-1) - 1).clamp(min=0)
        with FinalNormTap(hf) as tap:
            hf(
                input_ids=out.to(model.device),
                attention_mask=full.to(model.device),
                position_ids=positions.to(model.device),
                use_cache=False,
            )
        hidden = tap.value.float().cpu()
    tokens = out.clone()
    tokens[:, :width] = -100
    stops = stop_ids(model)
    for row in range(tokens.shape[0]):
        for t in range(width, tokens.shape[1]):
            if int(out[row, t]) in stops:
                tokens[row, t + 1 :] = -100  # the end token is a target, what follows is padding
                break
    return hidden, tokens


def head_targets(hidden: torch.Tensor, tokens: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states [rows, d_model], labels [n_heads, rows])``: every ``h_t`` whose ``n_heads`` targets
    ``tokens[t + 2 .. t + 1 + n_heads]`` are all the model's own tokens (head ``k`` guesses ``tokens[t + 1 + k]``)."""
    n, pos, d = hidden.shape
    span = pos - 1 - n_heads
    if span < 1:
        raise InputError(f"Sequences of {pos} tokens are too short for {n_heads} draft heads.")
    labels = torch.stack([tokens[:, 2 + k : 2 + k + span] for k in range(n_heads)]).reshape(n_heads, -1)
    usable = (labels >= 0).all(0).nonzero().squeeze(1)
    return hidden[:, :span].reshape(-1, d)[usable], labels[:, usable]


@torch.no_grad()
def head_agreement(
    heads: Any, lm_head: Any, states: torch.Tensor, labels: torch.Tensor, chunk: int = 256
) -> list[float]:
    """Top-1 agreement of each head with the model's own tokens: ``[n_heads]`` fractions of ``labels``
    (the heads' :meth:`~lmatlas.infer.decoding.draft_heads.DraftHeads.guess`, as they draft)."""
    if states.shape[0] == 0:
        return [0.0] * labels.shape[0]
    hits = torch.zeros(labels.shape[0])
    for i in range(0, states.shape[0], chunk):
        guess = heads.guess(lm_head, states[i : i + chunk])  # [K, b]
        hits += (guess == labels[:, i : i + chunk]).sum(1).float().cpu()
    return (hits / states.shape[0]).tolist()
