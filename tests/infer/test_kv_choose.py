"""Choosing full KV heads (atlas, census, random, uniform) and every bad input, each refused before compute."""

from __future__ import annotations

import pytest
import torch

from lmatlas.atlas.store import AtlasStore
from lmatlas.errors import AtlasError, LmatlasError, SiteError
from lmatlas.infer import HeadwiseCache, choose, make_plan, plan_from_heads
from lmatlas.infer.generate import generate_kv, greedy
from lmatlas.model.tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def write_atlas(path, model, scores: dict[str, torch.Tensor]):
    """A real atlas file holding only hand-written head scores (the census stage's rows)."""
    store = AtlasStore.create_or_open(path, model.card())
    try:
        for name, table in scores.items():
            rows = [
                {
                    "layer": l,
                    "head": h,
                    "detector": name,
                    "score": float(table[l, h]),
                    "baseline": 0.0,
                    "z": 0.0,
                    "label": False,
                    "seed": 0,
                }
                for l in range(table.shape[0])
                for h in range(table.shape[1])
            ]
            store.commit_unit("census", f"census/{name}", {"head_scores": rows}, 0.0)
    finally:
        store.close()
    return path


def test_atlas_plan_keeps_the_neediest_kv_heads(llama, tmp_path):
    # 2 layers x 4 query heads, 2 KV heads (query heads 0,1 -> KV 0; 2,3 -> KV 1)
    streaming = torch.tensor([[0.1, 0.0, 0.2, 0.9], [0.3, 0.0, 0.0, 0.1]])
    retrieval = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.95, 0.0, 0.0]])
    path = write_atlas(tmp_path / "a.duckdb", llama, {"full_context": streaming, "retrieval": retrieval})
    plan = choose.from_atlas(llama, path, budget=0.5, sink=2, recent=8)
    # KV needs (max over query heads of max over detectors): L0.KV0 .1, L0.KV1 .9, L1.KV0 .95, L1.KV1 .1
    assert plan.full == {(0, 1), (1, 0)}
    assert plan.budget == 0.5 and plan.method == "atlas:full_context+retrieval"
    only_streaming = choose.from_atlas(llama, path, budget=0.25, detectors=["full_context"])
    assert only_streaming.full == {(0, 1)}
    assert choose.from_atlas(llama, path, budget=0.0).full == frozenset()


def test_atlas_of_another_model_is_refused(llama, tmp_path):
    other = tiny_model("qwen2")
    path = write_atlas(
        tmp_path / "other.duckdb", other, {"full_context": torch.zeros(2, 4), "retrieval": torch.zeros(2, 4)}
    )
    with pytest.raises(AtlasError, match="another model"):
        choose.from_atlas(llama, path, budget=0.5)


def test_atlas_without_scores_or_file_is_refused(llama, tmp_path):
    path = write_atlas(tmp_path / "partial.duckdb", llama, {"retrieval": torch.zeros(2, 4)})
    with pytest.raises(AtlasError, match="no 'full_context' head scores"):
        choose.from_atlas(llama, path, budget=0.5)
    with pytest.raises(AtlasError, match="lmatlas map"):
        choose.from_atlas(llama, tmp_path / "missing.duckdb", budget=0.5)


def test_census_plan_uses_the_census_scores(llama):
    from lmatlas.census.run import run_census

    census = run_census(llama, detectors=["full_context", "retrieval"])
    plan = choose.from_census(llama, census, budget=0.25)
    need = torch.maximum(census["full_context"].score, census["retrieval"].score).reshape(2, 2, 2).amax(-1)
    best = divmod(int(need.argmax()), 2)
    assert plan.full == {best}


def test_random_and_uniform_baselines(llama):
    a, b = choose.random_plan(llama, 0.5, seed=1), choose.random_plan(llama, 0.5, seed=1)
    assert a.full == b.full and len(a.full) == 2
    assert {frozenset(choose.random_plan(llama, 0.5, seed=s).full) for s in range(8)} != {a.full}
    uni = choose.uniform(llama, sink=4, recent=32)
    assert uni.full == frozenset() and uni.budget == 0.0
    # equal entries: 1 full head of 4 at T=1000 with sink+recent=36 -> (1000 + 3*36)/4 = 277 -> recent 273
    plan = make_plan(llama, [(0, 0)], sink=4, recent=32)
    assert choose.matched_recent(plan, 1000) == 273


def test_gemma_single_kv_head_says_the_choice_is_per_layer():
    gemma = tiny_model("gemma")
    plan = choose.from_scores(gemma, torch.rand(2, 4), budget=0.5)
    assert any("per layer" in note for note in plan.notes)


def test_bad_budgets_and_windows(llama):
    with pytest.raises(LmatlasError, match=r"\[0, 1\]"):
        choose.random_plan(llama, 1.5, seed=0)
    with pytest.raises(LmatlasError, match="sink window"):
        choose.uniform(llama, sink=4, recent=0)
    with pytest.raises(LmatlasError, match="sink"):
        choose.uniform(llama, sink=-1, recent=8)


def test_heads_that_do_not_exist(llama):
    with pytest.raises(SiteError, match="out of range"):
        plan_from_heads(llama, ["L0.H9"])
    with pytest.raises(SiteError):
        plan_from_heads(llama, ["L7.H0"])
    with pytest.raises(LmatlasError, match="KV head 5 does not exist"):
        make_plan(llama, [(0, 5)])


def test_selection_that_splits_a_kv_group_is_expanded_and_said(llama, caplog):
    plan = plan_from_heads(llama, ["L0.H1", "L1.H2", "L1.H3"])
    assert plan.full == {(0, 0), (1, 1)}
    assert len(plan.notes) == 1 and "L0.H0" in plan.notes[0]
    assert "also keeps L0.H0 full" in caplog.text


def test_plan_of_another_model_is_refused(llama):
    gemma = tiny_model("gemma")
    with pytest.raises(LmatlasError, match="another model"):
        HeadwiseCache(gemma, choose.uniform(llama))


def test_padded_batch_is_refused_before_compute(llama):
    llama.tokenizer.padding_side = "left"
    calls = []
    handle = llama.hf.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(LmatlasError, match="padded batches"):
            generate_kv(llama, ["a short one", "a much longer prompt here"], plan=choose.uniform(llama, 2, 4))
        assert calls == []  # refused before any forward
        batch = llama.tokenize(["a short one", "a much longer prompt here"])
        with pytest.raises(LmatlasError, match="padded batches"), torch.no_grad():
            llama.hf.generate(
                **batch,
                past_key_values=HeadwiseCache(llama, choose.uniform(llama, 2, 4)),
                max_new_tokens=2,
                pad_token_id=258,
            )
    finally:
        handle.remove()


def test_equal_length_batch_runs(llama):
    ids = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    plan = make_plan(llama, [(0, 1), (1, 0)], sink=2, recent=4)
    with torch.no_grad():
        both = llama.hf(ids, past_key_values=HeadwiseCache(llama, plan), use_cache=True).logits
        one = llama.hf(ids[1:], past_key_values=HeadwiseCache(llama, plan), use_cache=True).logits
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


def test_probes_cannot_combine_but_module_hooks_can(llama):
    ids = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(1))
    plan = make_plan(llama, [(0, 1)], sink=2, recent=4)
    cache = HeadwiseCache(llama, plan)
    with pytest.raises(LmatlasError, match="attention internals"), torch.no_grad():
        with llama.hooked(capture=["L0.attn.q"]):
            llama.hf(ids, past_key_values=cache, use_cache=True)
    with torch.no_grad():
        plain = llama.hf(ids, past_key_values=HeadwiseCache(llama, plan), use_cache=True).logits
        with llama.hooked(capture=["attn.z", "L1.resid.post"]) as session:
            hooked = llama.hf(ids, past_key_values=HeadwiseCache(llama, plan), use_cache=True).logits
    assert torch.equal(plain, hooked)
    assert session.store["L0.attn.z"].shape == (1, 20, 4, 16)


def test_attention_switched_away_is_a_clear_error(llama):
    cache = HeadwiseCache(llama, choose.uniform(llama, 2, 4))
    saved = llama.hf.config._attn_implementation
    llama.hf.config._attn_implementation = "sdpa"
    try:
        with pytest.raises(LmatlasError, match="cannot read this cache"), torch.no_grad():
            llama.hf(torch.tensor([[1, 2, 3]]), past_key_values=cache, use_cache=True)
    finally:
        llama.hf.config._attn_implementation = saved


def test_greedy_runner_equals_generate_and_reports(llama):
    ids = torch.randint(0, 250, (1, 30), generator=torch.Generator().manual_seed(2))
    plan = make_plan(llama, [(1, 1)], sink=2, recent=5)
    with torch.no_grad():
        ref = llama.hf.generate(
            ids, past_key_values=HeadwiseCache(llama, plan), max_new_tokens=6, do_sample=False, pad_token_id=258
        )
    result = greedy(llama, ids, HeadwiseCache(llama, plan), max_new_tokens=6, measure_memory=True, stop_at_eos=False)
    assert result.tokens == ref[0, 30:].tolist()
    assert result.kv_bytes > 0 and result.plan["full_kv_heads"] == 1
    assert result.peak_prefill_bytes is not None and result.decode_tokens_per_s > 0
    default = greedy(llama, ids, None, max_new_tokens=6, stop_at_eos=False)
    assert default.kv_bytes > result.kv_bytes


def test_model_generate_takes_a_kv_plan(llama):
    prompt = "the head-wise cache keeps sinks and a recent window " * 2
    plan = make_plan(llama, [(1, 1)], sink=2, recent=5)
    batch = llama.tokenize(prompt)
    with torch.no_grad():
        ref = llama.hf.generate(
            **batch, past_key_values=HeadwiseCache(llama, plan), max_new_tokens=6, do_sample=False, pad_token_id=258
        )
    expected = llama.tokenizer.decode(ref[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert llama.generate(prompt, 6, kv=plan) == expected
    # every head full: the same text as the default cache
    assert llama.generate(prompt, 6, kv=choose.every_head(llama)) == llama.generate(prompt, 6)
    with pytest.raises(LmatlasError, match="not both"):
        llama.generate(prompt, 2, kv=plan, past_key_values=HeadwiseCache(llama, plan))
