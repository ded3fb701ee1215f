"""bench/kvcache.py's paired grid on a tiny model: a cheap cell, its metrics checked independently, and resume.

* the scored log-probabilities equal one plain forward over prompt + answer (no cache);
* the full cache paired with itself: zero drop, zero KL, interval [0, 0];
* the bootstrap interval of a known sample contains its mean and shrinks with more trials;
* a second run of the same grid measures nothing new (every line is already in the JSONL);
* the tasks' prompts hold what their answers say: the multikey needle asked for, and the vt chain
  resolved by following the assignments in the decoded prompt (plain Python);
* ``chosen`` and the content mask read the distributions as a hand computation does.
"""

from __future__ import annotations

import json
import random
import re
import runpy
from pathlib import Path

import pytest
import torch
from kv_metrics import compare, paired_bootstrap, score
from kv_tasks import make_trial

from lmatlas.infer import choose
from lmatlas.infer.needle import Haystack
from lmatlas.model.tiny import tiny_model

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "kvcache.py"))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def haystack(model):
    return Haystack(model.tokenizer)


def test_scores_equal_a_plain_forward_and_the_full_pair_is_zero(model, haystack):
    trial = make_trial(haystack, "passkey", 300, 0, 2, 0, {})
    full = score(model, trial.prompt_ids, trial.answer_ids)
    ids = torch.tensor([list(trial.prompt_ids + trial.answer_ids)])
    with torch.no_grad():
        logits = model.hf(ids).logits[0, len(trial.prompt_ids) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(trial.answer_ids)[:, None])[:, 0]
    torch.testing.assert_close(full.token_logprob, expected, atol=1e-4, rtol=1e-4)
    same = compare(full, full, trial)
    assert same["logprob_drop"] == 0 and same["kl"] == 0
    windowed = score(model, trial.prompt_ids, trial.answer_ids, choose.uniform(model, 2, 16).make_cache(model))
    paired = compare(full, windowed, trial)
    assert paired["kl"] > 0 and paired["kv_bytes"] < same["kv_bytes"]
    assert trial.answer in "".join(model.tokenizer.decode(list(trial.prompt_ids)).split())  # the needle is there


def test_bootstrap_brackets_the_mean_and_narrows():
    rng = random.Random(0)
    small = [rng.gauss(0.3, 1.0) for _ in range(30)]
    large = [rng.gauss(0.3, 1.0) for _ in range(600)]
    a, b = paired_bootstrap(small, 1000), paired_bootstrap(large, 1000)
    assert a["low"] < a["mean"] < a["high"] and b["low"] < 0.3 < b["high"]
    assert b["high"] - b["low"] < a["high"] - a["low"]
    assert paired_bootstrap([0.0] * 5) == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 5}


def test_a_tiny_cell_runs_pairs_and_resumes(tmp_path):
    scores, out = tmp_path / "scores.json", tmp_path / "cell.json"
    common = ["--model", "tiny:llama", "--recent", "16", "--scores", str(scores)]
    BENCH["main"]([*common, "--rank", "grad", "--rank-lengths", "300", "--rank-trials", "1"])
    assert "grad" in json.loads(scores.read_text())["rankings"]
    grid = [*common, "--lengths", "300", "--trials", "2", "--tasks", "passkey", "continue", "--continuation", "16"]
    grid += ["--methods", "full,grad@0.5,grad+fp@0.5,grad+hybrid@0.5,snapkv@0.5", "--out", str(out)]
    BENCH["main"](grid)
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 5
    record = json.loads(out.read_text())
    rows = {(r["task"], r["method"]): r for r in record["summary"]}
    assert rows["passkey", "full"]["logprob_drop"]["high"] == 0 and rows["passkey", "full"]["kv_ratio_vs_full"] == 1
    assert rows["continue", "grad@0.5"]["kv_ratio_vs_full"] > 1.2 and rows["continue", "grad@0.5"]["kl"]["mean"] > 0
    assert record["conditions"]["load_before"] and rows["passkey", "snapkv@0.5"]["threads"] == [1]
    BENCH["main"](grid)
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == len(lines)


def test_multikey_prompt_holds_distinct_needles_and_the_asked_one(model, haystack):
    trial = make_trial(haystack, "multikey", 400, 1, 4, 0, {"keys": 3})
    text = model.tokenizer.decode(list(trial.prompt_ids))
    needles = re.findall(r"(The [a-z ]+) is (\d{5})\.", text)
    assert len(needles) == 3 and len({k for k, _ in needles}) == 3
    asked = re.search(r"Question: What is ([a-z ]+)\?", text).group(1)
    assert dict(needles)[asked[0].upper() + asked[1:]] == trial.answer
    firsts = [model.tokenizer.decode([c]) for c in trial.choices]
    assert sorted(firsts) == sorted(n[0] for _, n in needles) and len(set(firsts)) == 3
    assert firsts[0] == trial.answer[0] and trial.content[trial.choice_at]


@pytest.mark.parametrize(
    "options",
    [
        {"hops": 1},
        {"hops": 2},
        {"hops": 1, "vt_header": True},
        {"hops": 2, "vt_form": "number", "vt_header": True},
        {"hops": 1, "chains": 1, "decoys": 2, "vt_header": True},  # the benchmark's default
    ],
)
def test_vt_answer_follows_the_chain_in_the_prompt(model, haystack, options):
    trial = make_trial(haystack, "vt", 500, 0, 3, 1, {"chains": 2, **options})
    check_vt_trial(model.tokenizer, trial, {"chains": 2, **options}, 500)


def check_vt_trial(tokenizer, trial, options, length):
    """Follow the asked variable's assignments through the decoded prompt, in plain Python, to its number."""
    assert len(trial.prompt_ids) == length
    text = tokenizer.decode(list(trial.prompt_ids))
    assign = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", text))
    hops = options["hops"]
    assert len(assign) == options["chains"] * (hops + 1) + options.get("decoys", 0)
    asked = re.findall(r"What number is VAR (\w+) equal to", text)
    assert len(asked) == (2 if options.get("vt_header") else 1) and len(set(asked)) == 1
    name, chain = asked[0], []
    while assign[name].startswith("VAR"):
        name = assign[name].split()[1]
        chain.append(name)
    assert assign[name] == trial.answer and len(chain) == hops
    numbers = [v for v in assign.values() if v.isdigit()]
    firsts = [tokenizer.decode([c]) for c in trial.choices]
    assert sorted(firsts) == sorted(n[0] for n in numbers) and firsts[0] == trial.answer[0]
    recital = tokenizer.decode(list(trial.answer_ids))
    if options.get("vt_form") == "number":
        assert recital == " " + trial.answer and text.endswith("Answer: The number is")
        return
    assert recital == "".join(f" VAR {n} =" for n in chain) + " " + trial.answer
    counted = tokenizer.decode([t for t, keep in zip(trial.answer_ids, trial.content) if keep])
    assert counted.replace(" ", "") == "".join(chain) + trial.answer  # the names and digits count, not the format


@pytest.mark.slow
def test_vt_in_smollm2s_chat_template(smollm2):
    """The benchmark's vt prompt as SmolLM2 reads it: the chat template around header, essay and question."""
    options = {"hops": 1, "chains": 1, "decoys": 2, "vt_header": True, "chat": True}
    trial = make_trial(Haystack(smollm2.tokenizer), "vt", 1024, 3, 20, 0, options)
    check_vt_trial(smollm2.tokenizer, trial, options, 1024)
    text = smollm2.tokenizer.decode(list(trial.prompt_ids))
    assert text.count("<|im_start|>user\nMemorize") == 1 and text.endswith(
        "<|im_start|>assistant\nVAR " + text.split()[-2] + " ="
    )


def test_chosen_and_content_read_the_distributions(model, haystack):
    trial = make_trial(haystack, "multikey", 300, 0, 2, 0, {"keys": 3})
    full = score(model, trial.prompt_ids, trial.answer_ids)
    logp = full.logp.clone()
    row = logp[trial.choice_at]
    row[list(trial.choices)] = torch.tensor([-1.0, -0.5, -2.0])  # a distractor's first digit is likelier
    forced = type(full)(logp, full.token_logprob, full.kv_bytes, full.kv_bytes_prefill, 0.0, 0.0)
    assert compare(full, forced, trial)["chosen"] is False
    row[list(trial.choices)] = torch.tensor([-0.1, -0.5, -2.0])
    assert compare(full, forced, trial)["chosen"] is True
    dropped = full.token_logprob.clone()
    dropped[0] -= 3.0  # the space before the number is format: it does not count
    shifted = type(full)(full.logp, dropped, full.kv_bytes, full.kv_bytes_prefill, 0.0, 0.0)
    assert not trial.content[0] and compare(full, shifted, trial)["logprob_drop"] == 0


def test_speed_ratios_are_the_rounds_divided(tmp_path):
    """bench/kvcache_speed.py on a tiny model: the summary re-derived from the raw rounds; the gates keep every entry."""
    speed = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "kvcache_speed.py"))
    scores, out = tmp_path / "scores.json", tmp_path / "speed.json"
    scores.write_text(json.dumps({"rankings": {"duo": {"kv_scores": [[1.0, 0.0], [0.0, 0.5]]}}}))
    methods = "full,duo@0.5,gates@0.5,duo+fp@0.5,duo+hybrid@0.5"
    speed["main"](
        ["--model", "tiny:llama", "--scores", str(scores), "--lengths", "300", "--rounds", "2"]
        + ["--tokens", "3", "--recent", "16", "--methods", methods, "--out", str(out)]
    )
    cell = json.loads(out.read_text())["cells"][0]
    for method, row in cell["summary"].items():
        pre = sorted(r[method]["prefill_s"] / r["full"]["prefill_s"] for r in cell["rounds"])
        assert row["prefill_ratio_median"] == pytest.approx(sum(pre) / 2, abs=1e-3)
        full_bytes, own = cell["rounds"][0]["full"]["kv_bytes"], cell["rounds"][0][method]["kv_bytes"]
        assert row["kv_ratio_vs_full"] == pytest.approx(full_bytes / own, abs=1e-3)
    assert (
        cell["summary"]["gates@0.5"]["kv_ratio_vs_full"] == 1 and cell["summary"]["duo@0.5"]["kv_ratio_vs_full"] > 1.2
    )


def test_layer_bytes_are_the_entries_each_layer_holds(tmp_path):
    """bench/kvcache_layer_bytes.py on a tiny Gemma 3: a full layer holds 2 x kv_heads x head_dim x tokens floats."""
    script = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "kvcache_layer_bytes.py"))
    out = tmp_path / "bytes.json"
    script["main"](["--model", "tiny:gemma3_text", "--length", "300", "--recent", "16", "--out", str(out)])
    record = json.loads(out.read_text())
    rows = {r["method"]: r for r in record["rows"]}
    (full_layer,) = record["choosable_layers"]
    sliding = [i for i, kind in enumerate(record["layer_types"]) if kind != "full_attention"]
    head_dim = 16  # the tiny gemma3_text config
    entry = 2 * record["n_kv_heads"] * head_dim * 4  # keys + values, float32
    assert rows["default"]["layer_bytes"][full_layer] == entry * 301  # the prompt and the decoded token
    assert rows["1 full layers"]["layer_bytes"][full_layer] == entry * 301
    windowed = rows["0 full layers"]["layer_bytes"][full_layer]
    assert entry * (4 + 16 - 1) <= windowed < entry * 40  # sink + recent - 1 entries, plus their positions
    assert record["per_layer"] == {
        "full_layer_bytes": entry * 301,
        "windowed_layer_bytes": windowed,
        "freed_per_layer_windowed": entry * 301 - windowed,
    }
    for i in sliding:  # the model's own sliding layers hold the same under every head-wise plan
        assert rows["0 full layers"]["layer_bytes"][i] == rows["1 full layers"]["layer_bytes"][i] > 0


def test_shards_duplicate_lines_are_read_once(tmp_path):
    """Two shards that both measured a trial: the summary reads the first line of it, once."""
    path = tmp_path / "cell.jsonl"
    rows = [{"task": "vt", "length": 300, "index": i, "method": "full", "n": n} for i, n in ((0, 1), (1, 2), (0, 3))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, done = BENCH["done_keys"](path)
    assert [r["n"] for r in records] == [1, 2] and done == {("vt", 300, 0, "full"), ("vt", 300, 1, "full")}
