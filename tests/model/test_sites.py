"""The site grammar and the cache's typed accessors: parsing, shapes, and clear errors."""

from __future__ import annotations

import pytest
import torch

from lmatlas import SiteError
from lmatlas.model.sites import COMPONENTS, Site, parse_head, parse_neuron, parse_sites

PROMPT = "Hello, world!"


def test_parse_one_site(llama):
    assert parse_sites("L1.attn.z", llama.layout) == [Site(1, "attn.z")]
    assert str(Site(1, "attn.z")) == "L1.attn.z"


@pytest.mark.parametrize("name", ["attn.z", "L*.attn.z"])
def test_layerless_name_means_every_layer(llama, name):
    assert parse_sites(name, llama.layout) == [Site(0, "attn.z"), Site(1, "attn.z")]


def test_all_sites(llama):
    assert len(llama.sites()) == len(COMPONENTS) * llama.layout.n_layers


@pytest.mark.parametrize(
    "name, message",
    [
        ("L0.attn.zz", "Did you mean 'attn.z'"),
        ("L0.mlp.output", "Unknown site"),
        ("L7.attn.z", "Layer 7 is out of range.*layers 0..1"),
        ("layer3.attn.z", "Malformed site name"),
        ("L1", "Malformed site name"),
    ],
)
def test_bad_site_names(llama, name, message):
    with pytest.raises(SiteError, match=message):
        parse_sites(name, llama.layout)


def test_bad_site_name_in_trace_loses_nothing(llama):
    with pytest.raises(SiteError):
        llama.run(PROMPT, capture=["L0.attn.z", "L0.attn.nope"])
    assert all(not block._forward_pre_hooks and not block._forward_hooks for block in llama.blocks)


def test_heads_and_neurons(llama):
    assert parse_head("L1.H3", llama.layout) == (1, 3)
    assert parse_neuron("L0.N95", llama.layout) == (0, 95)
    with pytest.raises(SiteError, match="Head 4 is out of range.*4 query heads"):
        parse_head("L1.H4", llama.layout)
    with pytest.raises(SiteError, match="Neuron 96 is out of range.*96 neurons"):
        parse_neuron("L0.N96", llama.layout)
    with pytest.raises(SiteError, match="Layer 2 is out of range"):
        parse_head("L2.H0", llama.layout)
    with pytest.raises(SiteError, match="Malformed head"):
        parse_head("L1.3", llama.layout)


def test_shapes_of_every_site(tiny):
    lay = tiny.layout
    cache = tiny.run(PROMPT, capture=tiny.sites())
    batch, pos = cache.input_ids.shape
    expected = {
        "resid.pre": (batch, pos, lay.d_model),
        "resid.mid": (batch, pos, lay.d_model),
        "resid.post": (batch, pos, lay.d_model),
        "attn.q": (batch, pos, lay.n_heads, lay.d_head),
        "attn.k": (batch, pos, lay.n_kv_heads, lay.d_head),
        "attn.v": (batch, pos, lay.n_kv_heads, lay.d_head),
        "attn.pattern": (batch, lay.n_heads, pos, pos),
        "attn.z": (batch, pos, lay.n_heads, lay.d_head),
        "attn.out": (batch, pos, lay.n_heads, lay.d_model),
        "mlp.in": (batch, pos, lay.d_model),
        "mlp.act": (batch, pos, lay.d_mlp),
        "mlp.out": (batch, pos, lay.d_model),
    }
    assert set(expected) == set(COMPONENTS)
    for layer in range(lay.n_layers):
        for component, shape in expected.items():
            assert tuple(cache[f"L{layer}.{component}"].shape) == shape, component
    assert tuple(cache.logits.shape) == (batch, pos, lay.d_vocab)


def test_typed_accessors(llama):
    cache = llama.run(PROMPT, capture=llama.sites())
    lay = llama.layout
    assert torch.equal(cache.z(1, head=2), cache["L1.attn.z"][:, :, 2])
    assert torch.equal(cache.q(0, head=3), cache["L0.attn.q"][:, :, 3])
    for head in range(lay.n_heads):  # query head -> its KV group
        assert torch.equal(cache.k(1, head=head), cache["L1.attn.k"][:, :, head // lay.group_size])
        assert torch.equal(cache.v(1, head=head), cache["L1.attn.v"][:, :, head // lay.group_size])
    assert torch.equal(cache.pattern(0, head=1), cache["L0.attn.pattern"][:, 1])
    assert torch.equal(cache.neurons(1, neuron=7), cache["L1.mlp.act"][..., 7])
    assert torch.equal(cache.resid(0, "mid"), cache["L0.resid.mid"])
    assert torch.equal(cache.head_out(1), cache["L1.attn.out"])
    assert torch.equal(cache.mlp_out(1), cache["L1.mlp.out"])
    assert cache.sites[0].startswith("L0.") and len(cache) == len(llama.sites())
    # patterns are probabilities over keys, causal
    pattern = cache.pattern(1)
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    assert float(pattern.triu(diagonal=1).abs().max()) == 0.0


def test_accessor_errors(llama):
    cache = llama.run(PROMPT, capture=["L0.attn.z"])
    with pytest.raises(SiteError, match="'L0.mlp.act' was not captured.*capture="):
        cache.neurons(0)
    with pytest.raises(SiteError, match="Head 9 is out of range"):
        cache.z(0, head=9)
    with pytest.raises(SiteError, match="Layer 5 is out of range"):
        cache.z(5)
    with pytest.raises(SiteError, match="'pre', 'mid' or 'post'"):
        cache.resid(0, "middle")
