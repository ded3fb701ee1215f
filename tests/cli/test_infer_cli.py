"""``lmatlas generate`` with KV options and ``lmatlas prune``: output, JSON, and bad input (exit 2, one line)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lmatlas.cli import app
from lmatlas.infer import HeadwiseCache, SnapCache, SnapPlan, choose
from lmatlas.model.loading import load

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_generate_with_a_budget_matches_the_library(model_dir):
    prompt = "the cat sat on the mat and then the cat sat on the mat again"
    result = invoke(
        "generate",
        model_dir,
        prompt,
        "--kv-budget",
        "0.5",
        "--random-seed",
        "3",
        "--sink",
        "2",
        "--recent",
        "8",
        "-n",
        "6",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model = load(model_dir)
    plan = choose.random_plan(model, 0.5, 3, sink=2, recent=8)
    ids = model.tokenize(prompt)["input_ids"]
    with torch.no_grad():
        cache = HeadwiseCache(model, plan)
        ref = model.hf.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=258)
    assert data["tokens"] == ref[0, ids.shape[1] :].tolist()
    assert data["plan"]["method"] == "random:3" and data["plan"]["full_kv_heads"] == 2
    assert data["kv_bytes"] == cache.nbytes()


def test_generate_with_snapkv_matches_the_library(model_dir):
    prompt = "the cat sat on the mat and then the cat sat on the mat again, and the dog sat on the rug"
    result = invoke("generate", model_dir, prompt, "--kv-snap", "40", "-n", "5", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model = load(model_dir)
    ids = model.tokenize(prompt)["input_ids"]
    assert ids.shape[1] > 40  # the prompt is compressed
    with torch.no_grad():
        cache = SnapCache(model, SnapPlan(capacity=40))
        ref = model.hf.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False, pad_token_id=258)
    assert data["tokens"] == ref[0, ids.shape[1] :].tolist()
    assert data["plan"] == {"method": "snapkv", "capacity": 40, "window": 32, "kernel": 5}
    assert data["kv_bytes"] == cache.nbytes()
    table = invoke("generate", model_dir, prompt, "--kv-snap", "40", "-n", "2")
    assert table.exit_code == 0 and "40 prompt entries each" in table.output


def test_generate_table_with_every_head_full(model_dir):
    """--kv-budget 1 keeps every KV head whole: the KV table is shown, no head is windowed."""
    result = invoke("generate", model_dir, "hello there", "-n", "3", "--kv-budget", "1")
    assert result.exit_code == 0, result.output
    assert "KV bytes held" in result.output


def test_generate_with_kv_and_edit_options_compares_under_the_cache(model_dir):
    result = invoke("generate", model_dir, "hello", "--kv-budget", "1", "--ablate", "L0.H1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kv"]["method"] == "full" and data["edit"] and "edited" in data


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kv-budget", "1.5"], "[0, 1]"),
        (["--kv-budget", "0.5", "--recent", "0"], "sink window"),
        (["--kv-budget", "0.5", "--atlas", "/nonexistent.duckdb"], "No atlas"),
        (["--kv-budget", "0.5"], "--atlas FILE"),
        (["--kv-snap", "16"], "must exceed the observation window"),
        (["--kv-snap", "64", "--kv-budget", "0.5"], "not both"),
        (["--kv-snap", "64", "--strategy", "speculative", "--drafter", "early-exit"], "cannot roll those writes back"),
        (["--strategy", "dola", "--drafter", "heads"], "--drafter goes with --strategy speculative"),
        (["--strategy", "beam"], "Unknown strategy"),
        (["-n", "0"], "at least one token"),
    ],
)
def test_generate_bad_input(model_dir, args, message):
    result = invoke("generate", model_dir, "hello", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_prune_random_reports_parameters(model_dir, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    result = invoke(
        "prune", model_dir, "--fraction", "0.25", "--random-seed", "0", "--text", str(text), "--windows", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["heads_removed"] == 2 and data["params_after"] < data["params_before"]
    assert data["perplexity_before"] > 1


def test_prune_bad_input(model_dir):
    result = invoke("prune", model_dir, "--fraction", "0.2")
    assert result.exit_code == 2 and "--atlas FILE" in result.output
    result = invoke("prune", model_dir, "--fraction", "2", "--random-seed", "1")
    assert result.exit_code == 2 and "[0, 1]" in result.output


def test_generate_composes_an_edit_a_kv_cache_and_a_strategy(model_dir):
    """The CLI's edit + --kv-budget + --strategy equals lmatlas.generate with the same three values."""
    import lmatlas
    from lmatlas.edit import Ablate, Edit
    from lmatlas.infer.generate import resolve_plan

    prompt = "abcabcabc abcabc xyz abcabcab abcabc"
    result = invoke(
        "generate",
        model_dir,
        prompt,
        "--ablate",
        "L0.H1",
        "--kv-budget",
        "0.5",
        "--random-seed",
        "3",
        "--sink",
        "2",
        "--recent",
        "8",
        "--strategy",
        "speculative",
        "-n",
        "8",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model = lmatlas.load(model_dir)
    plan = resolve_plan(model, 0.5, None, 2, 8, 3)
    ref = lmatlas.generate(
        model, prompt, 8, edit=Edit((Ablate("L0.H1"),)), kv=plan, strategy="speculative", compare=True
    )
    assert data["edited"]["ids"] == ref.edited.ids and data["plain"]["ids"] == ref.plain.ids
    assert data["strategy"] == "speculative" and data["kv"]["method"] == "random:3"


def test_generate_with_a_strategy_and_a_kv_cache_prints_one_report(model_dir):
    result = invoke(
        "generate", model_dir, "abcabc abcabc", "--kv-snap", "40", "--strategy", "dola", "-n", "4", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["strategy"] == "dola" and data["kv"]["method"] == "snapkv" and data["kv"]["bytes"] > 0
    assert len(data["report"]["premature_layers"]) == data["new_tokens"]
