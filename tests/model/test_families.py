"""Every supported family: the table is complete, and both fidelity checks pass on a tiny model."""

from __future__ import annotations

import pytest
import torch

import lmatlas
from lmatlas.model.arch import get_path
from lmatlas.model.families import ARCH_SPECS, supported_model_types
from lmatlas.model.tiny import TINY_CONFIGS

REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2", "gpt_neox", "phi3", "olmo2"}


def test_table_covers_required_families():
    assert REQUIRED <= set(ARCH_SPECS)


def test_every_model_type_has_a_tiny_config():
    assert set(supported_model_types()) == set(TINY_CONFIGS)


def test_every_path_in_the_spec_resolves(tiny):
    spec, block = tiny.spec, tiny.blocks[0]
    for name in ("embed", "layers", "final_norm", "unembed", "pos_embed"):
        if getattr(spec, name):
            assert isinstance(get_path(tiny.hf, getattr(spec, name)), torch.nn.Module)
    for name in (
        "attn",
        "q",
        "k",
        "v",
        "qkv",
        "o",
        "mlp",
        "mlp_in",
        "mlp_gate",
        "gate_up",
        "mlp_out",
        "attn_norm",
        "mlp_norm",
        "attn_post_norm",
        "mlp_post_norm",
    ):
        if getattr(spec, name):
            assert isinstance(get_path(block, getattr(spec, name)), torch.nn.Module), name


def test_layout_matches_config(tiny):
    lay = tiny.layout
    assert (lay.n_layers, lay.d_model, lay.d_mlp, lay.d_vocab) == (2, 64, 96, 260)
    assert lay.n_heads == 4 and lay.n_heads % lay.n_kv_heads == 0
    assert lay.d_head == 16


def test_fidelity(tiny):
    report = lmatlas.check(tiny)
    assert report.logits_exact, report
    assert report.max_logit_diff == 0.0
    assert report.decomposition_rel_error < 1e-5
    assert max(report.layer_rel_errors) < 1e-5
    assert report.passed
    report.raise_if_failed()


def test_fidelity_on_a_padded_batch(tiny):
    report = lmatlas.check(tiny, prompt=["Hi", "A longer prompt, so the first one is padded"])
    assert report.passed, report


def test_fidelity_on_token_ids(tiny):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    assert lmatlas.check(tiny, prompt=ids).passed


def test_a_broken_decomposition_is_reported(llama, monkeypatch):
    """The check is not vacuous: corrupting one head's write makes it fail and name the block."""
    from lmatlas.model import hook_stack

    real = hook_stack.HookStack.apply

    def corrupting_apply(self, site, value, where):
        new = real(self, site, value, where)
        if str(site) == "L1.attn.out":
            for session in self.capturers.get(site, ()):
                session.store[str(site)] = value.detach() * 1.01
        return new

    monkeypatch.setattr(hook_stack.HookStack, "apply", corrupting_apply)
    report = lmatlas.check(llama)
    assert report.logits_exact and not report.passed
    assert report.layer_rel_errors[1] > 1e-4 >= report.layer_rel_errors[0]
    with pytest.raises(lmatlas.FidelityError, match="worst block L1"):
        report.raise_if_failed()
