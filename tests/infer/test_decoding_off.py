"""DoLa and DeCoRe with the contrast off (no premature layer, no masked head) are greedy, token for token,
through Hugging Face's ``generate(custom_generate=...)`` on every tiny family and on SmolLM2."""

from __future__ import annotations

import pytest
import torch
from support.greedy import hf_greedy
from support.models import TINY_TYPES, get_tiny

from lmatlas.infer.decoding.decore import decore_generate
from lmatlas.infer.decoding.dola import dola_generate

#: name -> (the strategy's custom_generate keyword arguments with the contrast off, repetition penalties)
OFF = {
    "dola": (lambda model: {"custom_generate": dola_generate, "premature_layers": None}, (1.0, 1.2)),
    "decore": (
        lambda model: {"custom_generate": decore_generate, "lmatlas_model": model, "masked_heads": None},
        (1.0,),
    ),
}


@pytest.mark.parametrize("family", TINY_TYPES)
@pytest.mark.parametrize("strategy", sorted(OFF))
def test_contrast_off_is_greedy(strategy, family):
    model = get_tiny(family)
    ids = model.tokenize("The cat sat on the mat. The cat")["input_ids"]
    off, penalties = OFF[strategy]
    for penalty in penalties:
        greedy = hf_greedy(model, ids, 12, repetition_penalty=penalty)
        assert torch.equal(greedy, hf_greedy(model, ids, 12, repetition_penalty=penalty, **off(model)))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(OFF))
def test_contrast_off_is_greedy_on_smollm2(smollm2, strategy):
    ids = smollm2.tokenize("Context: The capital of France is Lyon.\nQuestion: What is the capital of France?")
    off, _ = OFF[strategy]
    assert torch.equal(hf_greedy(smollm2, ids["input_ids"], 8), hf_greedy(smollm2, ids["input_ids"], 8, **off(smollm2)))
