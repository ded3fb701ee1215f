"""bench/decoding.py's speculative section on a tiny model: drafter specs parse, every drafter's output is
checked against transformers' greedy, acceptance is counted from the verifications, threads are recorded."""

import runpy
from pathlib import Path

import pytest

from lmatlas.infer.decoding.drafters import PromptLookup
from lmatlas.model.tiny import tiny_model

DECODING = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "decoding.py"))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_drafter_specs_parse():
    parsed = DECODING["parse_drafters"]("prompt-lookup, heads:2@0.5,early-exit:1", 4)
    assert parsed == [
        ("ours_prompt_lookup_k4", "prompt-lookup", 4, 0.0),
        ("ours_heads_k2_p0.5", "heads", 2, 0.5),
        ("ours_early_exit_k1", "early-exit", 1, 0.0),
    ]


def test_acceptance_counts_tokens_and_forwards_with_a_draft():
    summary = DECODING["acceptance_summary"]([0, 2, 1, 0], [0, 4, 2, 2])
    assert summary["acceptance_rate"] == 3 / 8
    assert summary["forwards_with_draft"] == 3 and summary["first_token_acceptance"] == 2 / 3
    assert summary["mean_accepted_length"] == (1 + 3 + 2 + 1) / 4


def test_section_compares_every_drafter_with_greedy(model, tmp_path):
    drafters, _ = DECODING["build_drafters"](model, "prompt-lookup:3,early-exit:1,heads:1", 4, str(tmp_path / "none"))
    assert set(drafters) == {"ours_prompt_lookup_k3", "ours_early_exit_k1"}  # no heads trained: left out
    out = DECODING["speculative"](model, 2, 6, drafters)
    assert out["all_identical"] and out["prompts"] == 2 and not out["mismatches"]
    for name in ("greedy", "hf_prompt_lookup", *drafters):
        assert out["methods"][name]["identical_to_greedy"] == "2/2"
    early = out["methods"]["ours_early_exit_k1"]
    assert early["forwards_with_draft"] == early["verify_forwards"] > 0  # it always drafts one token
    assert 0.0 <= early["acceptance_rate"] <= 1.0


def test_a_wrong_drafter_is_still_greedy_and_counted_as_rejected(model):
    class Wrong(PromptLookup):
        def propose(self, state, k):
            return [(state.ids[-1] + 1) % 7] * k  # a draft unrelated to the model

    out = DECODING["speculative"](model, 1, 6, {"wrong": (Wrong(), 2)})
    assert out["all_identical"] and out["methods"]["wrong"]["identical_to_greedy"] == "1/1"
    wrong = out["methods"]["wrong"]
    assert set(wrong["drafted_histogram"]) <= {"1", "2"}  # 2, or what is left of the 6 tokens
    assert sum(wrong["drafted_histogram"].values()) == wrong["verify_forwards"] == wrong["forwards_with_draft"]


def test_auto_threads_calibrate_on_a_verify_forward(model):
    import torch

    before = torch.get_num_threads()
    try:
        chosen = DECODING["choose_bench_threads"](model, "auto")
        assert chosen["how"] == "calibrated" and chosen["threads"] == torch.get_num_threads()
        assert set(chosen["medians_s"]) == {str(n) for n in range(1, len(chosen["medians_s"]) + 1)}
        fixed = DECODING["choose_bench_threads"](model, "1")
        assert fixed["how"] == "as asked" and fixed["threads"] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
