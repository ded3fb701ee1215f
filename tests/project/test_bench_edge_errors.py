"""bench/causal.py --edge-errors keeps running: a tiny-model record checked against direct computations."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from lmatlas.causal import load_task
from lmatlas.model.tiny import tiny_model

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "causal.py"))


def _write(cache_clean, cache_corrupt, source: str) -> torch.Tensor:
    """``source``'s clean-minus-corrupt write, from plain captures."""
    if source == "embed":
        return cache_clean["L0.resid.pre"] - cache_corrupt["L0.resid.pre"]
    layer, part = source.split(".")
    if part == "mlp":
        return cache_clean[f"{layer}.mlp.out"] - cache_corrupt[f"{layer}.mlp.out"]
    head = int(part[1:])
    return cache_clean[f"{layer}.attn.out"][:, :, head] - cache_corrupt[f"{layer}.attn.out"][:, :, head]


def test_edge_errors_record_agrees_with_direct_computations(tmp_path):
    out = tmp_path / "edge_errors.json"
    args = ["--model", "tiny:llama", "--edge-errors", "induction", "--edge-methods", "eap+qk", "--n", "2"]
    record = BENCH["main"]([*args, "--verify", "5", "--out", str(out)])
    section = record["tasks"]["induction"]
    row = section["methods"]["eap+qk"]
    stamped = json.loads(out.read_text())  # the file: the record stamped with its conditions
    assert stamped["tasks"] == record["tasks"] and {"command", "commit", "load_before"} <= set(stamped["conditions"])
    assert len(row["edges"]) == 5
    # the default's verification re-uses its 5 re-scored edges; before re-scoring it is this method's own check
    default = section["default"]
    assert default["method"] == "eap+qk+exact100" and default["reused"] == 5 and default["spearman"] > 0.99
    assert default["before_rescoring"]["spearman"] == pytest.approx(row["spearman"])
    model = tiny_model("llama")
    task = load_task(model, "induction", n=2)
    sites = ["resid.pre", "resid.mid", "attn.out", "mlp.out", f"L{model.layout.n_layers - 1}.resid.post"]
    clean, corrupt = model.run(task.clean, capture=sites), model.run(task.corrupt, capture=sites)
    for edge in row["edges"]:
        source, target = edge["edge"].split(" -> ")
        read = (
            f"L{model.layout.n_layers - 1}.resid.post"
            if target == "logits"
            else target.split(".")[0] + (".resid.mid" if target.endswith(".mlp") else ".resid.pre")
        )
        d = _write(clean, corrupt, source).norm(dim=-1).flatten()
        x = corrupt[read].norm(dim=-1).flatten()
        keep = d > 1e-6 * d.max()
        assert edge["rel"] == pytest.approx(float((d[keep] / x[keep]).median()), rel=1e-4)
        assert edge["error"] == pytest.approx(edge["estimated"] - edge["exact"])
