"""The real packaged models: published sizes, both fidelity checks, sensible text and heads.

Marked ``slow`` (each GGUF takes 15-45 s to load on 2 cores); they run in CI too.
"""

from __future__ import annotations

import pytest
import torch

import lmatlas

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is in the city of"


def test_smollm2_card_matches_the_published_config(smollm2):
    card = smollm2.card()
    assert (card["family"], card["layers"], card["query_heads"], card["kv_heads"]) == ("llama", 30, 9, 3)
    assert (card["neurons_per_layer"], card["vocab"], card["d_model"], card["d_head"]) == (1536, 49152, 576, 64)
    assert 134_000_000 < card["parameters"] < 136_000_000
    assert card["file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and len(card["file_sha256"]) == 64


def test_gemma3_card_matches_the_published_config(gemma3):
    card = gemma3.card()
    assert (card["family"], card["layers"], card["query_heads"], card["kv_heads"]) == ("gemma3", 18, 4, 1)
    assert card["vocab"] == 262144 and card["neurons_per_layer"] == 2048 and card["d_head"] == 256


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_fidelity_on_real_models(name, request):
    model = request.getfixturevalue(name)
    report = lmatlas.check(model, PROMPT)
    assert report.logits_exact and report.max_logit_diff == 0.0
    assert report.decomposition_rel_error < 1e-5, report
    assert report.passed


def test_smollm2_knows_paris(smollm2):
    assert "Paris" in smollm2.generate(PROMPT, max_new_tokens=6)


def test_gemma3_sliding_window_pattern_on_a_long_prompt(gemma3):
    """Gemma 3's local layers attend within 512 tokens: the captured pattern must honour it."""
    ids = torch.randint(10, 1000, (1, 600), generator=torch.Generator().manual_seed(0))
    local_layer = gemma3.hf.config.layer_types.index("sliding_attention")
    global_layer = gemma3.hf.config.layer_types.index("full_attention")
    cache = gemma3.run(ids, capture=[f"L{local_layer}.attn.pattern", f"L{global_layer}.attn.pattern"])
    local, full = cache.pattern(local_layer), cache.pattern(global_layer)
    window = gemma3.hf.config.sliding_window
    assert float(local[0, :, -1, : 600 - window].abs().max()) == 0.0  # beyond the window: nothing
    assert float(full[0, :, -1, : 600 - window].sum()) > 0.0  # the global layer sees it all
    assert torch.allclose(local.sum(-1), torch.ones(()), atol=1e-4)


def test_smollm2_has_previous_token_and_induction_behaviour(smollm2):
    """A published finding, measured through the hooks: on a repeated random sequence some head
    attends to the previous token and some head attends to the token after the earlier copy."""
    seq = torch.randint(1000, 10000, (1, 20), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([seq, seq], dim=1)
    cache = smollm2.run(ids, capture=["attn.pattern"])
    n = seq.shape[1]
    prev_scores, induction_scores = [], []
    for layer in range(smollm2.layout.n_layers):
        pattern = cache.pattern(layer)[0]  # [head, pos, key_pos]
        positions = torch.arange(n + 1, 2 * n)
        prev_scores.append(pattern[:, positions, positions - 1].mean(-1))
        induction_scores.append(pattern[:, positions, positions - n + 1].mean(-1))
    assert float(torch.stack(prev_scores).max()) > 0.5
    assert float(torch.stack(induction_scores).max()) > 0.3


def test_gqa_mapping_on_a_real_model(smollm2):
    cache = smollm2.run("Hello there", capture=["L3.attn.k"])
    for head in range(9):
        assert torch.equal(cache.k(3, head=head), cache["L3.attn.k"][:, :, head // 3])
