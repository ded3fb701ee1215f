"""The census memory benchmark measures what it says, against a reference it does not compute itself.

The reference is the storage of the attention patterns Hugging Face's own eager attention
returns (``output_attentions=True``) for the same model and length, summed here from the
tensors' storages. The benchmark's kernel-measured peaks must see that storage when the
patterns are captured, and the streaming statistics must stay far below it (a chunk of
query rows at a time) and grow linearly with the length.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "census_memory.py"
MB = 2**20


def run_benchmark(*args: str) -> dict:
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def eager_pattern_bytes(hf_model, tokens: int) -> int:
    """Bytes held by the attention patterns of every layer for one sequence, from HF's eager attention."""
    config = hf_model.config
    saved = config._attn_implementation
    hf_model.set_attn_implementation("eager")
    try:
        ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            attentions = hf_model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    finally:
        hf_model.set_attn_implementation(saved)
    assert len(attentions) == config.num_hidden_layers
    storages = {a.untyped_storage().data_ptr(): a.untyped_storage().nbytes() for a in attentions}
    return sum(storages.values())


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory):
    """The tiny llama with a 4,096-token context, saved as a directory ``bench/census_memory.py`` loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmatlas.model.tiny import _SPECIAL_IDS, TINY_CONFIGS, byte_tokenizer

    config = AutoConfig.for_model("llama", **{**_SPECIAL_IDS, **TINY_CONFIGS["llama"], "max_position_embeddings": 4096})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama-4k")
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder, model


def test_census_memory_benchmark_quick():
    """``--quick`` (tiny:llama at 64 and 128 tokens) runs and reports every row it promises."""
    from lmatlas.model.tiny import tiny_hf_model

    report = run_benchmark("--quick")
    assert report["benchmark"] == "census_memory" and report["model"] == "tiny:llama"
    assert [row["tokens"] for row in report["results"]] == [64, 128]
    hf = tiny_hf_model("llama")
    for row in report["results"]:
        assert row["hwm_reset"] and row["stats_peak_mb"] >= 0 and row["plain_peak_mb"] >= 0
        assert row["full_pattern_mb"] == round(eager_pattern_bytes(hf, row["tokens"]) / MB, 1)
    assert report["capture"][0]["kept_mb"] == pytest.approx(eager_pattern_bytes(hf, 64) / MB, abs=0.01)
    assert {"stats_fit", "plain_fit", "stats_peak_ratio", "full_pattern_ratio"} <= set(report["growth"])


def test_peaks_against_the_patterns_hf_holds(long_tiny):
    """At 1k and 2k tokens: capturing the patterns costs at least their storage; the statistics a
    fraction of one layer's pattern, growing linearly (x2 from 1k to 2k tokens; a pattern grows x4)."""
    folder, hf = long_tiny
    report = run_benchmark(
        "--model",
        str(folder),
        "--lengths",
        "1024",
        "2048",
        "--capture-lengths",
        "2048",
        "--layers",
        "0",
        "--chunk",
        "32",
    )
    pattern_mb = eager_pattern_bytes(hf, 2048) / MB  # every layer's [1, head, T, T]
    one_layer_mb = pattern_mb / hf.config.num_hidden_layers
    assert pattern_mb == pytest.approx(128.0)  # 2 layers x 4 heads x 2048^2 float32: the reference is what HF holds
    capture = report["capture"][0]
    assert capture["hwm_reset"] and capture["kept_mb"] == pytest.approx(pattern_mb, rel=0.01)
    assert capture["capture_peak_mb"] >= 0.95 * pattern_mb, capture  # the kernel saw the patterns being held
    rows = {row["tokens"]: row for row in report["results"]}
    assert all(row["hwm_reset"] for row in rows.values())
    for tokens, row in rows.items():
        assert row["full_pattern_mb"] == pytest.approx(pattern_mb * (tokens / 2048) ** 2, abs=0.1)
        # streaming holds a chunk of query rows, never a layer's pattern (16 and 64 MB here; measured peaks
        # 3.1 and 6.2 MB, of which 0.6 and 1.6 MB above the plain forward's)
        layer_pattern_mb = one_layer_mb * (tokens / 2048) ** 2
        assert row["stats_peak_mb"] < 0.5 * layer_pattern_mb and row["stats_extra_mb"] < 0.25 * layer_pattern_mb, row
    assert rows[2048]["stats_peak_mb"] / rows[1024]["stats_peak_mb"] < 3, rows  # linear: 2; quadratic: 4


def test_the_record_shows_memory_linear_in_the_context_length():
    """``bench/results/census_memory.json`` (SmolLM2-135M, 1k-8k tokens) backs the README's "memory linear
    in the context length": the statistics' peak grows like the length (x8), a full pattern like its square."""
    record = json.loads((BENCH.parent / "results" / "census_memory.json").read_text())
    assert record["benchmark"] == "census_memory" and record["model"] == "smollm2-135m"
    assert record["command"].startswith("python bench/census_memory.py") and record["commit"]
    assert "load average" in record["uptime_before"] and "load average" in record["uptime_after"]
    rows = record["results"]
    assert [row["tokens"] for row in rows] == [1024, 2048, 4096, 8192]
    assert all(row["hwm_reset"] for row in rows) and all(row["hwm_reset"] for row in record["capture"])
    growth = record["growth"]
    assert growth["length_ratio"] == 8 and growth["full_pattern_ratio"] == 64
    assert growth["stats_peak_ratio"] < 1.25 * growth["length_ratio"], growth  # measured 7.09
    assert growth["stats_fit"]["r2"] > 0.99 and abs(growth["stats_fit"]["quadratic_share_at_max"]) < 0.05, growth
    for row in rows:  # the statistics' own cost against one layer's full pattern (9 heads x T^2 float32):
        one_layer_mb = record["heads"] * row["tokens"] ** 2 * 4 / MB  # measured 10% of it at 1k, 1.5% at 8k
        assert row["stats_extra_mb"] < 0.25 * one_layer_mb, row
    assert rows[-1]["stats_extra_mb"] < 0.05 * record["heads"] * 8192**2 * 4 / MB
    for row in record["capture"]:  # capturing the patterns: the kernel's peak holds at least what was kept
        assert row["capture_peak_mb"] >= row["kept_mb"] > 0, row
