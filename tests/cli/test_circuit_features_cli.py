"""``lmatlas circuit --features DIR``: latents as circuit nodes in the table, the JSON and the atlas.

The dictionary is an exact one (latents ``relu(x_j)`` and ``relu(-x_j)`` of every dimension, decoded
back), saved in sparsify's layout; its latent nodes in the atlas's ``circuits`` table join the
``features`` table that ``lmatlas map --features`` writes, by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmatlas.cli import app

FIXTURE = str(Path(__file__).resolve().parents[1] / "fixtures" / "induction_model")
runner = CliRunner()
D_MODEL = 64


def _exact_sae(site: str = "L0.resid.post", model: dict | None = None):
    """A TopK SAE of ``2 * d`` latents that reconstructs its input exactly (k = d keeps every active latent)."""
    from lmatlas.features.dictionary import DictionaryCard, TopKSAE

    card = DictionaryCard("sae", site, D_MODEL, 2 * D_MODEL, D_MODEL, model=model or {})
    sae = TopKSAE(D_MODEL, 2 * D_MODEL, D_MODEL, card=card)
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from lmatlas.features.files import save

    return save(_exact_sae(), tmp_path_factory.mktemp("sae") / "sae")


def test_feature_nodes_in_json_table_and_atlas(folder, tmp_path):
    from lmatlas.atlas import Atlas

    path = tmp_path / "fixture.atlas.duckdb"
    mapped = runner.invoke(app, ["map", FIXTURE, "--out", str(path), "--only", "features", "--features", str(folder)])
    assert mapped.exit_code == 0, mapped.output
    args = ["circuit", FIXTURE, "--task", "induction", "--n", "8", "--features", str(folder), "--latents", "8"]
    result = runner.invoke(app, [*args, "--faithfulness", "0.99", "--verify", "5", "--atlas", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "eap+qk+features+exact100" and data["granularity"] == "edges"
    assert data["features"] == [
        {"site": "L0.resid.post", "latents": data["features"][0]["latents"], "error": "L0.resid.post.E"}
    ]
    assert len(data["features"][0]["latents"]) == 8 and len(data["verification"]["exact"]) == 5
    names = {e["source"] for e in data["edges"]} | {e["target"] for e in data["edges"]}
    latents = {n for n in names if n.startswith("L0.resid.post.F")}
    assert latents and "L0.resid.post.E" in names
    with Atlas.open(path) as atlas:
        rows = atlas.sql("SELECT source, target FROM circuits WHERE method = 'eap+qk+features+exact100'").to_pylist()
        joined = atlas.sql(
            "SELECT c.source, f.site, f.feature FROM circuits c JOIN features f ON f.name = c.source "
            "WHERE c.method = 'eap+qk+features+exact100'"
        ).to_pylist()
    assert len(rows) == len(data["edges"])
    assert {r["source"] for r in joined} == {r["source"] for r in rows if r["source"].startswith("L0.resid.post.F")}
    assert all(r["source"] == f"{r['site']}{r['feature']}" for r in joined) and joined
    table = runner.invoke(app, [*args, "--verify", "0"])
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())  # the table wraps at the terminal's width
    assert "eap+qk+features" in text and "error node L0.resid.post.E" in text


def test_a_transcoder_replaces_its_mlp_in_the_circuit(tmp_path):
    from lmatlas.features.dictionary import DictionaryCard, SkipTranscoder
    from lmatlas.features.files import save

    card = DictionaryCard("transcoder", "L0.mlp.in", D_MODEL, 32, 4)
    tc = SkipTranscoder(D_MODEL, D_MODEL, 32, 4, card=card)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(0.1 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    folder = save(tc, tmp_path / "tc")
    args = ["circuit", FIXTURE, "--task", "induction", "--n", "4", "--features", str(folder), "--latents", "4"]
    result = runner.invoke(app, [*args, "--verify", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["features"][0]["site"] == "L0.mlp" and data["features"][0]["error"] == "L0.mlp.E"
    assert not any("L0.mlp" in (e["source"], e["target"]) for e in data["edges"])  # replaced by its nodes
    assert data["curve"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)


def test_dictionaries_of_another_site_or_model_exit_2_with_one_line(tmp_path):
    from lmatlas.features.files import save
    from lmatlas.model.loading import load
    from lmatlas.model.provenance import identity

    other = {**identity(load(FIXTURE)), "file_sha256": "0" * 64, "weights": "0" * 16}
    cases = {
        "model": save(_exact_sae(model=other), tmp_path / "other-model"),
        "site": save(_exact_sae("L0.resid.mid"), tmp_path / "other-site"),
    }
    for what, path in cases.items():
        result = runner.invoke(app, ["circuit", FIXTURE, "--task", "induction", "--features", str(path)])
        assert result.exit_code == 2, (what, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert (
        "another model"
        in runner.invoke(app, ["circuit", FIXTURE, "--task", "induction", "--features", str(cases["model"])]).output
    )
    nodes = runner.invoke(
        app, ["circuit", FIXTURE, "--task", "induction", "--features", str(cases["site"]), "--granularity", "nodes"]
    )
    assert nodes.exit_code == 2 and "edge by edge only" in nodes.output
