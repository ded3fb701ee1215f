"""The decoding cost model (bench/decoding_costs.py): its formulas against direct sums, and a quick run."""

import runpy
from pathlib import Path

import pytest

from lmatlas.model.tiny import tiny_model

COSTS = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "decoding_costs.py"))


@pytest.mark.parametrize("k,p", [(1, 0.3), (4, 0.5), (5, 0.6), (8, 0.95), (3, 0.0), (2, 1.0)])
def test_tokens_per_forward_is_the_sum_of_accepted_prefix_probabilities(k, p):
    # one token always (the model's own), plus draft i when drafts 1..i were all accepted
    assert COSTS["tokens_per_forward"](k, p) == pytest.approx(sum(p**i for i in range(k + 1)))


def test_least_acceptance_reaches_the_target_exactly_and_refuses_the_impossible():
    p = COSTS["least_acceptance"](4, 1.946)
    assert COSTS["tokens_per_forward"](4, p) / 1.946 == pytest.approx(1.2, abs=1e-9)
    assert COSTS["tokens_per_forward"](4, p - 1e-3) / 1.946 < 1.2
    assert COSTS["least_acceptance"](1, 1.781) is None  # 2 tokens / 1.781 < 1.2 even if all accepted


def test_the_cost_model_runs_on_a_tiny_model():
    model = tiny_model("llama")
    curve = COSTS["verify_curve"](model, context=8, max_draft=2, repeats=1)
    assert [r["draft"] for r in curve["rows"]] == [0, 1, 2] and curve["rows"][0]["cost_vs_greedy_step"] == 1.0
    step = COSTS["dola_step"](model, context=8, repeats=1)
    assert step["candidates"] and step["macs_per_token"]["readouts"] == (
        len(step["candidates"]) * model.layout.d_model * model.hf.config.vocab_size
    )
    assert set(step["seconds_median"]) == {"greedy_step", "tapped_step", "readout", "jsd_and_contrast"}


def test_thread_crossover_times_every_count_against_one():
    import torch

    from lmatlas.model.tiny import tiny_model

    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            data = COSTS["thread_crossover"](tiny_model("llama"), context=8, repeats=2, sizes=(1, 4))
    finally:
        torch.set_num_threads(before)
    assert [row["new_tokens"] for row in data["rows"]] == [1, 4] and data["thread_counts"][0] == 1
    for row in data["rows"]:
        assert row["vs_one_thread"]["1"] == 1.0 and set(row["median_s"]) == {str(c) for c in data["thread_counts"]}
