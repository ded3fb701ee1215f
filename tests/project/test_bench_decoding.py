"""bench/decoding.py's sections run on a tiny model through the library's one generate, and the cheaper
DoLa variants' multiple-choice scores reduce to the published one when they keep every token."""

import runpy
from pathlib import Path

import pytest
import torch

from lmatlas.infer.decoding.dola import candidate_layers
from lmatlas.model.tiny import tiny_model

DECODING = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "decoding.py"))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_with_answer_puts_the_answer_first_and_keeps_k_ids():
    top, answer = torch.tensor([[5, 3, 9], [1, 2, 4]]), torch.tensor([9, 7])
    assert DECODING["with_answer"](top, answer).tolist() == [[9, 5, 3], [7, 1, 2]]


def test_top_k_over_the_whole_vocabulary_is_the_published_score(model, monkeypatch):
    layers = candidate_layers(model.hf, "high")
    scores = DECODING["answer_scores"](model, layers, "abc", "def")
    assert set(scores) == {"greedy", "dola", "dola_half", "dola_top50", "dola_top200"}
    whole = model.hf.config.vocab_size
    monkeypatch.setitem(DECODING["answer_scores"].__globals__, "TOP_KS", (whole,))
    again = DECODING["answer_scores"](model, layers, "abc", "def")
    assert again[f"dola_top{whole}"] == pytest.approx(scores["dola"], abs=1e-4)
    assert again["greedy"] == scores["greedy"]


def test_cost_and_faithfulness_sections_run_every_strategy(model):
    cost = DECODING["cost_per_token"](model, ["L0.H0"], prompts=1, new_tokens=3, repeats=2)
    assert set(cost["methods"]) == {"greedy", "dola", "dola_half", "dola_top50", "dola_top200", "decore"}
    assert cost["methods"]["greedy"]["vs_greedy"] == 1.0
    assert all(row["tokens"] == 6 for row in cost["methods"].values())
    assert cost["methods"]["greedy"]["median_round_ratio"] == cost["methods"]["greedy"]["cpu_vs_greedy"] == 1.0
    assert set(DECODING["cost_per_token"](model, None, prompts=1, new_tokens=2)["methods"]) == set(DECODING["METHODS"])
    battery = DECODING["faithfulness"](model, ["L0.H0"], ["L1.H1"], countries=2, new_tokens=2)
    assert battery["items"] == 4 and set(battery["methods"]) == {"greedy", "decore", "decore_random_heads", "dola"}


def test_question_scores_equal_one_forward_per_answer(model):
    """The batched scorer (prompt cache reused, answers right-padded in one forward, divergences shared by
    the published and half-layer methods) gives every answer the score of its own uncached forward."""
    layers = [1, 0]  # half the layers = [1]; the published method may choose 0
    answers = ["yes", "no, it does not happen at all", "perhaps so", "x", "no, it does", "no"]
    batched = DECODING["question_scores"](model, layers, "What happens if it rains?", answers)
    assert list(batched) == answers
    for answer in answers:
        alone = DECODING["answer_scores"](model, layers, "What happens if it rains?", answer)
        assert set(batched[answer]) == set(alone)
        for method, value in alone.items():
            assert batched[answer][method] == pytest.approx(value, abs=1e-4), (answer, method)
    assert any(abs(batched[a]["dola"] - batched[a]["dola_half"]) > 1e-2 for a in answers)


def test_shared_positions_number_equal_prefixes_once():
    where, first = DECODING["shared_positions"]([[7, 1, 2], [7, 1, 3, 4], [7, 5, 6]])
    assert where == [[0, 1], [0, 1, 2], [0, 3]]
    assert first == [(0, 0), (0, 1), (1, 2), (2, 1)]


def test_truthfulqa_runs_over_row_ranges_merge_into_the_whole_run(model, tmp_path):
    import csv
    import json

    path = tmp_path / "tqa.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["Question", "Best Answer", "Correct Answers", "Incorrect Answers"])
        writer.writeheader()
        for q in ("Is it wet?", "Is it dry?", "Is it hot?"):
            writer.writerow(
                {"Question": q, "Best Answer": "yes", "Correct Answers": "yes; sure", "Incorrect Answers": "no"}
            )
    whole = DECODING["truthfulqa"](model, str(path), 0)
    checkpoints = []
    parts = [
        DECODING["truthfulqa"](model, str(path), 2),
        DECODING["truthfulqa"](model, str(path), 0, first=2, checkpoint=checkpoints.append),
    ]
    records = []
    for i, part in enumerate(parts):
        records.append(tmp_path / f"part{i}.json")
        records[-1].write_text(json.dumps({"sections": {"truthfulqa": part | {"conditions": {}}}}))
    merged = DECODING["merge_truthfulqa"]([str(r) for r in reversed(records)])
    assert merged["questions"] == 3 and merged["subset"] == "the first rows of the file"
    assert merged["per_question"] == whole["per_question"]
    assert merged["mc2"] == whole["mc2"] and merged["mc1"] == whole["mc1"]
    assert parts[1]["first_question"] == 2 and parts[1]["questions"] == 1 and checkpoints == []
    again = tmp_path / "merged.json"
    again.write_text(json.dumps({"sections": {"truthfulqa": DECODING["merge_truthfulqa"]([str(records[0])])}}))
    assert DECODING["merge_truthfulqa"]([str(again), str(records[1])])["per_question"] == whole["per_question"]
    with pytest.raises(ValueError, match="overlap"):
        DECODING["merge_truthfulqa"]([str(again), str(records[0])])
