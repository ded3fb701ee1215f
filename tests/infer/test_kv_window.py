"""One Window(sink, recent): the census's simulated windowed head equals the head-wise cache's.

The full-context detector (:mod:`lmatlas.census.detectors.streaming`) *simulates* a windowed
head by restricting its attention pattern; the head-wise KV cache *runs* one. For the same
:class:`~lmatlas.model.window.Window` both must give the same output. Checked on a tiny Llama
(GQA, 2 layers) three ways, each against an independent computation:

* layer 0 (whose input is the same with or without the cache): the cache's ``attn.z`` equals a
  plain-PyTorch masked softmax over the captured q/k/v written out with loops;
* the census's number (``output_change``: the sums of ``||out - out'||`` and ``||out|| + ||out'||``)
  equals those sums computed from the cache's layer-0 output;
* every layer: the model with every pattern replaced by the census's ``restrict_pattern`` gives
  the cache's logits.
"""

from __future__ import annotations

import pytest
import torch

from lmatlas.census.detectors.streaming import output_change, restrict_pattern
from lmatlas.infer import HeadwiseCache, choose
from lmatlas.model.hooks import HookSession
from lmatlas.model.sites import parse_sites
from lmatlas.model.tiny import tiny_model
from lmatlas.model.window import Window

WINDOWS = [Window(2, 6), Window(0, 5), Window(3, 1)]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (2, 30), generator=torch.Generator().manual_seed(4))


def _cache_run(model, ids, window: Window, capture: str):
    """``(logits, captured)`` of one prefill through a head-wise cache where every KV head is windowed."""
    cache = HeadwiseCache(model, choose.uniform(model, window.sink, window.recent))
    store: dict[str, torch.Tensor] = {}
    with torch.no_grad(), HookSession(model, capture=parse_sites(capture, model.layout), store=store):
        logits = model.hf(ids, past_key_values=cache, use_cache=True).logits
    return logits, store[capture]


def _by_hand(q, k, v, sink: int, recent: int) -> torch.Tensor:
    """``[batch, pos, head, d]``: query i attends to keys j <= i with j < sink or i - j < recent (loops, float64)."""
    batch, pos, heads, d = q.shape
    group = heads // k.shape[2]
    out = torch.zeros(batch, pos, heads, v.shape[-1], dtype=torch.float64)
    for h in range(heads):
        for i in range(pos):
            seen = [j for j in range(i + 1) if j < sink or i - j < recent]
            scores = torch.stack([(q[:, i, h] * k[:, j, h // group]).sum(-1) for j in seen], -1) * d**-0.5
            probs = torch.softmax(scores.double(), -1)
            out[:, i, h] = sum(probs[:, n, None] * v[:, j, h // group].double() for n, j in enumerate(seen))
    return out


@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_the_cache_runs_the_window_written_out_by_hand(llama, ids, window):
    plain = llama.run(ids, capture=["L0.attn.q", "L0.attn.k", "L0.attn.v"])
    want = _by_hand(plain["L0.attn.q"], plain["L0.attn.k"], plain["L0.attn.v"], window.sink, window.recent)
    _, z = _cache_run(llama, ids, window, "L0.attn.z")
    torch.testing.assert_close(z.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_the_census_score_is_what_the_cache_changes(llama, ids, window):
    mask = torch.ones(ids.shape, dtype=torch.bool)
    diff, total = output_change(llama, ids, mask, n_sink=window.sink, window=window.recent, chunk=7)
    full_z = llama.run(ids, capture=["L0.attn.z"])["L0.attn.z"]
    _, cut_z = _cache_run(llama, ids, window, "L0.attn.z")
    W_O = llama.W.W_O(0).detach().float()  # [head, d_head, d_model]
    full = torch.einsum("bphd,hdm->bphm", full_z.float(), W_O)
    cut = torch.einsum("bphd,hdm->bphm", cut_z.float(), W_O)
    torch.testing.assert_close(diff[:, 0], (full - cut).norm(dim=-1).sum(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(total[:, 0], (full.norm(dim=-1) + cut.norm(dim=-1)).sum(1), rtol=1e-4, atol=1e-5)
    assert float(diff[:, 0].sum()) > 0  # the window really cuts something at 30 tokens


@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_every_layer_restricted_by_the_census_gives_the_cache_logits(llama, ids, window):
    def restrict(pattern, site):
        return restrict_pattern(pattern, window.sink, window.recent)

    replace = {f"L{layer}.attn.pattern": restrict for layer in range(llama.layout.n_layers)}
    simulated = llama.run(ids, replace=replace).logits
    cached, _ = _cache_run(llama, ids, window, "L0.attn.z")
    torch.testing.assert_close(cached, simulated, rtol=1e-4, atol=1e-5)
    one_more = Window(window.sink, window.recent + 1)  # the old off-by-one is told apart
    cached_wider, _ = _cache_run(llama, ids, one_more, "L0.attn.z")
    assert not torch.allclose(cached_wider, simulated, rtol=1e-4, atol=1e-5)


def test_a_window_is_checked_and_says_what_it_keeps():
    assert Window(2, 3).keeps(torch.tensor([5]), torch.arange(7)).tolist() == [
        [True, True, False, True, True, True, False]
    ]
    assert Window(2, 3).span == 5 and Window().describe() == {"sink": 4, "recent": 256}
    with pytest.raises(ValueError, match="sink window"):
        Window(4, 0)
    with pytest.raises(ValueError, match="sink must be"):
        Window(-1, 8)
    plan = choose.uniform(tiny_model("llama"), 3, 9)
    assert plan.window == Window(3, 9) and (plan.sink, plan.recent) == (3, 9)
