"""The pairs the exact pruned top-k rescores: the bfloat16 shortcut and the generic path against the float32
test applied by brute force to every member of every segment (no segment step, no int16 limits)."""

from __future__ import annotations

import pytest
import torch

from lmatlas.decode.fast_topk import SCORERS, _prepare_rows, _rho, build_index, pruned_topk
from lmatlas.decode.lowprec import ETA
from lmatlas.decode.survivors import _limit_bits, passes, survivors, survivors_bf16, tau_of


def heavy_tailed(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * (0.2 + torch.rand(n, 1, generator=gen) * 3)
    x[:, :2] *= 8
    return x


def block(seed: int, special: bool):
    """A block's bfloat16 scores ``[nb, w, M]``, its index, bounds and ρ (specials: NaN, ±inf, -0.0, a zero row)."""
    scorer = SCORERS["bf16"]
    a, u = heavy_tailed(24, 48, seed), heavy_tailed(1500, 48, seed + 1)
    a[3] = 0  # a zero row: τ <= 0, nothing can be ruled out
    index = build_index(u, scorer, 8)
    rows = _prepare_rows(a, scorer)
    raw = scorer.matmul(rows.lp, index.lp)
    raw_view = raw.view(a.shape[0], index.w, index.M)
    if special:
        gen = torch.Generator().manual_seed(seed + 2)
        flat = raw.view(-1)
        for value in (float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -float("nan")):
            flat[torch.randint(0, flat.numel(), (2,), generator=gen)] = value
        raw[5] = -raw[5].abs() - 1  # a row whose every segment is all negative
        raw_view[6, :, :3] = raw[6].nan_to_num().amax()  # exact ties at the top of a row
    seg_bound = rows.coef @ index.seg_norms + ETA
    rho = torch.tensor(_rho(scorer))
    return raw, raw_view, index, seg_bound, rho


def brute_force(raw_view, index, k, seg_bound, rho) -> set[tuple[int, int]]:
    """Every member whose float32 test passes, tested directly (τ from the segment maxima as the kernel takes it)."""
    key = raw_view.view(torch.int16).amax(1).view(torch.bfloat16).float()
    tau = tau_of(key, seg_bound, rho, k)
    ok = passes(raw_view.float(), seg_bound[:, None, :], rho, tau[:, :, None])  # [nb, w, M]
    n, i, j = ok.nonzero(as_tuple=True)
    return set(zip(n.tolist(), (i * index.M + j).tolist()))


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("seed", [0, 10])
def test_bf16_survivors_are_the_generic_ones_and_the_brute_force_ones(seed, special):
    raw, raw_view, index, seg_bound, rho = block(seed, special)
    for k in (1, 8):
        want = brute_force(raw_view, index, k, seg_bound, rho)
        generic = survivors(raw_view, index, k, seg_bound, rho)
        fast = survivors_bf16(raw_view, index, k, seg_bound, seg_bound.amax(1), rho)
        for got in (generic, fast):
            pairs = list(zip(got[0].tolist(), got[1].tolist()))
            assert len(pairs) == len(set(pairs)) and set(pairs) == want
        assert 0 < len(want) < raw.numel() // 4  # the pruning prunes, and something survives
        flipped = raw.clone()  # the bottom side: the same scores with the sign bit flipped
        SCORERS["bf16"].negate_(flipped)
        view = flipped.view(raw_view.shape)
        got = survivors_bf16(view, index, k, seg_bound, seg_bound.amax(1), rho)
        assert set(zip(got[0].tolist(), got[1].tolist())) == brute_force(view, index, k, seg_bound, rho)


def test_limit_bits_never_rule_out_a_passing_value():
    """Every bfloat16 value below its limit pattern fails the float32 test (all 65,536 patterns, many τ, b)."""
    rho = torch.tensor(_rho(SCORERS["bf16"]))
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = x.view(torch.bfloat16).float()
    gen = torch.Generator().manual_seed(0)
    taus = torch.cat([torch.randn(40, generator=gen) * 10, torch.tensor([0.0, -0.0, 1e-30, 3e38, float("nan")])])
    for tau in taus:
        for b in (1e-30, 1e-3, float(tau.abs()) * 0.5, float(tau.abs()) * 0.999, 5.0):
            limit = _limit_bits(tau[None], torch.tensor([b]), rho)[0]
            below = x < limit
            assert not passes(values[below], torch.tensor(b), rho, tau).any()
            if tau > 0 and b < tau * 0.5:  # and the limit is tight: it rules out most of what fails
                fails = ~passes(values, torch.tensor(b), rho, tau) & (values >= 0)
                assert below[fails].float().mean() > 0.9


@pytest.mark.parametrize("seed", [1, 2])
def test_pruned_topk_bit_for_bit_with_and_without_the_bf16_shortcut(seed, monkeypatch):
    """The whole kernel with the shortcut and with the generic survivors: identical ids and logits, ties included."""
    import lmatlas.decode.fast_topk as fast_topk

    a, u = heavy_tailed(200, 64, seed), heavy_tailed(3000, 64, seed + 5)
    u[100:120] = u[7]  # identical token rows: exact ties
    a[10] = 0
    got = pruned_topk(a, u, 12, method="bf16", row_block=64)
    monkeypatch.setattr(
        fast_topk, "survivors_bf16", lambda view, index, k, sb, sb_max, rho: survivors(view, index, k, sb, rho)
    )
    ref = pruned_topk(a, u, 12, method="bf16", row_block=64)
    for side in ("top", "bottom"):
        g, r = getattr(got, side), getattr(ref, side)
        assert torch.equal(g.ids, r.ids)
        assert torch.equal(g.logits.view(torch.int32), r.logits.view(torch.int32))
    assert got.rescored == ref.rescored


@pytest.mark.parametrize("k", [3, 20])
def test_pools_narrowed_beside_a_wide_row_give_the_one_wide_pool_answer_ties_included(k):
    """``_topk_of_pairs`` with a row that keeps most of the vocabulary: the same ids and logits, in the same
    order, as one pool as wide as that row (ties everywhere: scores drawn from a few values, -0.0, NaN)."""
    from lmatlas.decode.fast_topk import PARTIAL_SORT, _pool_topk, _topk_of_pairs

    gen = torch.Generator().manual_seed(k)
    counts = torch.randint(0, 3 * k, (40,), generator=gen)
    counts[[5, 17]] = torch.tensor([PARTIAL_SORT * k + 7, 5000])  # two wide rows
    counts[8] = PARTIAL_SORT * k  # exactly at the edge
    counts[9] = 1  # shorter than k: pads in the answer
    row = torch.repeat_interleave(torch.arange(40), counts)
    tok = torch.cat([torch.randperm(6000, generator=gen)[:c].sort().values for c in counts.tolist()])
    choices = torch.tensor([1.5, 1.5, 0.25, 0.0, -0.0, -2.0, float("nan"), 3.0])
    score = choices[torch.randint(0, choices.numel(), (row.numel(),), generator=gen)]
    got = _topk_of_pairs(score, row, tok, 40, k)
    pos = torch.arange(row.numel()) - (torch.cumsum(counts, 0) - counts)[row]
    ref = _pool_topk(score, row, tok, pos, 40, int(counts.max()), k)  # one pool, as wide as the widest row
    assert torch.equal(got.ids, ref.ids)
    assert torch.equal(got.logits.view(torch.int32), ref.logits.view(torch.int32))
    narrow = _topk_of_pairs(score[row != 17], row[row != 17], tok[row != 17], 40, k)  # still one wide row
    assert torch.equal(narrow.ids[:17], ref.ids[:17]) and torch.equal(narrow.ids[18:], ref.ids[18:])


@pytest.mark.parametrize("k", [1, 5, 20])
def test_kth_largest_is_topk_then_amin(k):
    """The grouped k-th largest against ``topk(k).values.amin(1)`` over the whole row, bit for bit:
    ties, ±0, ±inf, NaN rows, a row of one value, and widths that take the plain path."""
    from lmatlas.decode.survivors import kth_largest

    gen = torch.Generator().manual_seed(k)
    for m in (1536, 200, 1000):  # grouped; too few groups (plain); not a multiple of the group (plain)
        x = torch.randn(64, m, generator=gen)
        x[1] = 0.5  # every value tied
        x[2, :700] = -0.0
        x[2, 700:] = 0.0
        x[3, 5] = float("nan")
        x[4, :3] = float("inf")
        x[5] = float("-inf")
        x[6, ::7] = 2.0  # many ties at the top
        x[7] = x[7].round()  # few distinct values
        got, ref = kth_largest(x, k), x.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(got.nan_to_num(), ref.nan_to_num())  # ±0 compare equal, as the tests that read τ do
