"""The corpus spellings shared by the units of a build: the rows equal those of a speller of their own.

:func:`lmatlas.labels.capture.speller` keeps the texts it decoded in ``Captured.spelled``, so the
second and later layers of a build decode nothing again. Their rows must equal the rows computed
with a fresh speller (an empty ``spelled``), and every text must equal
:func:`lmatlas.decode.token_text.token_texts` of the id alone.
"""

from __future__ import annotations

import dataclasses

import torch

from lmatlas.decode.token_text import token_texts
from lmatlas.labels.capture import capture, label_layer, speller
from lmatlas.model.handle import Model
from lmatlas.model.tiny import byte_tokenizer, tiny_hf_model


def test_rows_with_shared_spellings_equal_rows_with_a_fresh_speller():
    model = Model.from_hf(tiny_hf_model("llama", seed=1), byte_tokenizer(), source="tiny:spelling")
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(3, 120, (10, 24), generator=gen)
    data = capture(model, windows, seed=0)
    first = label_layer(model, data, 0, steer=1)
    assert data.spelled  # the first unit filled the shared texts
    shared = label_layer(model, data, 1, steer=1)
    fresh = label_layer(model, dataclasses.replace(data, spelled={}), 1, steer=1)
    assert shared == fresh and first == label_layer(model, dataclasses.replace(data, spelled={}), 0, steer=1)
    ids = sorted(data.spelled)
    assert [data.spelled[i] for i in ids] == token_texts(model.tokenizer, ids)
    spell = speller(model, windows[:1], data.spelled)
    assert spell([5, 119, 3]) == token_texts(model.tokenizer, [5, 119, 3])
