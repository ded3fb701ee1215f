"""What the feature-edge tests share: a float64 tiny Llama with a hand-built TopK dictionary attached, its
induction task and logit difference, and the pieces of their independent computations written by hand."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from lmatlas.causal import load_task, logit_diff
from lmatlas.model.tiny import tiny_model
from support.features import TinyTopK


@contextmanager
def dictionary_setup(site: str, seed: int, mode: str = "splice") -> Iterator[tuple]:
    """``(model, dictionary, task, metric)``: tiny float64 Llama (seed 1), an 8-latent TopK (k=3) dictionary
    seeded ``seed`` attached at ``site`` in ``mode`` (detached on exit), 2 induction pairs, their logit
    difference."""
    model = tiny_model("llama", seed=1, dtype=torch.float64)
    dictionary = TinyTopK(model.layout.d_model, 8, k=3, seed=seed).double()
    task = load_task(model, "induction", n=2)
    model.dictionaries.attach(dictionary, site, mode=mode)
    try:
        yield model, dictionary, task, logit_diff(task.answer, task.wrong)
    finally:
        model.dictionaries.detach(site)


def most_moved(dictionary, clean: torch.Tensor, corrupt: torch.Tensor) -> int:
    """The latent whose activation (summed over batch and positions) moves most between the dictionary's
    clean and corrupt inputs ``[B, P, d]``."""
    with torch.no_grad():
        return int((dictionary.encode(clean) - dictionary.encode(corrupt)).abs().sum((0, 1)).argmax())


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMS norm module ``norm`` applied to ``x`` by hand."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def logits_by_hand(model, stream: torch.Tensor) -> torch.Tensor:
    """``[B, P, V]`` logits of the last block's output ``stream``: the final norm and unembedding by hand."""
    return rms_norm(model.hf.model.norm, stream) @ model.hf.lm_head.weight.T.detach()


def score(graph, source: str, target: str) -> float:
    """The score of the edge ``source -> target`` of an edge graph."""
    return float(graph.scores[graph.sources.index(source), graph.targets.index(target)])


def assert_full_is_clean_and_empty_is_corrupt(runner, model, task, metric) -> None:
    """Every edge of ``runner``'s graph gives the clean run's metric, none the corrupt run's (which differ)."""
    values = runner.metric(torch.stack([runner.index.full(), torch.zeros_like(runner.index.allowed)]))
    clean = float(metric(model.forward(task.clean)).mean())
    corrupt = float(metric(model.forward(task.corrupt)).mean())
    assert float(values[0]) == pytest.approx(clean, abs=1e-9)
    assert float(values[1]) == pytest.approx(corrupt, abs=1e-9)
    assert abs(clean - corrupt) > 1e-3
