"""Streaming attention statistics checked against reductions of the full captured pattern.

The reference for every statistic is computed here, independently of
``lmatlas.census.streaming``: from the whole ``attn.pattern`` captured by
``model.trace`` (``[batch, head, pos, key_pos]`` per layer), with different
operations (diagonals, ``xlogy``, one-hot targets) than the chunked code uses.
"""

from __future__ import annotations

import pytest
import torch
from support.models import TINY_TYPES, get_tiny

from lmatlas import SiteError
from lmatlas.census.streaming import AttentionStats, AttentionStatsError, StreamingStatsProbe, attention_stats
from lmatlas.model.attention import AttentionCall
from lmatlas.model.hooks import HookSession

T = 40
WINDOW = 5
ATOL = 2e-6


def _ids(seed: int = 0, batch: int = 2, pos: int = T) -> torch.Tensor:
    return torch.randint(0, 256, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _targets(batch: int = 2, pos: int = T) -> torch.Tensor:
    """Past keys, the query itself, future keys (mass 0), key 0 and ``-1`` (no target)."""
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, pos, (batch, pos), generator=gen)
    targets[:, ::7] = -1
    targets[:, 3::11] = 0
    return targets


def _full_patterns(model, ids) -> torch.Tensor:
    """``[layer, batch, head, pos, key_pos]`` float32 from an ordinary lmatlas trace."""
    cache = model.run(ids, capture=["attn.pattern"])
    return torch.stack([cache.pattern(layer) for layer in range(model.layout.n_layers)]).float()


def _shifted_diagonal(pattern: torch.Tensor, back: int) -> torch.Tensor:
    """``out[..., p] = pattern[..., p, p - back]`` (0.0 where ``p - back < 0``)."""
    diagonal = pattern.diagonal(offset=-back, dim1=-2, dim2=-1)
    return torch.nn.functional.pad(diagonal, (back, 0)) if back else diagonal


def _reference(pattern: torch.Tensor, targets: torch.Tensor | None, window: int) -> dict[str, torch.Tensor]:
    """Every statistic, reduced from the full ``[layer, batch, head, pos, key_pos]`` pattern."""
    pos = pattern.shape[-1]
    ref = {
        "sink": pattern[..., 0],
        "previous": _shifted_diagonal(pattern, 1),
        "local": sum(_shifted_diagonal(pattern, back) for back in range(min(window, pos))),
        "entropy": -torch.xlogy(pattern, pattern).sum(-1),
        "top1_mass": pattern.amax(-1),
    }
    if targets is not None:
        one_hot = torch.nn.functional.one_hot(targets.clamp_min(0), pos).float() * (targets >= 0)[..., None]
        ref["target"] = (pattern * one_hot[None, :, None]).sum(-1)  # one_hot: [batch, pos, key_pos]
    return ref


def _assert_matches(stats: AttentionStats, pattern: torch.Tensor, targets: torch.Tensor | None, window: int):
    for name, expected in _reference(pattern, targets, window).items():
        got = getattr(stats, name)
        assert got.shape == expected.shape and got.dtype == torch.float32, name
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    # top1: the argmax where it is unambiguous; everywhere, the mass at the chosen key is the maximum.
    assert stats.top1.dtype == torch.int64
    at_top1 = pattern.gather(-1, stats.top1[..., None]).squeeze(-1)
    torch.testing.assert_close(at_top1, pattern.amax(-1), atol=ATOL, rtol=0)
    best_two = pattern.topk(2, dim=-1).values
    clear = (best_two[..., 0] - best_two[..., 1]) > 1e-5
    assert torch.equal(stats.top1[clear], pattern.argmax(-1)[clear])


@pytest.mark.parametrize("chunk", [7, 8, 64], ids=["chunk7-not-dividing", "chunk8-dividing", "chunk64-one-block"])
@pytest.mark.parametrize("family", TINY_TYPES)
def test_stats_equal_reductions_of_the_full_pattern(family, chunk):
    model = get_tiny(family)
    ids, targets = _ids(), _targets()
    stats = attention_stats(model, ids, targets=targets, local_window=WINDOW, chunk=chunk)
    assert stats.layers == list(range(model.layout.n_layers))
    assert stats.sink.shape == (model.layout.n_layers, 2, model.layout.n_heads, T)
    _assert_matches(stats, _full_patterns(model, ids), targets, WINDOW)


@pytest.mark.parametrize("family", TINY_TYPES)
def test_computing_stats_leaves_logits_bit_identical(family):
    """A full forward carrying the streaming probe on every layer gives the plain forward's logits."""
    model = get_tiny(family)
    ids = _ids(2)
    plain = model.forward(ids)
    n_layers = model.layout.n_layers
    stats = AttentionStats.empty(list(range(n_layers)), 2, model.layout.n_heads, T, model.device, with_target=False)
    probes = {layer: StreamingStatsProbe(stats, layer, WINDOW, chunk=9) for layer in range(n_layers)}
    with HookSession(model, probes=probes):
        probed = model.forward(ids)
    assert model.hf.config._attn_implementation.startswith("sdpa") or family == "gemma2"
    assert torch.equal(plain, probed)
    assert all(probe.calls == 1 for probe in probes.values())
    _assert_matches(stats, _full_patterns(model, ids), None, WINDOW)


def test_layer_subset_stops_the_forward_early():
    model = get_tiny("qwen3")
    ids = _ids(3, batch=1)
    ran = []
    handle = model.blocks[1].register_forward_pre_hook(lambda module, args: ran.append(1))
    try:
        stats = attention_stats(model, ids[0], layers=[0], chunk=16)  # a [pos] input counts as batch 1
    finally:
        handle.remove()
    assert ran == [] and stats.layers == [0] and stats.sink.shape == (1, 1, model.layout.n_heads, T)
    assert stats.target is None
    # the early stop left nothing behind: no hooks, no probes, the fast attention path restored
    assert model.hf.config._attn_implementation == "sdpa"
    assert all(not m._forward_hooks and getattr(m, "_lmatlas_probe", None) is None for m in model.hf.modules())
    full = attention_stats(model, ids, chunk=16)
    torch.testing.assert_close(stats.entropy[0], full.entropy[full.index(0)])


def test_no_full_pattern_is_ever_built(monkeypatch):
    """Every block of probabilities has at most ``chunk`` rows and, causally, only the keys its rows can see."""
    model = get_tiny("llama")
    shapes = []
    real_scores = AttentionCall.scores

    def recording(self, rows=None, keys=None):
        out = real_scores(self, rows, keys)
        shapes.append((rows.stop, tuple(out.shape)))
        return out

    monkeypatch.setattr(AttentionCall, "scores", recording)
    monkeypatch.setattr(AttentionCall, "pattern", lambda self: pytest.fail("the full pattern was computed"))
    attention_stats(model, _ids(4), chunk=6)
    assert shapes and all(shape[2] <= 6 and shape[3] == stop for stop, shape in shapes)


def test_sliding_window_layers_only_read_their_window(monkeypatch):
    """Gemma 3's sliding layer (window 4) reduces over ``window + chunk`` keys, not all of them."""
    model = get_tiny("gemma3_text")
    widths = []
    real_visible = AttentionCall.visible_keys

    def recording(self, rows=None):
        keys = real_visible(self, rows)
        widths.append((self.module.layer_idx, keys.stop - keys.start))
        return keys

    monkeypatch.setattr(AttentionCall, "visible_keys", recording)
    attention_stats(model, _ids(5), chunk=8)
    assert max(w for layer, w in widths if layer == 0) <= 4 + 8 - 1
    assert max(w for layer, w in widths if layer == 1) == T


def test_stats_probe_chains_with_site_probes():
    """Stats and site probes on one layer: the stats see the *replaced* queries the model uses."""
    model = get_tiny("mistral")
    ids = _ids(6)
    stats = AttentionStats.empty([1], 2, model.layout.n_heads, T, model.device, with_target=False)
    probe = StreamingStatsProbe(stats, 0, WINDOW, chunk=11)
    session = HookSession(
        model,
        capture=[model.sites("L1.attn.pattern")[0]],
        replace={model.sites("L1.attn.q")[0]: lambda q, site: q * 3.0},
        probes={1: probe},
    )
    with session:
        model.forward(ids)
    pattern = session.store["L1.attn.pattern"].float()[None]
    _assert_matches(stats, pattern, None, WINDOW)
    assert not torch.allclose(pattern, _full_patterns(model, ids)[1:2])  # the replacement did change it


def test_bad_arguments_say_what_to_do():
    model = get_tiny("llama")
    ids = _ids(7)
    with pytest.raises(AttentionStatsError, match="targets must be integer key positions shaped like"):
        attention_stats(model, ids, targets=torch.zeros(2, T - 1, dtype=torch.long))
    with pytest.raises(AttentionStatsError, match="must be < 40"):
        attention_stats(model, ids, targets=torch.full((2, T), T))
    with pytest.raises(AttentionStatsError, match="chunk and local_window must be >= 1"):
        attention_stats(model, ids, chunk=0)
    with pytest.raises(AttentionStatsError, match="integer token ids"):
        attention_stats(model, ids.float())
    with pytest.raises(AttentionStatsError, match="vocabulary"):
        attention_stats(model, ids + 1000)
    with pytest.raises(SiteError, match="this model has layers 0..1"):
        attention_stats(model, ids, layers=[2])
    with pytest.raises(SiteError, match="this model has layers 0..1"):
        HookSession(model, probes={5: StreamingStatsProbe(None, 0, WINDOW, chunk=4)})
    stats = attention_stats(model, ids, layers=1)
    with pytest.raises(AttentionStatsError, match="hold layers \\[1\\]"):
        stats.index(0)


class _Attention(torch.nn.Module):
    is_causal = True


def _masks() -> dict[str, torch.Tensor]:
    """``[batch=2, 1, T, T]`` masks: causal, with batch 1 left-padded by 3 (its rows 0-2 see nothing)."""
    allowed = torch.ones(T, T, dtype=torch.bool).tril().repeat(2, 1, 1, 1)
    allowed[1, :, :, :3] = False
    floor = torch.finfo(torch.float32).min
    return {
        "bool": allowed,
        "additive": torch.where(allowed, 0.0, floor),
        "additive-inf": torch.where(allowed, 0.0, float("-inf")),
    }


@pytest.mark.parametrize("kind", ["bool", "additive", "additive-inf"])
def test_padded_masks_and_fully_masked_rows(kind):
    """Batch-dependent masks, rows that see no key at all, and ``-inf`` in an additive mask, without a model."""
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, T, 16, generator=gen)
    key = torch.randn(2, 2, T, 16, generator=gen)  # GQA: two query heads per KV head
    mask = _masks()[kind]
    call = AttentionCall(_Attention(), query, key, key, mask, scaling=0.25, softcap=30.0)
    stats = AttentionStats.empty([0], 2, 4, T, query.device, with_target=True)
    targets = _targets()
    StreamingStatsProbe(stats, 0, WINDOW, chunk=6, targets=targets).on_call(call)
    pattern = call.pattern()[None].float()  # [layer=1, batch, head, pos, key_pos]
    if kind == "additive-inf":  # softmax over only -inf is NaN; the streaming code treats such rows as uniform
        nan_rows = pattern.isnan().any(-1)
        assert nan_rows[0, 1, :, :3].all() and nan_rows.sum() == 4 * 3
        pattern = torch.where(nan_rows[..., None], 1.0 / T, pattern)
    _assert_matches(stats, pattern, targets, WINDOW)
    assert torch.allclose(stats.entropy[0, 1, :, :3], torch.tensor(T, dtype=torch.float32).log())  # uniform rows


def _asked(pos: int = T) -> torch.Tensor:
    """Scattered asked queries: a gap inside a chunk, a lone row, a chunk with none, the last row."""
    asked = torch.zeros(pos, dtype=torch.bool)
    asked[[2, 5, 6, 13, 21, 22, 23, pos - 1]] = True
    return asked


def _same_on_asked_rows(some: AttentionStats, full: AttentionStats, asked: torch.Tensor) -> None:
    for name in ("sink", "previous", "local", "entropy", "top1", "top1_mass", "target"):
        a, b = getattr(some, name), getattr(full, name)
        assert torch.equal(a[..., asked], b[..., asked]), name  # bit for bit
        assert (a[..., ~asked] == 0).all(), name


@pytest.mark.parametrize("family", TINY_TYPES)
def test_asked_queries_equal_the_full_computation_bit_for_bit(family):
    """Only the asked rows' span of logits is computed: the numbers are those of every row computed."""
    model = get_tiny(family)
    ids, targets, asked = _ids(), _targets(), _asked()
    full = attention_stats(model, ids, targets=targets, local_window=WINDOW, chunk=8)
    some = attention_stats(model, ids, targets=targets, local_window=WINDOW, chunk=8, queries=asked)
    _same_on_asked_rows(some, full, asked)


@pytest.mark.parametrize("kind", ["bool", "additive", "additive-inf"])
def test_asked_queries_under_padded_masks_bit_for_bit(kind):
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(2, 4, T, 16, generator=gen)
    key = torch.randn(2, 2, T, 16, generator=gen)
    call = AttentionCall(_Attention(), query, key, key, _masks()[kind], scaling=0.25, softcap=30.0)
    asked, targets = _asked(), _targets()
    full = AttentionStats.empty([0], 2, 4, T, query.device, with_target=True)
    some = AttentionStats.empty([0], 2, 4, T, query.device, with_target=True)
    StreamingStatsProbe(full, 0, WINDOW, chunk=6, targets=targets).on_call(call)
    StreamingStatsProbe(some, 0, WINDOW, chunk=6, targets=targets, queries=asked).on_call(call)
    _same_on_asked_rows(some, full, asked)


@pytest.mark.slow
def test_real_gemma3_across_its_sliding_window(gemma3):
    """Gemma 3 270M (sliding window 512 on five of six layers, MQA): 700 tokens, chunk 256."""
    pos = 700
    assert gemma3.hf.config.sliding_window < pos
    ids = torch.randint(1000, gemma3.layout.d_vocab, (1, pos), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(-1, pos, (1, pos), generator=torch.Generator().manual_seed(1))
    layers = [0, 5]  # sliding, full
    stats = attention_stats(gemma3, ids, targets=targets, chunk=256, layers=layers)
    cache = gemma3.run(ids, capture=[f"L{layer}.attn.pattern" for layer in layers])
    pattern = torch.stack([cache.pattern(layer) for layer in layers]).float()
    _assert_matches(stats, pattern, targets, 8)
    assert stats.local.shape == (2, 1, gemma3.layout.n_heads, pos)
    assert (pattern[0, ..., 600, : 600 - 512] == 0).all()  # the window is real: layer 0 cannot see that far back
