"""The trained fixture really has a previous-token head in layer 0 and induction heads in layer 1.

``tests/fixtures/induction_model`` is made by ``scripts/train_synthetic_heads.py``: a
two-layer Llama trained on repeated random character sequences (see its docstring for
why the heads form). These tests re-measure the heads with plain lmatlas traces on
sequences built here from text (their own seed and layout, no noise prefix), against a
null battery where nothing repeats, and check causally that the previous-token head
is what makes copying work.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import lmatlas

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "induction_model"
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?'-:"  # the fixture's 60 content tokens
PREVIOUS_TOKEN_HEAD = (0, 1)  # L0.H1
INDUCTION_HEAD = (1, 2)  # L1.H2, the strongest; every layer-1 head does induction here
L = 16  # block length: <bos> A A (33 tokens)
N = 64


@pytest.fixture(scope="module")
def model() -> lmatlas.Model:
    return lmatlas.load(FIXTURE)


def _texts(seed: int, repeat: bool) -> list[str]:
    """``N`` strings ``A + A`` (``repeat``) or ``A + B`` with ``B`` fresh: ``L`` distinct characters each."""
    rng = random.Random(seed)
    texts = []
    for _ in range(N):
        first = "".join(rng.sample(CHARS, L))
        texts.append(first + (first if repeat else "".join(rng.sample(CHARS, L))))
    return texts


def _patterns(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([layer, batch, head, pos, key_pos] float32 patterns, logits)``."""
    cache = model.run(ids, capture=["attn.pattern"])
    patterns = torch.stack([cache.pattern(layer) for layer in range(model.layout.n_layers)]).float()
    return patterns, cache.logits


def _ids(model, texts: list[str]) -> torch.Tensor:
    ids = model.tokenizer(texts, return_tensors="pt")["input_ids"]
    assert ids.shape == (N, 1 + 2 * L)  # <bos> + characters, no padding
    return ids


def _previous_scores(patterns: torch.Tensor) -> torch.Tensor:
    """``[layer, head]`` mean of ``pattern[i, i-1]``."""
    return patterns.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, 3))


def _induction_scores(patterns: torch.Tensor) -> torch.Tensor:
    """``[layer, head]`` mean attention from second-copy position ``1+L+j`` to ``2+j`` (first copy's ``a(j+1)``)."""
    queries = torch.arange(1 + L, 1 + 2 * L)
    return patterns[..., queries, queries - L + 1].mean(dim=(1, 3))


def _copy_accuracy(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Greedy next-token accuracy inside the second copy (``a(j+1)`` predicted at ``aj``, ``j < L-1``)."""
    positions = torch.arange(1 + L, 2 * L)
    return float((logits[:, positions].argmax(-1) == ids[:, positions + 1]).float().mean())


def test_loads_with_its_tokenizer(model):
    assert model.family == "llama" and model.layout.n_layers == 2 and model.layout.n_heads == 4
    assert model.layout.d_vocab == 64 and model.provenance.file.endswith("model.safetensors")
    encoded = model.tokenizer("The cat.")["input_ids"]
    assert encoded == [model.tokenizer.bos_token_id] + [CHARS.index(ch) for ch in "The cat."]
    assert model.tokenizer.decode(encoded, skip_special_tokens=True) == "The cat."
    assert model.generate("abcdefgh abcd", max_new_tokens=4) == "efgh"  # it copies, via the tokenizer


def test_lmatlas_check_passes(model):
    report = lmatlas.check(model)
    assert report.passed, report.to_dict()


def test_layer0_has_a_previous_token_head(model):
    scores = _previous_scores(_patterns(model, _ids(model, _texts(7, repeat=True)))[0])
    layer, head = PREVIOUS_TOKEN_HEAD
    assert scores[layer, head] > 0.9
    others = scores.clone()
    others[layer, head] = 0
    assert others.max() < 0.2, scores  # one previous-token head in the whole model
    null = _previous_scores(_patterns(model, _ids(model, _texts(8, repeat=False)))[0])
    assert null[layer, head] > 0.9  # positional: it does not need repeated tokens


def test_layer1_has_induction_heads(model):
    repeated = _induction_scores(_patterns(model, _ids(model, _texts(9, repeat=True)))[0])
    null = _induction_scores(_patterns(model, _ids(model, _texts(10, repeat=False)))[0])
    layer, head = INDUCTION_HEAD
    assert repeated[layer, head] > 0.85 and int(repeated[layer].argmax()) == head
    assert (repeated[1] > 0.5).all() and (repeated[0] < 0.1).all(), repeated
    assert (null[1] < 0.1).all(), null  # the same offset, nothing repeated: no induction attention


def test_copying_needs_the_previous_token_head(model):
    """Causal check: the model copies the second half, and zeroing L0.H1 (K-composition's input) breaks it."""
    ids = _ids(model, _texts(11, repeat=True))
    layer, head = PREVIOUS_TOKEN_HEAD

    def silence(z, site):
        z = z.clone()
        z[:, :, head] = 0
        return z

    clean, ablated = model.run(ids), model.run(ids, replace={f"L{layer}.attn.z": silence})
    assert _copy_accuracy(clean.logits, ids) > 0.95
    assert _copy_accuracy(ablated.logits, ids) < 0.5


def test_heads_json_names_the_same_heads():
    report = json.loads((FIXTURE / "heads.json").read_text())
    assert report["previous_token_head"]["head"] == "L{}.H{}".format(*PREVIOUS_TOKEN_HEAD)
    assert report["induction_head"]["head"] == "L{}.H{}".format(*INDUCTION_HEAD)
    assert report["previous_token_heads"] == ["L0.H1"]
    assert report["induction_heads"] == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    assert sum(f.stat().st_size for f in FIXTURE.iterdir()) < 2 * 2**20


def test_streaming_stats_see_the_same_heads(model):
    """``attention_stats`` (chunked, no full pattern) gives the same head scores as the traced patterns."""
    from lmatlas.census.streaming import attention_stats

    ids = _ids(model, _texts(12, repeat=True))
    targets = torch.full_like(ids, -1)
    queries = torch.arange(1 + L, 1 + 2 * L)
    targets[:, queries] = queries - L + 1  # the first copy's a(j+1): where an induction head looks
    stats = attention_stats(model, ids, targets=targets, chunk=5)
    patterns = _patterns(model, ids)[0]
    torch.testing.assert_close(stats.previous[..., 1:].mean(dim=(1, 3)), _previous_scores(patterns), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        stats.target[..., queries].mean(dim=(1, 3)), _induction_scores(patterns), atol=1e-5, rtol=0
    )
    assert stats.previous[0, :, PREVIOUS_TOKEN_HEAD[1], 1:].mean() > 0.9
