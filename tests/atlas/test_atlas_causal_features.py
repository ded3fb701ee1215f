"""Feature nodes in the atlas's causal tables: ``effects`` and ``circuits`` rows named ``L0.resid.post.F3``
join the ``features`` table (written by the features stage for the same dictionary) on ``features.name``."""

from __future__ import annotations

import torch
from support.features import TinyTopK

from lmatlas.atlas import Atlas, build_atlas
from lmatlas.atlas.causal_results import save_circuit, save_effects
from lmatlas.causal import attribute, load_task
from lmatlas.causal.edge_feature_circuit import feature_task_circuit
from lmatlas.model.tiny import tiny_model

SITE = "L0.resid.post"


def test_effects_and_circuit_rows_of_features_join_the_features_table(tmp_path):
    model = tiny_model("llama")
    sae = TinyTopK(64, 16, 3)
    model.dictionaries.attach(sae, SITE)
    path = tmp_path / "tiny.atlas.duckdb"
    build_atlas(
        model, path, only=["features"], params={"corpus_sequences": 4, "seq_len": 32, "top_contexts": 3}, progress=False
    )
    task = load_task(model, "induction", n=2)
    names = [f"{SITE}.F{i}" for i in (3, 5, 11)]
    save_effects(path, model, attribute(model, task, [*names, "L0.H1"], verify=0))
    circuit = feature_task_circuit(model, task, latents={SITE: list(range(16))}, target=1.0, verify=0, rescore=0)
    save_circuit(path, model, circuit)
    with Atlas.open(path) as atlas:
        effects = atlas.sql(
            "SELECT e.target, f.site, f.feature, f.density FROM effects e JOIN features f ON f.name = e.target"
        ).to_pylist()
        rows = atlas.sql("SELECT source, target FROM circuits").to_pylist()
        joined = atlas.sql(
            "SELECT c.source, f.feature FROM circuits c JOIN features f ON f.name = c.source "
            "UNION SELECT c.target, f.feature FROM circuits c JOIN features f ON f.name = c.target"
        ).to_pylist()
    assert sorted(r["target"] for r in effects) == sorted(names)  # the head's row joins nothing
    assert all(r["site"] == f"{SITE}.F" and r["target"] == f"{SITE}.F{r['feature']}" for r in effects)
    in_circuit = {n for r in rows for n in (r["source"], r["target"]) if n.startswith(f"{SITE}.F")}
    assert in_circuit and {r["source"] for r in joined} == in_circuit
    assert torch.isfinite(torch.tensor([r["density"] for r in effects])).all()
