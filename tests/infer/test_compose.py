"""One generate: every (edit) x (KV policy) x (strategy) combination against composing by hand.

* greedy + edit + policy: ``with model.hooked(replace=edit): hf.generate(past_key_values=policy cache)``;
* speculative + edit (+ policy) == greedy + edit (+ policy), token for token;
* DoLa + edit == DoLa on a copy of the model whose weights carry the same edit;
* SnapKV + edit == a full forward (no cache) under the edit whose attention hides, head by
  head, the prompt entries SnapKV evicted (an independent reference);
* DeCoRe + edit == DeCoRe on the weight-edited copy;
* compare=True with every policy: the edited side equals the edited generation, and each
  log-probability equals the one the policy's cache gives step by step.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from support.kv import attend, plain_scores
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

import lmatlas
from lmatlas.edit import Ablate, Edit, Scale
from lmatlas.errors import InputError
from lmatlas.infer import SnapPlan, make_plan
from lmatlas.infer.compose import COMBINATIONS
from lmatlas.infer.decoding.strategies import STRATEGIES, DeCoRe, Dola, Speculative
from lmatlas.infer.plan import choosable_layers
from lmatlas.infer.snap import SnapLayer
from lmatlas.model.handle import Model
from lmatlas.model.tiny import tiny_model

PROMPT = "abcabcabc abcabc xyz abcabcab"  # repeats: prompt lookup drafts and gets some accepted
NEW = 10
EDIT = Edit((Ablate("L0.H1"), Scale("L1.N5", 3.0)))


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model("llama")


def headwise(model: Model):
    """Half of the KV heads full, the others a sink of 2 + 6 recent (the prompt is ~30 tokens: evicts)."""
    full = [
        (layer, kv)
        for i, layer in enumerate(choosable_layers(model))
        for kv in range(model.layout.n_kv_heads)
        if (i + kv) % 2 == 0
    ]
    return make_plan(model, full, sink=2, recent=6)


def snap(model: Model):
    return SnapPlan(capacity=12, window=4, kernel=3)


POLICIES = {"default": lambda model: None, "headwise": headwise, "snapkv": snap}


def by_hand(model: Model, edit, kv, n: int = NEW) -> list[int]:
    """Greedy under ``edit`` with a fresh cache of ``kv``, composed by hand from the parts."""
    batch = model.tokenize(PROMPT)
    extra = {"past_key_values": kv.make_cache(model)} if kv is not None else {}
    with model.hooked(replace=edit) if edit is not None else torch.no_grad(), torch.no_grad():
        out = model.hf.generate(**batch, do_sample=False, max_new_tokens=n, pad_token_id=258, **extra)
    return out[0, batch["input_ids"].shape[1] :].tolist()


def weight_edited(model: Model) -> Model:
    """A copy whose weights carry EDIT: head L0.H1's columns of o_proj zeroed, L1's neuron 5 column of down_proj x3."""
    hf = copy.deepcopy(model.hf)
    d_head = model.layout.d_head
    with torch.no_grad():
        hf.model.layers[0].self_attn.o_proj.weight[:, d_head : 2 * d_head] = 0.0
        hf.model.layers[1].mlp.down_proj.weight[:, 5] *= 3.0
    return Model.from_hf(hf, model.tokenizer, source="tiny:llama-weight-edited")


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("edited", [False, True])
def test_greedy_with_edit_and_policy_equals_composing_by_hand(model, policy, edited):
    kv, edit = POLICIES[policy](model), EDIT if edited else None
    out = lmatlas.generate(model, PROMPT, NEW, edit=edit, kv=kv)
    assert out.token_ids == by_hand(model, edit, kv)
    assert out.strategy == "greedy" and (out.edit != []) == edited
    if kv is not None:
        assert out.kv["method"] == kv.describe()["method"] and out.kv["bytes"] > 0


def test_the_edit_and_the_policies_change_the_output(model):
    """The equivalences below would be empty if neither the edit nor the eviction did anything here."""
    plain = by_hand(model, None, None, 16)
    assert by_hand(model, EDIT, None, 16) != plain
    assert by_hand(model, None, headwise(model), 16) != plain


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("edited", [False, True])
def test_speculative_equals_greedy_with_the_same_edit_and_policy(model, policy, edited):
    kv, edit = POLICIES[policy](model), EDIT if edited else None
    out = lmatlas.generate(model, PROMPT, NEW, edit=edit, kv=kv, strategy="speculative")
    assert out.token_ids == by_hand(model, edit, kv)
    assert out.report["verify_forwards"] < NEW, "no draft was ever accepted: the verification path went untested"


@pytest.mark.parametrize("policy", ["default", "headwise"])
@pytest.mark.parametrize("edited", [False, True])
def test_early_exit_drafter_equals_greedy_with_the_same_edit_and_policy(model, policy, edited):
    kv, edit = POLICIES[policy](model), EDIT if edited else None
    out = lmatlas.generate(model, PROMPT, NEW, edit=edit, kv=kv, strategy=Speculative(drafter="early-exit", layers=1))
    assert out.token_ids == by_hand(model, edit, kv)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_dola_with_edit_equals_dola_on_weight_edited_model(model, policy):
    kv = POLICIES[policy](model)
    strategy = Dola(premature_layers=[0, 1])
    edited = lmatlas.generate(model, PROMPT, NEW, edit=EDIT, kv=kv, strategy=strategy)
    copy_model = weight_edited(model)
    reference = lmatlas.generate(copy_model, PROMPT, NEW, kv=POLICIES[policy](copy_model), strategy=strategy)
    assert edited.token_ids == reference.token_ids
    assert edited.report["premature_layers"] == reference.report["premature_layers"]
    assert edited.token_ids != lmatlas.generate(model, PROMPT, NEW, kv=kv, strategy=strategy).token_ids


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_decore_with_edit_equals_decore_on_weight_edited_model(model, policy):
    strategy = DeCoRe(heads=("L1.H2",))
    edited = lmatlas.generate(model, PROMPT, NEW, edit=EDIT, kv=POLICIES[policy](model), strategy=strategy)
    copy_model = weight_edited(model)
    reference = lmatlas.generate(copy_model, PROMPT, NEW, kv=POLICIES[policy](copy_model), strategy=strategy)
    assert edited.token_ids == reference.token_ids
    torch.testing.assert_close(
        torch.tensor(edited.report["alphas"]), torch.tensor(reference.report["alphas"]), rtol=1e-4, atol=1e-5
    )


def _hiding_attention(module, query, key, value, attention_mask, *args, kept, n_prompt, **kwargs):
    """Plain attention over the whole sequence; rows after the prompt do not see evicted prompt entries."""
    scores, values, allowed = plain_scores(query, key, value, attention_mask, kwargs)
    n, rep = query.shape[2], query.shape[1] // key.shape[1]
    for kv, positions in enumerate(kept.get(module.layer_idx, [])):
        hidden = torch.ones(n, dtype=torch.bool)
        hidden[list(positions)] = False
        hidden[n_prompt:] = False
        allowed[:, kv * rep : (kv + 1) * rep, n_prompt:, :] &= ~hidden
    return attend(query, scores, values, allowed)


def test_snapkv_with_edit_equals_the_masked_reference_with_the_edit(model):
    plan = snap(model)
    batch = model.tokenize(PROMPT)
    n_prompt = batch["input_ids"].shape[1]
    cache = plan.make_cache(model)
    with model.hooked(replace=EDIT), torch.no_grad():
        out = model.hf.generate(
            **batch,
            past_key_values=cache,
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=258,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert out.sequences[0, n_prompt:].tolist() == lmatlas.generate(model, PROMPT, NEW, edit=EDIT, kv=plan).token_ids
    kept = {
        i: [set(p) for p in layer.positions[0, :, : plan.capacity].tolist()]
        for i, layer in enumerate(cache.layers)
        if isinstance(layer, SnapLayer)
    }
    name = "compose_snapref"
    AttentionInterface.register(name, partial(_hiding_attention, kept=kept, n_prompt=n_prompt))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"])
    config = model.hf.config
    saved, config._attn_implementation = config._attn_implementation, name
    try:
        with model.hooked(replace=EDIT), torch.no_grad():
            ref = model.hf(out.sequences[:, :-1], use_cache=False).logits
    finally:
        config._attn_implementation = saved
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], ref[0, n_prompt - 1 + step], rtol=1e-4, atol=1e-4)


def _stepwise_logprobs(model: Model, edit, kv, new: list[int]) -> list[float]:
    """Each token's log-probability fed one at a time through a fresh cache of ``kv`` under ``edit``."""
    batch = model.tokenize(PROMPT)
    cache = kv.make_cache(model) if kv is not None else None
    out, ids = [], batch["input_ids"]
    with model.hooked(replace=edit) if edit is not None else torch.no_grad(), torch.no_grad():
        for token in new:
            logits = model.hf(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
            out.append(float(torch.log_softmax(logits.float(), -1)[token]))
            ids = torch.tensor([[token]]) if cache is not None else torch.cat([ids, torch.tensor([[token]])], 1)
    return out


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("strategy", [None, "speculative"])
def test_compare_with_every_policy(model, policy, strategy):
    kv = POLICIES[policy](model)
    comparison = lmatlas.generate(model, PROMPT, NEW, edit=EDIT, kv=kv, strategy=strategy, compare=True)
    assert comparison.edited.ids == by_hand(model, EDIT, kv)
    assert comparison.plain.ids == by_hand(model, None, kv)
    assert comparison.kv["method"] == (kv.describe()["method"] if kv is not None else "default")
    for side in (comparison.plain, comparison.edited):
        for edit, got in ((None, side.logprob_plain), (EDIT, side.logprob_edited)):
            want = _stepwise_logprobs(model, edit, kv, side.ids)
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)


def test_model_generate_passes_through(model):
    assert (
        model.generate(PROMPT, NEW, edit=EDIT, kv=headwise(model))
        == lmatlas.generate(model, PROMPT, NEW, edit=EDIT, kv=headwise(model)).text
    )
    assert isinstance(model.generate(PROMPT, 2), str)
    assert isinstance(model.generate([PROMPT, PROMPT], 2), list)


def test_refusals_say_why_before_any_compute(model):
    with pytest.raises(InputError, match="early-exit drafter"):
        lmatlas.generate(model, PROMPT, NEW, kv=snap(model), strategy=Speculative(drafter="early-exit", layers=1))
    with pytest.raises(InputError, match="Unknown strategy"):
        lmatlas.generate(model, PROMPT, NEW, strategy="beam")
    with pytest.raises(InputError, match="greedily"):
        lmatlas.generate(model, PROMPT, NEW, strategy="dola", do_sample=True)
    with pytest.raises(InputError, match="not a KV policy"):
        model.generate(PROMPT, NEW, kv=object())
    with pytest.raises(InputError, match="context"):
        lmatlas.generate(model, "a" * 300, NEW)  # the tiny model's context is 256 tokens
    with pytest.raises(InputError, match="at most"):
        lmatlas.generate(model, "a" * 250, 20)
    with pytest.raises(InputError, match="padded"):
        lmatlas.generate(model, ["a", "abc"], 2, kv=headwise(model))


def test_combinations_table_names_every_strategy():
    named = " ".join(row[2] for row in COMBINATIONS).lower()
    assert all(strategy in named for strategy in STRATEGIES)


def test_the_cli_names_are_the_registries_keys():
    from lmatlas.infer.decoding.drafters import DRAFTERS
    from lmatlas.infer.decoding.names import DRAFTER_NAMES, STRATEGY_NAMES

    assert STRATEGY_NAMES == tuple(STRATEGIES) and DRAFTER_NAMES == tuple(DRAFTERS)


def test_a_prompt_longer_than_the_context_is_refused_before_any_forward(model):
    """Model.run, the lens and generate all tokenize through Model.tokenize, which refuses it."""
    calls = []
    with model.hooked(replace={"L0.resid.pre": lambda value, ctx: calls.append(1)}):
        with pytest.raises(InputError, match="300 tokens; this model's context is 256"):
            model.run("a" * 300)
        with pytest.raises(InputError, match="context"):
            model.generate("a" * 300, 4)
    assert calls == []


@pytest.mark.slow
def test_the_triple_on_the_packaged_model(smollm2):
    """SmolLM2: an edit + SnapKV + speculative decoding == greedy with the same edit and SnapKV, and DoLa
    + the edit runs under both KV policies (a 200-token prompt, so SnapKV evicts)."""
    from lmatlas.infer import choose

    text = ("The quick brown fox jumps over the lazy dog. " * 20) + "The quick brown"
    edit = Edit((Scale("L10.H2", 0.0), Scale("L12.N100", 2.0)))
    plan = SnapPlan(capacity=64)
    spec = lmatlas.generate(smollm2, text, 12, edit=edit, kv=plan, strategy="speculative")
    batch = smollm2.tokenize(text)
    assert batch["input_ids"].shape[1] > plan.capacity + plan.window
    with smollm2.hooked(replace=edit), torch.no_grad():
        ref = smollm2.hf.generate(
            **batch,
            past_key_values=plan.make_cache(smollm2),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=smollm2.tokenizer.eos_token_id,
        )
    assert spec.token_ids == ref[0, batch["input_ids"].shape[1] :].tolist()
    assert spec.report["mean_accepted_length"] > 1.5  # the repeated text is drafted and accepted
    for kv in (plan, choose.uniform(smollm2, sink=4, recent=64)):
        out = lmatlas.generate(smollm2, text, 6, edit=edit, kv=kv, strategy="dola")
        assert len(out.report["premature_layers"]) == len(out.token_ids) > 0 and out.kv["bytes"] > 0
