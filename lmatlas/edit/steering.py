"""Directions to steer with: contrastive steering vectors and directions decoded from the weights.

* :func:`steering_vector` — mean difference of the residual stream at the last token
  between positive and negative prompts (activation addition / contrastive
  activation addition): ``Add("L10.resid.post", v, alpha=4)``.
* :func:`neuron_direction` — a neuron's write to the residual stream (its ``W_out``
  row, times the post-MLP norm's gain where the family has one).
* :func:`head_direction` — what a head writes when it attends to a token: the token
  as the layer's attention reads it, through the head's OV circuit (``x @ W_V @ W_O``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from lmatlas.errors import EditError
from lmatlas.model.norms import block_norm_gain
from lmatlas.model.sites import check_layer, parse_head, parse_neuron

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def _last_token_streams(model: "Model", prompts: Sequence[str], site: str) -> torch.Tensor:
    """``[n, d_model]``: ``site`` at each prompt's last token (prompts run one at a time: no padding)."""
    rows = []
    for prompt in prompts:
        cache = model.run(prompt, capture=[site], stop_after=int(site.split(".")[0][1:]))
        rows.append(cache[site][0, -1].float())
    return torch.stack(rows)


def steering_vector(
    model: "Model", positive: Sequence[str], negative: Sequence[str], layer: int, site: str = "resid.post"
) -> torch.Tensor:
    """``[d_model]`` float32: mean of ``L{layer}.{site}`` at the last token over ``positive`` minus over ``negative``.

    Apply it with ``Add(f"L{layer}.{site}", vector, alpha)``.
    """
    if isinstance(positive, str) or isinstance(negative, str) or not positive or not negative:
        raise EditError(
            "steering_vector needs non-empty lists of positive and negative prompts "
            "(lists of strings, e.g. positive=['I love this'], negative=['I hate this'])."
        )
    name = f"L{check_layer(int(layer), model.layout)}.{site}"
    with torch.no_grad():
        return _last_token_streams(model, positive, name).mean(0) - _last_token_streams(model, negative, name).mean(0)


def neuron_direction(model: "Model", neuron: str) -> torch.Tensor:
    """``[d_model]`` float32: neuron ``"L12.N1031"``'s write direction (``W_out`` row x post-MLP gain)."""
    layer, index = parse_neuron(neuron, model.layout)
    row = model.W.W_out(layer)[index].detach().float()
    gain = block_norm_gain(model, layer, "mlp_post_norm")
    return row if gain is None else row * gain


def head_direction(model: "Model", head: str, token: str | int) -> torch.Tensor:
    """``[d_model]`` float32: head ``"L5.H3"``'s write when it attends fully to ``token`` (its OV image)."""
    from lmatlas.decode.heads import ov_left

    layer, index = parse_head(head, model.layout)
    if isinstance(token, str):
        ids = model.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise EditError(f"{token!r} is {len(ids)} tokens ({ids}): head_direction needs one token.")
        token = ids[0]
    values = ov_left(model, layer, index, torch.tensor([int(token)]))  # [1, d_head]
    write = values @ model.W.W_O(layer)[index].detach().float()
    gain = block_norm_gain(model, layer, "attn_post_norm")
    return (write if gain is None else write * gain)[0]
