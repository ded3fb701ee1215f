"""Greedy generation through Hugging Face's ``generate`` (optionally a ``custom_generate`` strategy),
and a model whose forward must not run: what the decoding tests share."""

from __future__ import annotations

import pytest
import torch


def hf_greedy(model, ids: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    """``[batch, prompt + n]``: ``model.hf.generate`` greedy (pad 0), ``kwargs`` passed on (``custom_generate=...``)."""
    with torch.no_grad():
        return model.hf.generate(input_ids=ids, do_sample=False, max_new_tokens=n, pad_token_id=0, **kwargs)


def forbid_forward(monkeypatch: pytest.MonkeyPatch, model) -> None:
    """Make any forward of ``model`` fail: what follows must be refused before compute."""

    def boom(*args, **kwargs):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(model.hf, "forward", boom)
