"""Successor, copy-suppression, retrieval and streaming-split detectors, checked independently.

Each detector's numbers are re-derived here by a separate route:

* ordinals: a hand-written fake tokenizer whose single tokens are known;
* successor: the OV circuit as explicit full-vocabulary matrix products written out from
  the native Hugging Face parameters (not lmatlas's weight views), and a tiny model whose
  layer-1 head 2 was *set* to map each digit to the next one; the behavioural part from
  ``model.trace`` patterns and head outputs;
* copy suppression: the full ``[pos, key_pos]`` pattern from ``model.trace`` and the head's
  write projected through the *whole* unembedding;
* retrieval: the full pattern's argmax from ``model.trace`` versus the streaming statistics
  path; and the hand-built GPT-2 of ``test_census_handbuilt`` whose induction head must be
  the one and only retrieval head;
* streaming split: replacing ``L{l}.attn.pattern`` with the restricted pattern (built here
  by explicit loops) and reading ``L{l}.attn.z``; and a head set to attend uniformly, whose
  change is computed in closed form from the values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from support.models import get_tiny

from lmatlas.census.detectors.copy_suppression import CopySuppression, suppression_hits
from lmatlas.census.detectors.retrieval import RetrievalDetector, needle_battery
from lmatlas.census.detectors.streaming import StreamingSplit, output_change, restrict_pattern
from lmatlas.census.detectors.successor import (
    SuccessorDetector,
    effective_embedding,
    ov_logits,
    readout_matrix,
    successor_ov_scores,
)
from lmatlas.census.ordinals import NoOrdinalTokensError, ordinal_tokens
from lmatlas.census.registry import get_detector
from lmatlas.census.run import run_detector
from lmatlas.model.tiny import tiny_model


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# -- ordinals ---------------------------------------------------------------------------------------
class FakeTokenizer:
    """Single tokens: the words in ``vocab`` (with the exact spelling given); everything else splits in two."""

    def __init__(self, vocab: list[str]):
        self.ids = {word: i for i, word in enumerate(vocab)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.ids[text]] if text in self.ids else [900, 901]


def test_ordinals_keep_single_tokens_and_never_pair_across_a_gap():
    days = [" Monday", " Tuesday", " Thursday", " Friday", " Saturday", " Sunday"]  # no Wednesday
    tok = FakeTokenizer(days + ["1", "2", "3", "4", " 5"])
    seqs = ordinal_tokens(tok, ["weekdays", "digits"], min_pairs=2)
    week = seqs["weekdays"]
    assert week.space and week.items == tuple(days)
    ids = tok.ids
    expected = [
        (" Monday", " Tuesday"),
        (" Thursday", " Friday"),
        (" Friday", " Saturday"),
        (" Saturday", " Sunday"),
        (" Sunday", " Monday"),
    ]  # cyclic wrap; no Tuesday -> Thursday
    assert week.pairs() == [(ids[a], ids[b]) for a, b in expected]
    digits = seqs["digits"]  # bare spelling wins (3 pairs) over the spaced one (none)
    assert not digits.space and digits.pairs() == [(ids["1"], ids["2"]), (ids["2"], ids["3"]), (ids["3"], ids["4"])]
    with pytest.raises(NoOrdinalTokensError):
        ordinal_tokens(tok, ["months"])
    with pytest.raises(NoOrdinalTokensError, match="Unknown"):
        ordinal_tokens(tok, ["planets"])


def test_ordinals_on_the_byte_tokenizer():
    tok = get_tiny("llama").tokenizer
    seqs = ordinal_tokens(tok)
    assert set(seqs) == {"digits", "letters", "lowercase_letters"}
    assert [tok.decode([a]) + tok.decode([b]) for a, b in seqs["digits"].pairs()] == [f"{i}{i + 1}" for i in range(9)]


# -- successor ----------------------------------------------------------------------------------------
def _llama_ov_by_hand(hf, ids: torch.Tensor, layer: int, head: int, mlp0: bool) -> torch.Tensor:
    """``[n, d_vocab]`` full-vocabulary OV logits of one head, from the native parameters only."""
    cfg = hf.config
    d_head = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    eps = cfg.rms_norm_eps
    x = hf.model.embed_tokens.weight[ids]
    if mlp0:  # block 0 with its attention removed: x + MLP(post_attention_layernorm(x))
        b0 = hf.model.layers[0]
        h = rms(x, b0.post_attention_layernorm.weight, eps)
        x = x + b0.mlp.down_proj(torch.nn.functional.silu(b0.mlp.gate_proj(h)) * b0.mlp.up_proj(h))
    block = hf.model.layers[layer]
    xn = rms(x, block.input_layernorm.weight, eps)
    kv = head // group
    v = xn @ block.self_attn.v_proj.weight[kv * d_head : (kv + 1) * d_head].T
    out = v @ block.self_attn.o_proj.weight[:, head * d_head : (head + 1) * d_head].T
    return (out * hf.model.norm.weight) @ hf.lm_head.weight.T


@pytest.mark.parametrize("embedding", ["embed", "mlp0"])
def test_successor_ov_matches_full_matrix_products(embedding):
    model = get_tiny("llama")
    seqs = ordinal_tokens(model.tokenizer)
    totals, per_seq = successor_ov_scores(model, embedding=embedding, sequences=seqs)
    hits, count = torch.zeros(2, 4), 0
    with torch.no_grad():
        for name, seq in seqs.items():
            sources = torch.tensor([a for a, _ in seq.pairs()])
            targets = torch.tensor([b for _, b in seq.pairs()])
            cand = torch.tensor(seq.ids)
            ours = ov_logits(model, effective_embedding(model, sources, embedding), readout_matrix(model, cand))
            for layer in range(2):
                for head in range(4):
                    full = _llama_ov_by_hand(model.hf, sources, layer, head, embedding == "mlp0")
                    torch.testing.assert_close(ours[layer, head], full[:, cand], rtol=1e-4, atol=1e-5)
                    hit = cand[full[:, cand].argmax(-1)] == targets
                    hits[layer, head] += hit.sum()
                    assert per_seq[name][layer, head] == pytest.approx(hit.float().mean().item())
            count += len(targets)
    torch.testing.assert_close(totals, hits / count)


def _digit_successor_model():
    """A tiny Llama whose L1.H2 maps every digit to the next one (OV circuit set by hand)."""
    model = tiny_model("llama", seed=3)
    hf, tok = model.hf, model.tokenizer
    digits = [tok.encode(str(i), add_special_tokens=False)[0] for i in range(10)]
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    e, f = basis[:, :10].T, basis[:, 10:20].T  # token directions in, unembedding directions out
    with torch.no_grad():
        hf.model.embed_tokens.weight[digits] = 8 * e
        hf.lm_head.weight[digits] = f
        hf.model.norm.weight.fill_(1.0)
        block = hf.model.layers[1]
        block.input_layernorm.weight.fill_(1.0)
        v_rows = block.self_attn.v_proj.weight[16:32]  # KV head 1 (query heads 2 and 3)
        v_rows.zero_()
        v_rows[:10] = e  # value dim d reads digit d
        o_cols = block.self_attn.o_proj.weight[:, 32:48]  # query head 2
        o_cols.zero_()
        o_cols[:, :9] = f[1:].T  # value dim d writes digit d + 1
        hf.model.layers[0].mlp.down_proj.weight.zero_()  # MLP0 adds nothing: mlp0 == embed here
    return model, digits


def test_a_hand_built_successor_head_is_found():
    model, _ = _digit_successor_model()
    for embedding in ("embed", "mlp0"):
        _, per_seq = successor_ov_scores(model, embedding=embedding)
        assert per_seq["digits"][1, 2] == 1.0
        assert per_seq["digits"][1, 3] < 0.5  # same KV head, random W_O
    detector = SuccessorDetector(n_examples=12)
    battery = detector.battery(model, seed=0)
    parts = detector.subscores(model, battery)
    digit_rows = [i for i, name in enumerate(battery.meta["sequences"]) if name == "digits"]
    assert parts["ov"][digit_rows, 1, 2].min() == 1.0
    null = detector.battery(model, seed=0, null=True)
    ov, _, counted = detector.components(model, null)
    nine = model.tokenizer.encode("9", add_special_tokens=False)[0]  # has no successor: the head writes nothing
    digit_rows = torch.tensor([name == "digits" for name in null.meta["sequences"]])
    mapped = counted & digit_rows[:, None] & (null.meta["sources"] != nine)
    assert mapped.sum() > 20 and ov[mapped][:, 1, 2].max() == 0.0  # a shuffled partner is never the successor


def test_successor_behaviour_matches_trace():
    model = get_tiny("llama")
    detector = SuccessorDetector(n_examples=9, n_items=5)
    for null in (False, True):
        battery = detector.battery(model, seed=1, null=null)
        ov, behaviour, counted = detector.components(model, battery)
        ids, meta = battery.input_ids, battery.meta
        cache = model.run(ids, capture=["attn.pattern", "attn.out"])
        W_U = model.hf.lm_head.weight * model.hf.model.norm.weight  # [vocab, d_model] with the final gain
        for b in range(ids.shape[0]):
            cand = meta["candidates"][b][meta["candidates"][b] >= 0]
            for p in counted[b].nonzero().flatten().tolist():
                for layer in range(2):
                    for head in range(4):
                        top = cache.pattern(layer, head)[b, p].argmax()
                        logits = W_U[cand] @ cache.head_out(layer, head)[b, p]
                        want = top == meta["source_pos"][b, p] and cand[logits.argmax()] == meta["targets"][b, p]
                        assert behaviour[b, p, layer, head] == float(want)
        assert (behaviour[~counted] == 0).all() and (ov[~counted] == 0).all()
        if not null:  # targets are successors of the item before each ','
            succ = {a: s for seq in ordinal_tokens(model.tokenizer).values() for a, s in seq.pairs()}
            src, tgt = meta["sources"][counted], meta["targets"][counted]
            assert all(succ[int(a)] == int(t) for a, t in zip(src, tgt))
        else:
            succ = {a: s for seq in ordinal_tokens(model.tokenizer).values() for a, s in seq.pairs()}
            src, tgt = meta["sources"][counted], meta["targets"][counted]
            assert all(succ.get(int(a)) != int(t) and int(a) != int(t) for a, t in zip(src, tgt))


# -- copy suppression ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_copy_suppression_hits_match_full_pattern_and_full_vocabulary(family):
    model = get_tiny(family)
    detector = CopySuppression()
    battery = detector.battery(model, seed=0)
    half, prefix, compare = battery.meta["half"], battery.meta["prefix"], battery.meta["compare"]
    queries = torch.arange(prefix + half, prefix + 2 * half)
    ids = battery.input_ids[:4]
    ours = suppression_hits(model, ids, queries, compare[:4], prefix)
    cache = model.run(ids, capture=["attn.pattern", "attn.out"])
    hf = model.hf
    W_U = hf.lm_head.weight  # [vocab, d_model]

    def frozen_final_norm(delta):  # the final norm with its per-position scale frozen (dropped: it is positive)
        if family == "gpt2":
            return (delta - delta.mean(-1, keepdim=True)) * hf.transformer.ln_f.weight
        if family == "gemma2":
            return delta * (1.0 + hf.model.norm.weight)
        return delta * hf.model.norm.weight

    checked = 0
    for layer in range(model.layout.n_layers):
        for head in range(model.layout.n_heads):
            for b in range(ids.shape[0]):
                top = cache.pattern(layer, head)[b, queries].argmax(-1)  # [n_q]
                effect = frozen_final_norm(cache.head_out(layer, head)[b, queries]) @ W_U.T  # [n_q, vocab]
                for i, q in enumerate(queries.tolist()):
                    j = int(top[i])
                    own, others = effect[i, ids[b, j]], effect[i, compare[b]]
                    want = prefix <= j < q and bool(own < 0) and bool((own < others).all())
                    assert bool(ours[b, layer, head, i]) == want, (layer, head, b, q)
                    checked += want
    assert ours.sum() == checked


def test_copy_suppression_scores_shape_and_range():
    model = get_tiny("qwen3")
    detector = get_detector("copy_suppression")
    result = run_detector(model, detector, seed=2)
    assert result.score.shape == (2, 4) and 0 <= result.score.min() and result.score.max() <= 1
    assert result.battery["kind"] == "repeated" and result.null_battery["kind"] == "null"


# -- retrieval ------------------------------------------------------------------------------------------
def test_needle_battery_layout():
    model = get_tiny("llama")
    real = needle_battery(model, "retrieval", seed=4, n=4, length=96, needle=8)
    null = needle_battery(model, "retrieval", seed=4, n=4, length=96, needle=8, null=True)
    assert real.input_ids.shape == null.input_ids.shape == (4, 96)
    for battery in (real, null):
        ids, targets = battery.input_ids, battery.meta["targets"]
        for b in range(4):
            d = int(battery.meta["depth"][b])
            needle = ids[b, d : d + 8]
            before = torch.cat([ids[b, :d], ids[b, d + 8 : 88]])
            assert not torch.isin(needle, before).any()  # the haystack never holds a needle token
            steps = (targets[b] >= 0).nonzero().flatten()
            assert steps.tolist() == list(range(88, 95))  # the copy's first 7 tokens predict the next ones
            copied = ids[b, targets[b, steps]] == ids[b, steps + 1]
            assert copied.all() if battery is real else not copied.any()
    depths = real.meta["depth"].tolist()
    assert depths == sorted(depths) and len(set(depths)) == 4  # a depth sweep


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_neox"])
def test_retrieval_streaming_statistics_match_the_full_pattern(family):
    model = get_tiny(family)
    detector = RetrievalDetector(n_examples=3, length=80, needle=10, chunk=16, tokens_per_call=160)
    for null in (False, True):
        battery = detector.battery(model, seed=1, null=null)
        scores, mass = detector.score(model, battery), detector.subscores(model, battery)["needle_mass"]
        targets = battery.meta["targets"]
        cache = model.run(battery.input_ids, capture=["attn.pattern"])
        steps = (targets[0] >= 0).nonzero().flatten()
        for layer in range(model.layout.n_layers):
            pattern = cache.pattern(layer)[:, :, steps]  # [batch, head, n_steps, key_pos]
            want = pattern.argmax(-1) == targets[:, None, steps]
            torch.testing.assert_close(scores[:, layer], want.float().mean(-1))
            on_target = pattern.gather(-1, targets[:, None, steps, None].expand(-1, pattern.shape[1], -1, 1))
            torch.testing.assert_close(mass[:, layer], on_target[..., 0].float().mean(-1), atol=1e-5, rtol=1e-4)


def test_the_hand_built_induction_head_is_the_only_retrieval_head():
    from support.census import handbuilt_model

    model = handbuilt_model()
    result = run_detector(model, RetrievalDetector(n_examples=6, length=128, needle=16), seed=0)
    assert result.heads() == ["L1.H0"]
    assert result.score[1, 0] == 1.0 and result.null[1, 0] < 0.05


# -- streaming split ---------------------------------------------------------------------------------------
def _per_head_W_O(model, layer: int) -> torch.Tensor:
    """``[head, d_head, d_model]`` from the native output projection, written out per family."""
    lay = model.layout
    if model.family == "gpt2":
        weight = model.hf.transformer.h[layer].attn.c_proj.weight  # Conv1D [in, out]
        return weight.detach().reshape(lay.n_heads, lay.d_head, lay.d_model)
    weight = model.hf.model.layers[layer].self_attn.o_proj.weight  # [d_model, head * d_head]
    return weight.detach().T.reshape(lay.n_heads, lay.d_head, lay.d_model)


def _restricted_by_hand(pattern: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    out = torch.zeros_like(pattern)
    for q in range(pattern.shape[-2]):
        for j in range(q + 1):
            if j < n_sink or j > q - window:
                out[..., q, j] = pattern[..., q, j]
    return out / out.sum(-1, keepdim=True)


def test_restrict_pattern_keeps_sinks_and_the_recent_window():
    scores = torch.randn(2, 3, 20, 20).masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    pattern = scores.softmax(-1)
    torch.testing.assert_close(restrict_pattern(pattern, 2, 5), _restricted_by_hand(pattern, 2, 5))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_streaming_split_equals_replacing_each_layers_pattern(family):
    model = get_tiny(family)
    battery = needle_battery(model, "streaming", seed=3, n=2, length=48, needle=6)
    ids, mask = battery.input_ids, battery.meta["mask"]
    diff, total = output_change(model, ids, mask, n_sink=2, window=8, chunk=4)
    cache = model.run(ids, capture=["attn.z"])
    for layer in range(model.layout.n_layers):

        def restrict(pattern, site):
            return _restricted_by_hand(pattern, 2, 8)

        cut = model.run(ids, capture=[f"L{layer}.attn.z"], replace={f"L{layer}.attn.pattern": restrict})
        W_O = _per_head_W_O(model, layer)
        full = torch.einsum("bphd,hdm->bphm", cache.z(layer), W_O)
        restricted = torch.einsum("bphd,hdm->bphm", cut.z(layer), W_O)
        weight = mask[:, :, None].float()
        want_diff = ((full - restricted).norm(dim=-1) * weight).sum(1)  # [batch, head]
        want_total = ((full.norm(dim=-1) + restricted.norm(dim=-1)) * weight).sum(1)
        torch.testing.assert_close(diff[:, layer], want_diff, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(total[:, layer], want_total, rtol=1e-4, atol=1e-5)


def test_a_uniform_head_changes_as_its_closed_form_says():
    model = tiny_model("llama", seed=5)
    with torch.no_grad():
        model.hf.model.layers[1].self_attn.q_proj.weight[:16] = 0.0  # L1.H0: all scores 0 -> uniform attention
    detector = StreamingSplit(n_examples=2, length=64, needle=6, n_sink=2, window=8)
    battery = detector.battery(model, seed=0)
    scores = detector.score(model, battery)
    cache = model.run(battery.input_ids, capture=["L1.attn.v"])
    v = cache.v(1, head=0).float()  # [batch, key_pos, d_head]
    W_O = _per_head_W_O(model, 1)[0]
    for b in range(2):
        diff = total = 0.0
        for q in battery.meta["mask"][b].nonzero().flatten().tolist():
            full = v[b, : q + 1].mean(0) @ W_O
            kept = [j for j in range(q + 1) if j < 2 or j > q - 8]
            restricted = v[b, kept].mean(0) @ W_O
            diff += (full - restricted).norm()
            total += full.norm() + restricted.norm()
        assert scores[b, 1, 0] == pytest.approx(float(diff / total), rel=1e-4)


def test_hand_built_heads_split_into_streaming_and_full_context():
    from support.census import handbuilt_model

    model = handbuilt_model()
    detector = StreamingSplit(n_examples=6, length=128, needle=16, n_sink=2, window=16)
    scores = detector.score(model, detector.battery(model, seed=0)).mean(0)
    assert scores[1, 0] > 0.5  # induction: reads the needle, far outside the window
    # previous-token, sink, dormant and constant-value heads lose nothing they use
    assert scores[0].max() < 0.01 and scores[1, 1:].max() < 0.01


# -- SmolLM2-135M-Instruct -------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_retrieval_heads_are_a_small_minority(smollm2):
    result = run_detector(smollm2, RetrievalDetector(n_examples=3, length=768), seed=0)
    heads = result.heads()
    n_heads = smollm2.layout.n_layers * smollm2.layout.n_heads
    assert 1 <= len(heads) < 0.15 * n_heads  # the retrieval-heads paper: under 5% of heads
    top = result.score.flatten().argmax()
    assert result.score.flatten()[top] > 0.8 and result.null.flatten()[top] < 0.05
    assert all(10 <= int(h[1:].split(".")[0]) for h in heads)  # none in the first third of the model


_EIGHT_K = textwrap.dedent("""
    import json, resource
    import torch, lmatlas
    from lmatlas.census.detectors.retrieval import needle_battery, retrieval_hits

    def rss_now():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def reset_peak():  # restart the kernel's high-water mark (VmHWM) from the current resident set
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    model = lmatlas.load()
    layers = [17, 18]
    warm = needle_battery(model, "retrieval", 0, n=1, length=512)
    retrieval_hits(model, warm.input_ids, warm.meta["targets"], layers=layers)
    battery = needle_battery(model, "retrieval", 0, n=1, length=8192)
    # the baseline: the model's own 8k forward (SDPA, no hooks) through its first block; every block
    # has the same shapes, so one block's peak is the forward's peak (no logits: the statistics make none)
    model.run(warm.input_ids, stop_after=0, lm_head=False)
    reset_peak()
    before = rss_now()
    model.run(battery.input_ids, stop_after=0, lm_head=False)
    plain = peak() - before
    reset_peak()
    before = rss_now()
    hits, mass = retrieval_hits(model, battery.input_ids, battery.meta["targets"], layers=layers)
    growth = peak() - before
    print(json.dumps({"growth": growth, "plain": plain, "hits": hits[0].tolist(), "length": battery.input_ids.shape[1]}))
""")


@pytest.mark.slow
def test_smollm2_retrieval_at_8k_tokens_never_holds_a_pattern(smollm2):
    """8192 tokens: one layer's full patterns would be 9 x 8192^2 float32 = 2.4 GB; peak RSS must stay far below.

    Run in a fresh process so that the peak (``VmHWM``) is this run's; to bound the time, the
    statistics compute layers 0-18 only (they stop the forward after the last requested layer) and
    the baseline one block (``stop_after=0``).
    """
    # Large allocations go straight to mmap so that freed temporaries leave the resident set
    # (as in bench/census_memory.py); otherwise malloc's arenas keep them and the peak reads high.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MKL_DISABLE_FAST_MM": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _EIGHT_K], capture_output=True, text=True, check=True, timeout=1800, env=env
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    one_layer = smollm2.layout.n_heads * 8192**2 * 4
    assert report["length"] == 8192
    # Beyond what the model's own 8k forward needs, the statistics add far less than one layer's patterns.
    assert report["growth"] - report["plain"] < 0.25 * one_layer, report
    # Retrieval weakens with distance (L18.H6 hits ~0.9 of the copy steps at 1k, ~0.1 here) but at 8k
    # a head of layers 17-18 still lands on the needle, 4k tokens back, far above chance (~0).
    assert max(max(layer) for layer in report["hits"]) > 0.2


@pytest.mark.slow
def test_smollm2_copy_suppression_head(smollm2):
    result = run_detector(smollm2, CopySuppression(), seed=0)
    assert "L24.H4" in result.heads()
    assert len(result.heads()) < 0.05 * smollm2.layout.n_layers * smollm2.layout.n_heads


@pytest.mark.slow
def test_smollm2_successor(smollm2):
    """SmolLM2-135M has a digit successor head (L23.H3) but no head that increments every ordinal sequence."""
    totals, per_seq = successor_ov_scores(smollm2)
    assert per_seq["digits"].flatten().argmax() == 23 * 9 + 3 and per_seq["digits"][23, 3] >= 0.5
    assert totals.max() < 0.5
    detector = SuccessorDetector()
    battery = detector.battery(smollm2, seed=0)
    logits = smollm2.forward(battery.input_ids)  # the battery elicits succession from the model itself
    counted = battery.meta["targets"] >= 0
    assert (logits.argmax(-1)[counted] == battery.meta["targets"][counted]).float().mean() > 0.4


@pytest.mark.slow
def test_smollm2_streaming_split(smollm2):
    """Most heads are streamable; the ones that need the full context start with the retrieval heads."""
    detector = StreamingSplit(n_examples=4, length=768)
    scores = detector.score(smollm2, detector.battery(smollm2, seed=0)).mean(0)
    assert (scores < 0.3).float().mean() > 0.6
    top = {f"L{int(i) // 9}.H{int(i) % 9}" for i in scores.flatten().topk(5).indices}
    assert {"L18.H6", "L17.H3"} <= top  # SmolLM2's strongest retrieval heads
