"""The census framework: batteries, detectors against plain re-derivations, run_census, the benchmark.

Every detector's score is re-derived here from the *full* attention patterns and head
writes captured with ``model.trace`` and plain PyTorch written from the definitions
(keys found by token equality rather than by offsets, explicit key sets for the null
baselines, the final norm's gain read from each family's own convention), on tiny
models whose attention is made peaked so that the numbers are not all uniform.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.census import handbuilt_model

from lmatlas.census import batteries, measure
from lmatlas.census.registry import get_detector
from lmatlas.census.run import run_census, welch_z
from lmatlas.errors import LmatlasError
from lmatlas.model.arch import get_path
from lmatlas.model.tiny import tiny_model

MINE = ["previous_token", "attention_sink", "local", "duplicate_token", "induction", "dormant"]
BENCH = Path(__file__).resolve().parents[2] / "bench"


def peaked(model_type: str):
    """A fresh tiny model (not the shared cached one) with query weights scaled up: sharp, varied attention."""
    model = tiny_model(model_type, seed=3)
    with torch.no_grad():
        for layer in range(model.layout.n_layers):
            block = model.blocks[layer]
            if model.spec.q:
                get_path(block, model.spec.q).weight.mul_(100.0)
            else:  # fused qkv: scale the query columns/rows
                weight = get_path(block, model.spec.qkv).weight
                d_q = model.layout.n_heads * model.layout.d_head
                (weight[:, :d_q] if model.spec.conv1d else weight[:d_q]).mul_(100.0)
    return model


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma2"])
def family_model(request):
    return peaked(request.param)


# -- batteries ------------------------------------------------------------------------------------------
def test_batteries_are_seeded_and_streams_independent(llama):
    a = batteries.random_battery(llama, "x", 0)
    assert torch.equal(a.input_ids, batteries.random_battery(llama, "y", 0).input_ids)
    assert not torch.equal(a.input_ids, batteries.random_battery(llama, "x", 1).input_ids)
    assert not torch.equal(a.input_ids, batteries.random_battery(llama, "x", 0, null=True).input_ids)
    text = batteries.text_battery(llama, "t", 0)
    assert torch.equal(text.input_ids, batteries.text_battery(llama, "t", 0).input_ids)


def test_random_battery_avoids_special_tokens_and_repeats(llama):
    battery = batteries.random_battery(llama, "previous_token", 0)
    ids, meta = battery.input_ids, battery.meta
    assert tuple(ids.shape) == (batteries.N_EXAMPLES, 1 + 2 * batteries.HALF) and meta["prefix"] == 1
    assert (ids[:, 0] == llama.tokenizer.bos_token_id).all()
    assert int(ids[:, 1:].max()) < 256  # the byte tokenizer's specials are 256..259
    for row, compare in zip(ids[:, 1:], meta["compare"]):
        assert len(set(row.tolist())) == row.numel()
        assert not set(row.tolist()) & set(compare.tolist())


def test_repeated_battery_repeats_its_first_half(llama):
    battery = batteries.repeated_battery(llama, "induction", 0)
    half, body = battery.meta["half"], battery.input_ids[:, 1:]
    assert torch.equal(body[:, :half], body[:, half:])
    assert all(len(set(row.tolist())) == half for row in body[:, :half])


def test_text_battery_is_ordinary_text(llama):
    battery = batteries.text_battery(llama, "dormant", 0)
    first = llama.tokenizer.decode(battery.input_ids[0, 1:])
    assert any(first.startswith(" " + sentence) for sentence in batteries.TEXT)
    shuffled = batteries.text_battery(llama, "dormant", 0, null=True).input_ids
    assert not torch.equal(shuffled, battery.input_ids)
    assert torch.equal(shuffled.sort(dim=1).values, battery.input_ids.sort(dim=1).values)  # same tokens per row


@pytest.mark.slow
def test_ordinary_tokens_exclude_special_and_added_tokens(smollm2):
    pool = set(batteries.ordinary_tokens(smollm2).tolist())
    added = set(smollm2.tokenizer.added_tokens_decoder)
    assert added and not pool & added and len(pool) == len(smollm2.tokenizer) - len(added)


def test_batteries_shrink_to_a_short_context_and_refuse_a_tiny_one():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmatlas.model.handle import Model
    from lmatlas.model.tiny import byte_tokenizer

    def model_with(context):
        config = LlamaConfig(
            vocab_size=260,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=context,
        )
        return Model.from_hf(LlamaForCausalLM(config), byte_tokenizer())

    battery = batteries.repeated_battery(model_with(41), "induction", 0)
    assert battery.meta["half"] == 20 and battery.input_ids.shape[1] == 41
    with pytest.raises(LmatlasError, match="too small"):
        batteries.random_battery(model_with(20), "previous_token", 0)


# -- detectors against plain re-derivations ---------------------------------------------------------------
def _trace(model, battery):
    cache = model.run(battery.input_ids, capture=["attn.pattern", "attn.out"])
    patterns = torch.stack([cache.pattern(layer).float() for layer in range(model.layout.n_layers)])
    outs = torch.stack([cache.head_out(layer).float() for layer in range(model.layout.n_layers)])
    return patterns, outs  # [layer, batch, head, pos, key_pos], [layer, batch, pos, head, d_model]


def _mean_over(patterns, keys_of, queries):
    """``[batch, layer, head]``: mean over ``queries`` of the mass on the key positions ``keys_of(b, q)``."""
    n_layers, n, n_heads = patterns.shape[:3]
    out = torch.zeros(n, n_layers, n_heads)
    for b in range(n):
        values = [patterns[:, b, :, q, keys_of(b, q)].sum(-1) for q in queries]
        out[b] = torch.stack(values).mean(0)
    return out


def test_positional_detectors_match_a_plain_rederivation(family_model):
    model = family_model
    real = batteries.random_battery(model, "previous_token", 0)
    null = batteries.random_battery(model, "previous_token", 0, null=True)
    real_p, _ = _trace(model, real)
    null_p, _ = _trace(model, null)
    pos = real.input_ids.shape[1]
    w = measure.WINDOW

    def average_other(patterns, keys_of, queries, scale=1.0):
        """The null: the mass of an *average* non-target key, as a mean over an explicit key set."""
        n_layers, n, n_heads = patterns.shape[:3]
        out = torch.zeros(n, n_layers, n_heads)
        for b in range(n):
            out[b] = torch.stack([patterns[:, b, :, q, keys_of(q)].mean(-1) * scale for q in queries]).mean(0)
        return out

    expected = {
        ("previous_token", False): _mean_over(real_p, lambda b, q: [q - 1], range(2, pos)),
        ("previous_token", True): average_other(
            null_p, lambda q: [k for k in range(1, q + 1) if k != q - 1], range(2, pos)
        ),
        ("attention_sink", False): _mean_over(real_p, lambda b, q: [0], range(1, pos)),
        ("attention_sink", True): average_other(null_p, lambda q: list(range(1, q + 1)), range(1, pos)),
        ("local", False): _mean_over(real_p, lambda b, q: [q] + list(range(q - w + 1, q - 1)), range(2 * w, pos)),
        ("local", True): average_other(null_p, lambda q: list(range(1, q - w + 1)), range(2 * w, pos), scale=w - 1),
    }
    for (name, is_null), want in expected.items():
        detector = get_detector(name)
        got = detector.score(model, null if is_null else real)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=2e-5), (name, is_null, (got - want).abs().max())
    assert real_p.amax(-1).mean() > 0.15  # peaked (uniform would give ~0.04): picking wrong keys would show


def _final_gain(model):
    """The final norm's gain, read from each family's convention (not by probing the module)."""
    norm = get_path(model.hf, model.spec.final_norm)
    if model.family.startswith("gemma"):
        return 1.0 + norm.weight.float(), False
    return norm.weight.float(), isinstance(norm, torch.nn.LayerNorm)


def test_duplicate_and_induction_match_a_plain_rederivation(family_model):
    model = family_model
    repeated = batteries.repeated_battery(model, "induction", 0)
    patterns, outs = _trace(model, repeated)
    ids = repeated.input_ids
    half, prefix = repeated.meta["half"], repeated.meta["prefix"]
    queries = range(prefix + half, prefix + 2 * half)

    def earlier(b, q, shift):  # keys found by token equality, not by offsets
        return [k + shift for k in range(q) if ids[b, k] == ids[b, q]]

    duplicate = _mean_over(patterns, lambda b, q: earlier(b, q, 0), queries)
    prefix_matching = _mean_over(patterns, lambda b, q: earlier(b, q, 1), queries)

    gain, centres = _final_gain(model)
    W_U = model.W.W_U.float()  # [d_model, d_vocab]
    n, n_layers, n_heads = ids.shape[0], model.layout.n_layers, model.layout.n_heads
    copying = torch.zeros(n, n_layers, n_heads)
    for b in range(n):
        compare = repeated.meta["compare"][b]
        ranks = []
        for q in queries:
            target = ids[b, earlier(b, q, 1)[0]]
            write = outs[:, b, q]  # [layer, head, d_model]
            if centres:
                write = write - write.mean(-1, keepdim=True)
            logits = (write * gain) @ W_U  # direct logit effect on every token
            mine, others = logits[..., target, None], logits[..., compare]
            ranks.append((others < mine).float().mean(-1) + 0.5 * (others == mine).float().mean(-1))
        copying[b] = torch.stack(ranks).mean(0)

    assert torch.allclose(get_detector("duplicate_token").score(model, repeated), duplicate, atol=2e-5)
    parts = get_detector("induction").subscores(model, repeated)
    assert torch.allclose(parts["prefix_matching"], prefix_matching, atol=2e-5)
    assert torch.allclose(parts["copying"], copying, atol=1e-6)
    score = get_detector("induction").score(model, repeated)
    assert torch.allclose(score, prefix_matching * (2 * copying - 1).clamp(0, 1), atol=2e-5)
    assert copying.std() > 0.02  # ranks vary between heads: a real test


def test_dormant_matches_a_plain_rederivation(family_model):
    model = family_model
    text = batteries.text_battery(model, "dormant", 0)
    _, outs = _trace(model, text)
    norms = outs[:, :, 1:].norm(dim=-1).mean(2).permute(1, 0, 2)  # [batch, layer, head]
    median = torch.from_numpy(np.median(norms.numpy(), axis=-1, keepdims=True))
    want = (1 - norms / median).clamp(0, 1)
    assert torch.allclose(get_detector("dormant").score(model, text), want, atol=1e-5)


# -- run_census ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def handbuilt():
    return handbuilt_model()


def _plain_per_example(model, name: str, battery) -> torch.Tensor:
    """``[batch, layer, head]``: the per-example score of ``duplicate_token`` or ``local`` written from the
    definitions in the detectors' docstrings, on the full patterns captured here (keys by token
    equality on a repeated battery; explicit key sets elsewhere)."""
    patterns, _ = _trace(model, battery)
    ids, meta = battery.input_ids, battery.meta
    pos, w = ids.shape[1], measure.WINDOW
    if name == "duplicate_token":
        start = meta["prefix"] + meta["half"]
        queries = range(start, start + meta["half"])
        if meta["null"]:  # the same key positions, now holding unrelated tokens
            return _mean_over(patterns, lambda b, q: [q - meta["half"]], queries)
        return _mean_over(patterns, lambda b, q: [k for k in range(q) if ids[b, k] == ids[b, q]], queries)
    assert name == "local"
    queries = range(2 * w, pos)
    if not meta["null"]:
        return _mean_over(patterns, lambda b, q: [q] + list(range(q - w + 1, q - 1)), queries)
    n_layers, n, n_heads = patterns.shape[:3]
    out = torch.zeros(n, n_layers, n_heads)
    for b in range(n):  # (w - 1) average keys outside the window (and after the first token)
        out[b] = torch.stack([patterns[:, b, :, q, 1 : q - w + 1].mean(-1) * (w - 1) for q in queries]).mean(0)
    return out


def test_z_scores_are_welch_statistics(family_model):
    """The census's z: Welch's t of the per-example scores on the battery against the null battery, both
    re-derived here (the batteries each detector documents, scored from captured patterns)."""
    model = family_model
    census = run_census(model, ["duplicate_token", "local"], seed=2)
    real = {
        "duplicate_token": batteries.repeated_battery(model, "duplicate_token", 2),
        "local": batteries.random_battery(model, "local", 2),
    }
    null = {name: batteries.random_battery(model, name, 2, null=True) for name in real}
    for name in ("duplicate_token", "local"):
        assert not torch.equal(real[name].input_ids, null[name].input_ids)
        a = _plain_per_example(model, name, real[name]).double().numpy()
        b = _plain_per_example(model, name, null[name]).double().numpy()
        spread = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
        want = (a.mean(0) - b.mean(0)) / np.maximum(spread, 1e-6)
        assert want.std() > 0.5, name  # the z-scores vary between heads (measured 0.96 to 61): not all ~0
        assert np.allclose(census[name].z.numpy(), want, rtol=1e-3, atol=1e-3), (name, census[name].z, want)
        assert np.allclose(census[name].score.numpy(), a.mean(0), atol=1e-5)
        assert census[name].seed == 2 and census[name].battery["seed"] == 2


def test_welch_z_of_identical_distributions_is_zero():
    scores = torch.rand(16, 3, 4)
    assert torch.equal(welch_z(scores, scores), torch.zeros(3, 4))


def test_labels_follow_thresholds_and_overrides(handbuilt):
    default = run_census(handbuilt, ["attention_sink", "dormant"])
    assert default["attention_sink"].heads() == ["L0.H1"] and default["dormant"].heads() == ["L0.H3"]
    # No z requirement and threshold 0: every head is a "sink".
    loose = run_census(
        handbuilt,
        ["attention_sink", "dormant"],
        thresholds={"attention_sink": 0.0},
        min_z={"attention_sink": None, "dormant": 1.0},
    )
    assert len(loose["attention_sink"].heads()) == 8 and loose["attention_sink"].min_z is None
    assert loose["dormant"].heads() == []  # silent on random tokens too: z = 0 < 1
    assert loose.labels["L0.H1"] == ["attention_sink"] and loose.labels["L0.H3"] == ["attention_sink"]
    everyone = run_census(handbuilt, ["attention_sink"], min_z=1e9)
    assert everyone["attention_sink"].heads() == [] and everyone["attention_sink"].min_z == 1e9


def test_bad_input_raises_clear_errors(handbuilt):
    with pytest.raises(LmatlasError, match="Unknown head type 'nope'.*induction"):
        run_census(handbuilt, ["nope"])
    with pytest.raises(LmatlasError, match=r"must lie in \[0, 1\]"):
        run_census(handbuilt, ["local"], thresholds={"local": 1.5})
    with pytest.raises(LmatlasError, match="does not run"):
        run_census(handbuilt, ["local"], thresholds={"induction": 0.2})
    with pytest.raises(LmatlasError, match="No detectors"):
        run_census(handbuilt, [])
    census = run_census(handbuilt, ["local"])
    with pytest.raises(LmatlasError, match="did not run 'induction'"):
        census["induction"]


def test_a_detector_that_cannot_apply_is_skipped_only_in_a_full_census(handbuilt, monkeypatch):
    from lmatlas.census import run as run_module
    from lmatlas.census.registry import Detector

    class NeedsLongContext(Detector):
        name, description = "needs_long_context", "raises like a detector whose battery does not fit"

        def battery(self, model, seed, null=False):
            raise LmatlasError("length=4096 exceeds this model's context")

    everything = {"local": get_detector("local"), "needs_long_context": NeedsLongContext()}
    monkeypatch.setattr(run_module, "all_detectors", lambda: everything)
    census = run_census(handbuilt)
    assert list(census.results) == ["local"] and "exceeds" in census.skipped["needs_long_context"]
    assert census.to_dict()["skipped"] == census.skipped
    with pytest.raises(LmatlasError, match="exceeds"):
        run_census(handbuilt, [NeedsLongContext()])


def test_detectors_share_forwards_and_sharing_changes_nothing(handbuilt):
    calls = []
    handle = handbuilt.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        census = run_census(handbuilt, MINE)
        forwards = len(calls)
        calls.clear()
        alone = {name: run_census(handbuilt, [name])[name] for name in MINE}
    finally:
        handle.remove()
    # random, null, repeated and text batteries: one forward each for six detectors and their nulls.
    assert forwards == 4
    assert len(calls) > forwards
    for name in MINE:
        assert torch.equal(census[name].score, alone[name].score) and torch.equal(census[name].z, alone[name].z)


def test_census_to_dict_is_json_with_provenance(handbuilt):
    census = run_census(handbuilt, ["previous_token", "induction"], seed=5)
    data = json.loads(json.dumps(census.to_dict()))
    prov = data["provenance"]
    assert prov["model"] == "handbuilt:gpt2" and prov["seed"] == 5 and prov["lmatlas_version"]
    assert {"file_sha256", "dtype", "device", "torch_version", "transformers_version"} <= set(prov)
    induction = data["detectors"]["induction"]
    assert induction["labelled"] == ["L1.H0"] and induction["battery"]["shape"] == [16, 129]
    assert induction["null_battery"]["kind"] == "null" and set(induction["subscores"]) == {"prefix_matching", "copying"}
    assert np.array(induction["score"]).shape == (2, 4) and data["labels"]["L1.H0"] == ["induction"]
    rows = census["induction"].rows()
    assert rows[0]["head"] == "L1.H0" and rows[0]["labelled"] and "copying" in rows[0]


# -- real models -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_has_induction_heads_fed_by_earlier_previous_token_heads(smollm2):
    """Olsson et al. (2022): induction heads compose with an earlier previous-token head; none in layer 0."""
    census = run_census(smollm2, ["previous_token", "induction"])
    induction, previous = census["induction"], census["previous_token"]
    found = [(int(h[1:].split(".")[0]), int(h.split("H")[1])) for h in induction.heads()]
    assert found, induction.rows()[:5]
    first_previous = min(int(h[1:].split(".")[0]) for h in previous.heads())
    for layer, head in found:
        assert layer > first_previous
        assert induction.subscores["prefix_matching"]["score"][layer, head] > 0.3
        assert induction.subscores["copying"]["score"][layer, head] > 0.6
        assert induction.z[layer, head] > 3
    assert census.provenance["file_sha256"] and census.provenance["family"] == "llama"


@pytest.mark.slow
def test_gemma3_census_runs_with_one_kv_head(gemma3):
    census = run_census(gemma3, ["previous_token", "induction"])
    assert census.n_heads == 4 and census["induction"].score.shape == (gemma3.layout.n_layers, 4)
    assert census["previous_token"].heads() and census["induction"].heads()


# -- the benchmark ---------------------------------------------------------------------------------------------
def test_census_benchmark_quick(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["census.py", "--quick"])
    runpy.run_path(str(BENCH / "census.py"), run_name="__main__")
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "census" and report["model"] == "tiny:llama"
    assert set(MINE) <= set(report["census"]["seconds_per_detector"])
    memory = report["census"]
    assert memory["peak_rss_mb_during_census"] >= memory["rss_mb_before_census"] > 0
    tl = report["transformer_lens"]
    if "skipped" not in tl:
        assert tl["median_s"]["ours_3_with_nulls"] > 0 and tl["ratio_tl_over_ours"] > 0
        # Same patterns, same batteries: TransformerLens's duplicate scores rank the heads as ours do.
        assert tl["spearman"]["duplicate_token"] > 0.9
