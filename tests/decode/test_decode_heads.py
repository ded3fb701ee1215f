"""Head OV/QK decoding, checked against full-matrix computations and against the model's own forward.

Two independent references:

* **full matrices**: the whole ``d_vocab x d_vocab`` OV logit matrix, computed
  unfactored in ``d_model`` space from the weights (``E_norm @ W_V @ W_O * gains @
  W_U``), ranked with one ``torch.topk`` per row (no chunking, no factoring);
* **the runtime**: every token run alone as a batch of one-token sequences, so at
  layer 0 the head attends only to itself with weight 1 and rotary is the identity
  at position 0: the captured ``attn.z`` are the head's value vectors and the
  captured ``attn.q``/``attn.k`` its pre-rotary queries/keys, as the model computes them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.models import TINY_TYPES, get_tiny

from lmatlas.decode.heads import (
    copying_scores,
    decode_ov,
    decode_ov_layer,
    head_inputs,
    ov_left,
    ov_right,
    ov_rights,
    post_norm_gain,
    promoting_heads,
    self_hits,
    token_ids,
)
from lmatlas.decode.qk import decode_qk, qk_vectors
from lmatlas.decode.vocab import DecodeError, final_norm_gain
from lmatlas.errors import LmatlasError, SiteError
from lmatlas.model.arch import get_path

# GPT-2 adds a learned position embedding to the stream, so layer 0 does not read the bare token embedding.
RUNTIME_TYPES = [t for t in TINY_TYPES if t != "gpt2"]


def full_ov_logits(model, layer: int, head: int) -> torch.Tensor:
    """``[V, V]`` float64 OV logits of every source token, unfactored (d_model space), from the weights."""
    V = model.layout.d_vocab
    kv = head // (model.layout.n_heads // model.layout.n_kv_heads)
    with torch.no_grad():
        x = get_path(model.hf, model.spec.embed)(torch.arange(V))
        if model.spec.attn_norm:
            x = get_path(model.blocks[layer], model.spec.attn_norm)(x)
        v = x.double() @ model.W.W_V(layer)[kv].double()
        if model.W.b_V(layer) is not None:
            v = v + model.W.b_V(layer)[kv].double()
        write = v @ model.W.W_O(layer)[head].double()  # [V, d_model]
        for gain in (post_norm_gain(model, layer), final_norm_gain(model)):
            if gain is not None:
                write = write * gain.double()
        return write @ model.W.W_U.double()


def assert_valid_ranking(ranking, full: torch.Tensor, largest: bool = True) -> None:
    """``ranking`` holds a correct top (bottom) k of every row of ``full``, ties allowed in any order."""
    k = ranking.ids.shape[1]
    ref = torch.topk(full, k, dim=1, largest=largest).values
    torch.testing.assert_close(ranking.logits.double(), ref, rtol=1e-4, atol=1e-5)  # the right values ...
    torch.testing.assert_close(full.gather(1, ranking.ids), ref, rtol=1e-4, atol=1e-5)  # ... at the ids given
    assert all(row.unique().numel() == k for row in ranking.ids)


def self_rank_bounds(full: torch.Tensor, k: int, largest: bool = True) -> tuple[float, float]:
    """Fraction of rows whose own token is surely / possibly (ties) in the row's top (bottom) k."""
    own = full.diagonal()[:, None]
    beaten = (full > own) if largest else (full < own)
    tied = (full == own).sum(1) - 1
    surely = (beaten.sum(1) + tied < k).double().mean()
    possibly = (beaten.sum(1) < k).double().mean()
    return float(surely), float(possibly)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_ov_decoding_matches_the_full_matrix(model_type):
    model = get_tiny(model_type)
    layer, head, k = 1, model.layout.n_heads - 1, 7
    full = full_ov_logits(model, layer, head)
    result = decode_ov(model, layer, head, k=k, n_pairs=12)
    assert_valid_ranking(result.top, full)
    assert_valid_ranking(result.bottom, full, largest=False)
    for score, largest in ((result.copying, True), (result.suppression, False)):
        low, high = self_rank_bounds(full, k, largest)
        assert low - 1e-9 <= score <= high + 1e-9
    best = torch.topk(full.reshape(-1), 12).values
    torch.testing.assert_close(
        torch.tensor([p[2] for p in result.pairs], dtype=torch.float64), best, rtol=1e-4, atol=1e-5
    )
    for source, output, logit in result.pairs:
        assert float(full[source, output]) == pytest.approx(logit, rel=1e-4, abs=1e-5)
    assert result.kv_head == model.layout.kv_head(head)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_a_layers_right_factors_from_one_product_are_each_heads_own(model_type):
    """``ov_rights`` (one product for the layer, what the ov stage uses) gives every head the same
    bits as ``ov_right`` (one product per head), so ``decode_ov(right=...)`` decodes the same."""
    model = get_tiny(model_type)
    rights = ov_rights(model, 1)
    assert rights.shape == (model.layout.n_heads, model.layout.d_head, model.layout.d_vocab)
    for head in range(model.layout.n_heads):
        assert torch.equal(rights[head], ov_right(model, 1, head))
        given, alone = decode_ov(model, 1, head, k=5, right=rights[head]), decode_ov(model, 1, head, k=5)
        assert torch.equal(given.top.ids, alone.top.ids) and torch.equal(given.bottom.logits, alone.bottom.logits)
        assert given.pairs == alone.pairs


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_a_layer_decoded_at_once_is_every_heads_own_decoding_bit_for_bit(model_type, monkeypatch):
    """``decode_ov_layer`` (the ov stage's call: shared inputs, value vectors per KV head, one reused
    score buffer) returns for each head exactly ``decode_ov``'s rankings, pairs and scores, also
    when the sources span several score blocks."""
    import lmatlas.decode.ov as ov

    model = get_tiny(model_type)
    for sources, rows in ((None, None), (40, 16)):
        if rows is not None:  # blocks of 16 sources: the buffer is reused across blocks and heads
            monkeypatch.setattr(ov, "score_rows", lambda d_vocab, rows=rows: rows)
        decoded = decode_ov_layer(model, 1, sources=sources, k=4, n_pairs=6, seed=3)
        assert [d.head for d in decoded] == list(range(model.layout.n_heads))
        for head, got in enumerate(decoded):
            alone = decode_ov(model, 1, head, sources=sources, k=4, n_pairs=6, seed=3)
            for side in ("top", "bottom"):
                a, b = getattr(got, side), getattr(alone, side)
                assert torch.equal(a.ids, b.ids)
                assert torch.equal(a.logits.view(torch.int32), b.logits.view(torch.int32))
            assert got.pairs == alone.pairs and torch.equal(got.sources, alone.sources)
            assert (got.copying, got.suppression, got.kv_head) == (alone.copying, alone.suppression, alone.kv_head)
    with pytest.raises(DecodeError, match="k="):
        decode_ov_layer(model, 1, k=0)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_self_hits_match_the_full_matrix(model_type):
    model = get_tiny(model_type)
    layer, head, k = 0, 1, 5
    full = full_ov_logits(model, layer, head)
    copied, suppressed = self_hits(model, layer, head, torch.arange(full.shape[0]), k, chunk=100)
    own = full.diagonal()[:, None]
    near = (full - own).abs() <= 1e-6 * full.abs().max()  # ties (and rounding-level near-ties) may go either way
    for hits, beaten in ((copied, full > own), (suppressed, full < own)):
        surely = (beaten & ~near).sum(1) + (near.sum(1) - 1) < k
        possibly = (beaten & ~near).sum(1) < k
        assert (hits | ~surely).all() and (~hits | possibly).all()
    assert 0 < int(copied.sum()) < full.shape[0] // 2  # a real mix, not trivially all or none
    scores = copying_scores(model, heads=[(layer, head)], sources=None, k=k)
    assert float(scores.copying[layer, head]) == pytest.approx(float(copied.double().mean()))
    assert float(scores.suppression[layer, head]) == pytest.approx(float(suppressed.double().mean()))


@pytest.mark.parametrize("model_type", RUNTIME_TYPES)
def test_ov_values_are_what_the_model_computes(model_type):
    """Layer 0, one-token sequences: the captured z of every head equals ``ov_left`` of its KV group."""
    model = get_tiny(model_type)
    ids = torch.arange(model.layout.d_vocab)
    cache = model.run(ids[:, None], capture=["L0.attn.z"])
    for head in range(model.layout.n_heads):
        torch.testing.assert_close(ov_left(model, 0, head, ids), cache.z(0, head)[:, 0].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", RUNTIME_TYPES)
def test_qk_decoding_matches_the_models_own_scores(model_type):
    """The full ``V x V`` score matrix from the runtime's q and k (rotary = identity at position 0)."""
    model = get_tiny(model_type)
    ids = torch.arange(model.layout.d_vocab)
    cache = model.run(ids[:, None], capture=["L0.attn.q", "L0.attn.k"])
    scaling = get_path(model.blocks[0], model.spec.attn).scaling
    for head in (0, model.layout.n_heads - 1):
        q, key = cache.q(0, head)[:, 0].double(), cache.k(0, head)[:, 0].double()
        scores = q @ key.T * scaling  # [query, key]
        mine_q, mine_k = qk_vectors(model, 0, head, ids)
        torch.testing.assert_close(mine_q.double() @ mine_k.double().T, scores, rtol=1e-4, atol=1e-5)
        result = decode_qk(model, 0, head, k=6)
        assert_valid_ranking(result.top, scores)
        assert_valid_ranking(result.preferred, scores.mean(0, keepdim=True))


def test_qk_subsets_return_token_ids_not_indices(llama):
    queries, keys = torch.tensor([5, 70, 199]), torch.tensor([3, 9, 40, 41, 100, 250])
    result = decode_qk(llama, 1, 2, queries=queries, keys=keys, k=3)
    q, key = qk_vectors(llama, 1, 2, torch.arange(llama.layout.d_vocab))
    scores = q[queries] @ key[keys].T
    assert torch.equal(result.top.ids, keys[torch.topk(scores, 3, dim=1).indices])  # no ties in a random model
    assert torch.equal(result.queries, queries)


def test_gqa_heads_of_one_group_share_values_but_not_outputs(llama):
    """Query heads 0 and 1 read KV head 0: same value vectors, different OV logits."""
    ids = torch.arange(50)
    assert llama.layout.kv_head(0) == llama.layout.kv_head(1) == 0 and llama.layout.kv_head(2) == 1
    assert torch.equal(ov_left(llama, 1, 0, ids), ov_left(llama, 1, 1, ids))
    assert not torch.allclose(ov_left(llama, 1, 0, ids), ov_left(llama, 1, 2, ids))
    a, b = decode_ov(llama, 1, 0, sources=ids, k=5), decode_ov(llama, 1, 1, sources=ids, k=5)
    assert not torch.equal(a.top.ids, b.top.ids)


def planted_model():
    """A tiny Llama whose head L1.H0 copies and L1.H1 (same KV group) suppresses, with tied unembedding.

    W_V of KV head 0 reads the first 16 residual dimensions; W_O of head 0 writes them
    back (+), of head 1 writes them back negated: OV = +-P (a projection). With
    ``W_U = W_E.T`` a token's own logit ``|P e_s|^2`` beats ``<P e_s, P e_t>`` for most ``t``.
    """
    model = copy.deepcopy(get_tiny("llama"))
    lay = model.layout
    block = model.blocks[1].self_attn
    with torch.no_grad():
        model.hf.lm_head.weight.copy_(model.hf.model.embed_tokens.weight)
        eye = torch.eye(lay.d_head, lay.d_model)  # [d_head, d_model]: the first 16 dims
        block.v_proj.weight[: lay.d_head] = eye
        for head, sign in ((0, 1.0), (1, -1.0)):
            block.o_proj.weight[:, head * lay.d_head : (head + 1) * lay.d_head] = sign * eye.T
    return model


def test_planted_copying_and_suppression_heads_are_found():
    model = planted_model()
    scores = copying_scores(model, sources=None, k=10)
    assert scores.copying[1, 0] > 0.8 and scores.suppression[1, 1] > 0.8
    assert scores.ranked("copying", n=1)[0][0] == "L1.H0"
    assert scores.ranked("suppression", n=1)[0][0] == "L1.H1"
    chance = 10 / model.layout.d_vocab
    assert scores.copying[0].max() < 0.2 and chance < 0.05  # untouched random heads stay near chance
    # decode_ov's top-k breaks ties arbitrarily, self_ranks in the source's favour: the padding token
    # (a zero embedding, so every output ties) may differ, nothing else
    assert decode_ov(model, 1, 0, k=10).copying == pytest.approx(
        float(scores.copying[1, 0]), abs=1.01 / model.layout.d_vocab
    )


def test_copying_scores_on_a_sample_are_seeded_and_match_decode_ov(llama):
    a = copying_scores(llama, sources=64, seed=3, k=5, heads=[(0, 1), (1, 2)])
    b = copying_scores(llama, sources=64, seed=3, k=5, heads=[(0, 1), (1, 2)])
    assert torch.equal(torch.nan_to_num(a.copying), torch.nan_to_num(b.copying))
    ids = token_ids(llama, 64, seed=3)
    assert ids.numel() == 64 and torch.equal(ids, ids.sort().values) and ids.unique().numel() == 64
    one = decode_ov(llama, 1, 2, sources=ids, k=5)
    assert float(a.copying[1, 2]) == pytest.approx(one.copying)
    assert torch.isnan(a.copying[0, 0]) and [name for name, _ in a.ranked()] in (["L0.H1", "L1.H2"], ["L1.H2", "L0.H1"])


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen2", "gpt2"])
def test_promoting_heads_match_the_full_matrix_column(model_type):
    model = get_tiny(model_type)
    token = 101
    result = promoting_heads(model, token)
    for layer in range(model.layout.n_layers):
        for head in range(model.layout.n_heads):
            column = full_ov_logits(model, layer, head)[:, token]  # [sources]
            assert float(result.max[layer, head]) == pytest.approx(float(column.max()), rel=1e-4, abs=1e-6)
            assert int(result.argmax[layer, head]) == int(column.argmax())
            assert float(result.mean[layer, head]) == pytest.approx(float(column.mean()), rel=1e-4, abs=1e-6)
    ranked = result.ranked(3)
    assert [r[2] for r in ranked] == sorted((r[2] for r in ranked), reverse=True)


def test_head_inputs_use_the_embedding_modules_scale():
    gemma = get_tiny("gemma3_text")
    ids = torch.tensor([1, 2, 3])
    raw = head_inputs(gemma, 0, ids, norm_input=False)
    scale = gemma.hf.config.hidden_size**0.5
    torch.testing.assert_close(raw, gemma.W.W_E[ids].float() * scale, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m: decode_ov(m, 0, 4), SiteError),
        (lambda m: decode_ov(m, 2, 0), SiteError),
        (lambda m: decode_ov(m, 0, 0, k=0), DecodeError),
        (lambda m: decode_qk(m, 0, 0, keys=[1, 2], k=3), DecodeError),
        (lambda m: decode_ov(m, 0, 0, sources=[5, 999]), DecodeError),
        (lambda m: copying_scores(m, sources=10_000), DecodeError),
        (lambda m: promoting_heads(m, 260), DecodeError),
        (lambda m: copying_scores(m, heads=[(0, 0)], sources=4).ranked("induction"), DecodeError),
        (lambda m: copying_scores(m, heads=[(0, 9)]), SiteError),
    ],
)
def test_bad_requests_raise_clear_errors(llama, call, error):
    with pytest.raises(error) as info:
        call(llama)
    assert isinstance(info.value, LmatlasError) and str(info.value)


def test_to_dict_is_json_ready(llama):
    import json

    ov = decode_ov(llama, 0, 1, sources=20, k=3, n_pairs=4).to_dict(llama.tokenizer, rows=2)
    qk = decode_qk(llama, 0, 1, queries=10, k=3).to_dict(llama.tokenizer, rows=2)
    json.dumps([ov, qk])
    assert ov["head"] == "L0.H1" and len(ov["pairs"]) == 4 and len(ov["sources"]) == 2
    assert len(qk["preferred_keys"]) == 3 and len(qk["queries"][0]["top_keys"]) == 3


@pytest.mark.slow
def test_smollm2_has_copying_heads(smollm2):
    """MAPS: real LMs have heads whose OV circuit maps many tokens to themselves (chance is k/V = 0.0002).

    A full census (every head, 1024 sources) puts SmolLM2's strongest copying heads in its
    last layers (L29.H1 0.70, L29.H2 0.61, L28.H5 0.48); scoring the last four layers
    keeps the test short.
    """
    last = smollm2.layout.n_layers
    heads = [(layer, head) for layer in range(last - 4, last) for head in range(smollm2.layout.n_heads)]
    scores = copying_scores(smollm2, heads=heads, sources=256, k=10)
    best, value = scores.ranked("copying", n=1)[0]
    assert value > 0.3 and float(scores.copying[: last - 4].isnan().all())
    layer, head = (int(x) for x in best[1:].split(".H"))
    result = decode_ov(smollm2, layer, head, sources=256, k=10, n_pairs=10)
    assert result.copying == pytest.approx(value, abs=0.02)  # same sample, top-k ids instead of thresholds
    assert sum(s == o for s, o, _ in result.pairs) >= 5  # its strongest pairs are mostly token -> itself
