"""The output side of a neuron: do the tokens it promotes by weights really rise when it is raised?

For neurons ``[n]`` of one layer, their promoted tokens (the top ``PROMOTED`` of the output
direction through the unembedding, :func:`lmatlas.decode.neurons.output_directions`) are
checked causally on held-out prompts ``[p, pos]``: one batched forward raises neuron ``i``
by ``delta[i]`` (its peak activation on the fit split) at every position of its own copy
of the prompts (a replacement function on ``L{layer}.mlp.act``; rows ``i * p .. i * p + p``
belong to neuron ``i``; the copies start at block ``layer`` from the clean stream, see
:func:`lmatlas.model.run_from`), and compares the log-probabilities with a clean forward:

    steering = mean over positions of [ Δlogp(promoted) - mean over r of Δlogp(random set r) ]

where ``Δlogp(S)`` is the mean change of log-probability over the tokens of ``S`` and the
``RANDOM_SETS`` random sets have the promoted set's size (uniform over the vocabulary).
Interval: 95% bootstrap over positions. Null: the 95th percentile over the random sets of
their own excess over the random mean (how far a set of that size rises by chance). The
neuron's promotion is **verified** when the interval's lower bound beats that null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmatlas.labels import scores

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

PROMOTED = 5
RANDOM_SETS = 64


@dataclass(frozen=True)
class Steering:
    """One neuron's output-side check (log-probabilities in nats)."""

    neuron: int
    promoted: list[int]
    delta: float
    steering: float
    lo: float
    hi: float
    null: float
    n: int
    verified: bool


def promoted_tokens(model: "Model", layer: int, neurons: list[int], k: int = PROMOTED) -> list[list[int]]:
    """The ``k`` tokens each neuron's output direction raises most (weights through the unembedding)."""
    from lmatlas.decode.neurons import output_directions
    from lmatlas.decode.vocab import project

    directions = output_directions(model, layer)[neurons]  # [n, d_model]
    return project(model, directions, norm="none").topk(k, dim=-1).indices.tolist()


@dataclass(frozen=True)
class Clean:
    """The unedited run of the steering prompts ``[p, pos]``, shared by every layer."""

    logprobs: torch.Tensor  # [p, pos, vocab] float32
    streams: list[torch.Tensor]  # per layer: the residual stream entering it, [p, pos, d_model]


def clean_run(model: "Model", prompts: torch.Tensor) -> Clean:
    """One unedited forward of ``prompts``: its log-probabilities and every block's input stream."""
    with torch.no_grad():
        cache = model.run(prompts, capture=["resid.pre"])
    streams = [cache[f"L{layer}.resid.pre"] for layer in range(model.layout.n_layers)]
    return Clean(cache.logits.float().log_softmax(-1), streams)


def clean_logprobs(model: "Model", prompts: torch.Tensor) -> torch.Tensor:
    """``[p, pos, vocab]`` float32 log-probabilities of the unedited model (shared by every layer)."""
    return clean_run(model, prompts).logprobs


def steering(
    model: "Model",
    layer: int,
    neurons: list[int],
    delta: torch.Tensor,
    prompts: torch.Tensor,
    seed: int = 0,
    clean: Clean | None = None,
) -> list[Steering]:
    """Raise each of ``neurons`` by ``delta [n]`` on ``prompts [p, pos]``; score its promoted tokens.

    ``clean``: :func:`clean_run` of ``prompts``, when already computed. The steered copies start
    at ``layer`` from the clean stream entering it (:func:`lmatlas.model.run_from`): blocks
    before ``layer`` are the same in every copy and run once, in the clean run.
    """
    from lmatlas.model import run_from

    if not neurons:
        return []
    promoted = promoted_tokens(model, layer, neurons)
    p, d_mlp = prompts.shape[0], model.layout.d_mlp
    added = torch.zeros(len(neurons) * p, 1, d_mlp)
    for i, (neuron, amount) in enumerate(zip(neurons, delta.tolist())):
        added[i * p : (i + 1) * p, 0, neuron] = amount

    def raise_neuron(value: torch.Tensor, ctx) -> torch.Tensor:
        return value + added.to(value.dtype)

    with torch.no_grad():
        clean = clean_run(model, prompts) if clean is None else clean
        stream = clean.streams[layer].repeat(len(neurons), 1, 1)  # [n * p, pos, d_model]
        edited = run_from(model, layer, stream, replace={f"L{layer}.mlp.act": raise_neuron})
        logprobs = edited.logits.float().log_softmax(-1)  # [n * p, pos, vocab]
    gen = torch.Generator().manual_seed(seed + layer)
    random_sets = torch.randint(model.layout.d_vocab, (RANDOM_SETS, PROMOTED), generator=gen)
    base = clean.logprobs.flatten(0, 1)  # [positions, vocab]
    out = []
    for i, neuron in enumerate(neurons):
        rows = logprobs[i * p : (i + 1) * p].flatten(0, 1)  # [positions, vocab]; the change: rows - base
        target = (rows[:, promoted[i]] - base[:, promoted[i]]).mean(-1)  # [positions]
        chance = (rows[:, random_sets] - base[:, random_sets]).mean(-1)  # [positions, sets]
        excess = target - chance.mean(-1)
        weight = scores.window_weights(excess.shape[0], scores.BOOTSTRAP, seed + neuron)
        lo, hi = scores.interval((weight @ excess[:, None]) / excess.shape[0])
        by_set = chance.mean(0)
        null = float((by_set - by_set.mean()).quantile(0.95))
        value = float(excess.mean())
        out.append(
            Steering(
                neuron,
                promoted[i],
                float(delta[i]),
                value,
                float(lo),
                float(hi),
                null,
                excess.shape[0],
                float(lo) > null,
            )
        )
    return out
