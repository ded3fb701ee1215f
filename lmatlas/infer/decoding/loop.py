"""The one greedy loop behind every contrastive strategy, as transformers' ``_sample`` runs it.

A strategy is a function ``scores(outputs, input_ids) -> [batch, d_vocab]`` that turns
one forward's outputs (and whatever it captured on the side) into next-token scores;
this loop does the rest exactly as transformers' greedy loop does: prefill, the
model's logits processors (repetition penalty, ...), argmax, padding finished rows,
stopping criteria, the KV cache through ``prepare_inputs_for_generation``. A strategy
whose ``scores`` returns the model's own logits therefore reproduces greedy decoding
token for token (the tests check it).

It is called from a ``custom_generate`` callable (transformers passes it the prepared
``logits_processor``, ``stopping_criteria``, ``generation_config`` and model kwargs).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lmatlas.errors import InputError

ScoresFn = Callable[[Any, torch.Tensor], torch.Tensor]


def check_greedy(generation_config: Any, strategy: str) -> None:
    """Refuse beam search and sampling before any compute: these strategies decode greedily."""
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        raise InputError(
            f"{strategy} decodes greedily one sequence at a time: beam search "
            f"(num_beams={generation_config.num_beams}) is not supported; drop num_beams."
        )
    if getattr(generation_config, "do_sample", False):
        raise InputError(f"{strategy} decodes greedily: pass do_sample=False.")


def greedy_loop(
    hf: nn.Module,
    input_ids: torch.Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    model_kwargs: dict,
    scores: ScoresFn,
    streamer: Any = None,
) -> torch.Tensor:
    """Decode greedily with ``scores`` in place of the logits; returns ``[batch, prompt + new]`` ids."""
    pad = generation_config._pad_token_tensor
    has_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    outputs = hf._prefill(input_ids, generation_config, model_kwargs)
    while True:
        model_kwargs = hf._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        step_scores = logits_processor(input_ids, scores(outputs, input_ids))
        next_tokens = torch.argmax(step_scores, dim=-1)
        if has_eos and pad is not None:
            next_tokens = next_tokens * unfinished + pad.to(input_ids.device) * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, step_scores)
        if int(unfinished.max()) == 0:
            break
        model_inputs = hf.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
        outputs = hf(**model_inputs, return_dict=True)
    if streamer is not None:
        streamer.end()
    return input_ids
