"""Acceptance profile (early exit, skipped layers), implied speed-up, strategies by name, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from support.models import get_tiny
from typer.testing import CliRunner

import lmatlas
from lmatlas.cli import app
from lmatlas.errors import LmatlasError
from lmatlas.infer.decoding.acceptance import acceptance_profile, implied_speedup
from lmatlas.infer.decoding.strategies import DeCoRe, Speculative
from lmatlas.model.norms import final_norm


def test_implied_speedup_by_hand():
    # a = 0.5, k = 1: E = 1 + 0.5 = 1.5 tokens for 1 + 0.5 forwards -> 1.0; k = 2: 1.75 / 2 = 0.875
    speedup, k = implied_speedup(0.5, 0.5, max_draft=2)
    assert k == 1 and speedup == pytest.approx(1.0)
    assert implied_speedup(0.3, 0.9, max_draft=3) == pytest.approx(((1 + 0.3) / 1.9, 1))  # a slowdown
    speedup, k = implied_speedup(0.9, 0.1, max_draft=8)
    expected = max((1 - 0.9 ** (j + 1)) / 0.1 / (1 + 0.1 * j) for j in range(1, 9))
    assert speedup == pytest.approx(expected)


def test_profile_matches_an_independent_computation():
    model = get_tiny("llama")
    n = model.layout.n_layers
    prompt = "abc abd abc"
    profile = acceptance_profile(model, [prompt], new_tokens=12, skip_sets={"last": [n - 1]})
    ids = model.tokenize(prompt)["input_ids"]
    with torch.no_grad():
        seq = model.hf.generate(input_ids=ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
        cache = model.run(seq, capture=[f"L{l}.resid.pre" for l in range(1, n)])
        span = slice(ids.shape[1] - 1, seq.shape[1] - 1)
        final = cache.logits[0, span].argmax(-1)
        for row in profile["early_exit"]:
            h = final_norm(model)(cache[f"L{row['layer']}.resid.pre"][0, span])
            exit_ids = (h @ model.hf.lm_head.weight.T).argmax(-1)
            assert row["agreement"] == pytest.approx(float((exit_ids == final).float().mean()))
        # skipping the last block == reading the stream entering it (independent: a hook that bypasses it)
        block = model.hf.model.layers[n - 1]
        handle = block.register_forward_hook(lambda mod, args, out: args[0])
        try:
            skipped = model.hf(input_ids=seq, use_cache=False).logits[0, span].argmax(-1)
        finally:
            handle.remove()
    assert profile["skipped"][0]["agreement"] == pytest.approx(float((skipped == final).float().mean()))
    assert profile["positions"] == 12


@pytest.mark.parametrize("strategy", ["greedy", "dola", "decore", "speculative"])
def test_generate_with_strategy(strategy):
    model = get_tiny("llama")
    chosen = DeCoRe(heads=("L0.H0", "L1.H1")) if strategy == "decore" else strategy
    result = lmatlas.generate(model, "abc abc ab", 6, strategy=chosen)
    report = result.to_dict()
    assert report["strategy"] == strategy and report["new_tokens"] == len(report["token_ids"]) <= 6
    json.dumps(report)
    if strategy == "speculative":
        greedy = lmatlas.generate(model, "abc abc ab", 6)
        assert report["token_ids"] == greedy.token_ids and report["report"]["drafter"] == "prompt-lookup"


def test_generate_with_strategy_bad_input():
    model = get_tiny("llama")
    with pytest.raises(LmatlasError, match="Unknown strategy"):
        lmatlas.generate(model, "hi", strategy="beam")
    with pytest.raises(LmatlasError, match="draft at least one"):
        lmatlas.generate(model, "hi", strategy=Speculative(draft_len=0))
    with pytest.raises(LmatlasError, match="Unknown drafter"):
        lmatlas.generate(model, "hi", strategy=Speculative(drafter="medusa"))
    with pytest.raises(LmatlasError, match="at least one head"):
        lmatlas.generate(model, "hi", strategy=DeCoRe(heads=()))


def test_train_draft_heads_cli_bad_input():
    result = CliRunner().invoke(app, ["train-draft-heads", "--heads", "0", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["type"] == "InputError"
