"""The one target grammar (lmatlas.model.targets), used by edits, patching and attribution alike."""

from __future__ import annotations

import pytest
import torch
from support.models import get_tiny

from lmatlas.edit import Ablate
from lmatlas.errors import SiteError
from lmatlas.model.sites import Site
from lmatlas.model.targets import parse_target


@pytest.fixture
def layout():
    return get_tiny("llama").layout  # 2 layers, 4 query heads, 2 KV heads, 96 neurons


@pytest.mark.parametrize(
    "text, site, index, axis",
    [
        ("L1.H3", "attn.z", 3, 2),
        ("L1.H3.q", "attn.q", 3, 2),
        ("L1.H3.out", "attn.out", 3, 2),
        ("L0.KV1.k", "attn.k", 1, 2),
        ("L0.KV1.v", "attn.v", 1, 2),
        ("L1.N95", "mlp.act", 95, -1),
        ("L1.resid.post", "resid.post", None, None),
    ],
)
def test_each_spelling_names_one_slice(layout, text, site, index, axis):
    target = parse_target(text + "@-1", layout)
    assert target.site == Site(int(text[1]), site) and target.index == index and target.axis == axis
    assert str(target.positions) == "-1"


def test_a_component_alone_names_every_layer(layout):
    target = parse_target("attn.z", layout)
    assert [s.layer for s in target.sites] == [0, 1] and target.kind == "site"
    with pytest.raises(SiteError, match="names 2 sites"):
        _ = target.site


@pytest.mark.parametrize(
    "text, message",
    [
        ("L1.H4", "0..3"),
        ("L1.KV2.k", "0..1"),
        ("L1.N96", "96 neurons"),
        ("L2.H0", "0..1"),
        ("L1.attn.q.H3", "'L1.H3.q'"),
        ("L1.attn.out.H3", "'L1.H3.out'"),
        ("L1.attn.z.H3", "'L1.H3'"),
        ("L1.H3.k", "L<layer>"),
    ],
)
def test_bad_targets_say_what_to_write(layout, text, message):
    with pytest.raises(SiteError) as error:
        parse_target(text, layout)
    assert message in str(error.value)


def test_select_takes_the_slice_an_edit_replaces():
    """Ablating L0.KV1.k zeroes exactly KV head 1's keys in the captured attn.k (and nothing else)."""
    model = get_tiny("llama")
    target = parse_target("L0.KV1.k", model.layout)
    plain = model.run("hello there", capture=["L0.attn.k"])["L0.attn.k"]
    edited = model.run("hello there", capture=["L0.attn.k"], replace=Ablate("L0.KV1.k"))["L0.attn.k"]
    assert torch.count_nonzero(target.select(edited)) == 0
    assert torch.equal(edited.select(2, 0), plain.select(2, 0)) and torch.count_nonzero(target.select(plain)) > 0
