"""The atlas build: stages on a tiny model, resumability after a real SIGKILL, store errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.models import save_tiny

from lmatlas.atlas import Atlas, build_atlas
from lmatlas.atlas.stages.importance import corpus_loss
from lmatlas.atlas.store import AtlasStore
from lmatlas.errors import AtlasError, LmatlasError
from lmatlas.model.loading import load

SMALL = {"corpus_sequences": 4, "seq_len": 32, "importance_sequences": 2, "top_contexts": 3}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def built(tiny_dir, tmp_path_factory):
    model = load(tiny_dir)
    path = tmp_path_factory.mktemp("atlas") / "tiny.atlas.duckdb"
    report = build_atlas(model, path, only=["structure", "importance", "activations"], params=SMALL, progress=False)
    return model, path, report


def test_build_writes_every_planned_unit(built):
    model, path, report = built
    assert report.skipped == 0 and len(report.computed) == report.planned == 1 + 2 * model.layout.n_layers
    with Atlas.open(path) as atlas:
        assert atlas.count("heads") == model.layout.n_layers * model.layout.n_heads
        assert atlas.count("head_importance") == 8 and atlas.count("mlp_importance") == 2
        assert atlas.count("neuron_stats") == 2 * model.layout.d_mlp
        runs = atlas.sql("SELECT * FROM runs").to_pylist()
        assert {r["unit"] for r in runs} == set(report.computed)
        assert all('"lmatlas"' in r["versions"] and '"seed"' in r["seeds"] for r in runs)
        assert atlas.card["file_sha256"] == model.card()["file_sha256"]


def test_importance_equals_a_direct_ablation(built):
    """Re-derive one head's delta-loss with a plain forward pre-hook on o_proj."""
    model, path, _ = built
    from lmatlas.atlas.pipeline import make_context

    ids = make_context(model, params=SMALL).corpus[:2]
    with torch.no_grad():
        clean_logits = model.hf(ids).logits
        captured = {}
        o_proj = model.blocks[1].self_attn.o_proj
        handle = o_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("z", a[0].clone()))
        model.hf(ids)
        handle.remove()
        z_mean = captured["z"].view(*ids.shape, 4, 16)[:, :, 2].mean(dim=(0, 1))

        def ablate(module, args):
            z = args[0].clone().view(*ids.shape, 4, 16)
            z[:, :, 2] = z_mean
            return (z.view(*ids.shape, 64),)

        handle = o_proj.register_forward_pre_hook(ablate)
        ablated_logits = model.hf(ids).logits
        handle.remove()
    expected = corpus_loss(ablated_logits, ids) - corpus_loss(clean_logits, ids)
    with Atlas.open(path) as atlas:
        stored = atlas.sql("SELECT delta_loss FROM head_importance WHERE layer = 1 AND head = 2").to_pylist()
    assert stored[0]["delta_loss"] == pytest.approx(expected, abs=1e-6)


def test_activation_stats_equal_a_direct_computation(built):
    model, path, _ = built
    from lmatlas.atlas.pipeline import make_context

    ids = make_context(model, params=SMALL).corpus
    acts = []
    handle = model.blocks[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0].clone()))
    with torch.no_grad():
        model.hf(ids)
    handle.remove()
    flat = acts[0].flatten(0, 1)
    with Atlas.open(path) as atlas:
        rows = atlas.sql("SELECT * FROM neuron_stats WHERE layer = 0 ORDER BY neuron").to_pylist()
    for neuron in (0, 17, 95):
        assert rows[neuron]["mean"] == pytest.approx(float(flat[:, neuron].mean()), abs=1e-6)
        assert rows[neuron]["max"] == pytest.approx(float(flat[:, neuron].max()), abs=1e-6)
        assert rows[neuron]["frac_active"] == pytest.approx(float((flat[:, neuron] > 0).float().mean()))
        assert len(rows[neuron]["top_contexts"]) == 3 and "«" in rows[neuron]["top_contexts"][0]


def test_a_second_build_skips_everything(built):
    model, path, _ = built
    report = build_atlas(model, path, only=["structure", "importance", "activations"], params=SMALL, progress=False)
    assert report.computed == [] and report.skipped == report.planned


def test_resume_after_sigkill(tmp_path):
    """A real `kill -9` mid-build leaves a readable atlas holding whole units only; resuming finishes the rest."""
    model_dir = save_tiny(tmp_path / "deep", layers=12)
    path = tmp_path / "killed.atlas.duckdb"
    script = (
        "import sys; from lmatlas.model.loading import load; from lmatlas.atlas import build_atlas; "
        f"build_atlas(load({str(model_dir)!r}), {str(path)!r}, only=['importance'], "
        "params={'corpus_sequences': 8, 'seq_len': 64, 'importance_sequences': 8})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    committed = 0
    for line in proc.stderr:
        if line.startswith("committed "):
            committed += 1
            if committed == 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"

    with AtlasStore.open_existing(path) as store:  # not corrupt
        done = store.done_units()
        rows = store.table("head_importance").to_pylist()
    assert 3 <= len(done) < 12
    assert {f"importance/L{r['layer']}" for r in rows} == done  # whole units only
    assert len(rows) == 4 * len(done)

    model = load(model_dir)
    params = {"corpus_sequences": 8, "seq_len": 64, "importance_sequences": 8}
    report = build_atlas(model, path, only=["importance"], params=params, progress=False)
    assert set(report.computed) == {f"importance/L{n}" for n in range(12)} - done
    fresh = tmp_path / "fresh.atlas.duckdb"
    build_atlas(model, fresh, only=["importance"], params=params, progress=False)
    query = "SELECT layer, head, delta_loss FROM head_importance ORDER BY layer, head"
    with Atlas.open(path) as resumed, Atlas.open(fresh) as scratch:
        assert resumed.sql(query).to_pylist() == scratch.sql(query).to_pylist()


def test_atlas_of_another_model_is_refused(built, tmp_path):
    _, path, _ = built
    other = load(save_tiny(tmp_path / "other", seed=1))
    with pytest.raises(AtlasError, match="atlas of another model"):
        build_atlas(other, path, only=["structure"], params=SMALL, progress=False)


def test_not_an_atlas(tmp_path):
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"hello" * 1000)
    with pytest.raises(AtlasError, match="not an atlas"):
        Atlas.open(junk)
    import duckdb

    plain = tmp_path / "plain.duckdb"
    duckdb.connect(str(plain)).execute("CREATE TABLE t (x INT)").close()
    with pytest.raises(AtlasError, match="not an lmatlas atlas"):
        Atlas.open(plain)
    with pytest.raises(AtlasError, match="No atlas at"):
        Atlas.open(tmp_path / "absent.duckdb")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_directory(built, tmp_path):
    model, _, _ = built
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    with pytest.raises(AtlasError, match="read-only"):
        build_atlas(model, locked / "a.duckdb", only=["structure"], params=SMALL, progress=False)


def test_read_only_directory_check_without_permissions(built, tmp_path, monkeypatch):
    """As root the kernel ignores the mode bits, so check the decision itself."""
    model, _, _ = built
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(AtlasError, match="read-only. Choose a writable --out path"):
        build_atlas(model, tmp_path / "a.duckdb", only=["structure"], params=SMALL, progress=False)
    assert not (tmp_path / "a.duckdb").exists()


def test_unknown_stage_and_missing_corpus(built, tmp_path):
    model, _, _ = built
    with pytest.raises(LmatlasError, match="Unknown atlas stage.*Stages:"):
        build_atlas(model, tmp_path / "a.duckdb", only=["nope"], progress=False)
    with pytest.raises(LmatlasError, match="Corpus file not found"):
        build_atlas(model, tmp_path / "b.duckdb", corpus=tmp_path / "missing.jsonl", progress=False)
    assert not (tmp_path / "b.duckdb").exists()


def test_resuming_with_other_settings_is_refused(built):
    model, path, _ = built
    with pytest.raises(AtlasError, match="built with other settings.*importance_sequences"):
        build_atlas(model, path, only=["importance"], params={**SMALL, "importance_sequences": 3}, progress=False)
    with pytest.raises(AtlasError, match="seed"):
        build_atlas(model, path, only=["importance"], params=SMALL, seed=7, progress=False)


def test_every_stage_fills_its_tables(tiny_dir, tmp_path):
    model = load(tiny_dir)
    path = tmp_path / "all.atlas.duckdb"
    report = build_atlas(model, path, params={**SMALL, "ov_sources": 32}, progress=False)
    assert report.skipped == 0 and set(report.seconds_by_stage) == {
        "activations",
        "census",
        "importance",
        "lens",
        "neurons",
        "ov",
        "structure",
        "corpus",
        "head_windows",
        "neuron_contexts",
        "search",
    }
    with Atlas.open(path) as atlas:
        for table, rows in {
            "heads": 8,
            "head_importance": 8,
            "mlp_importance": 2,
            "neurons": 192,
            "neuron_stats": 192,
            "head_ov": 8,
            "layer_lens": 2,
            "corpus": 4,
            "head_windows": 8 * 3,
            "neuron_contexts": 192 * 3,
            "neuron_histograms": 192,
            "token_writers": 260,
            "vocab": 260,
        }.items():
            assert atlas.count(table) == rows, table
        scored = {r["type"] for r in atlas.head_types().to_pylist()}
        assert {"previous_token", "induction", "duplicate_token", "attention_sink"} <= scored
        lens = atlas.layers().to_pylist()
        assert lens[-1]["lens_top1_agreement"] == 1.0 and lens[-1]["lens_kl_to_final"] < 1e-5
        assert atlas.search(atlas.neurons(limit=1).to_pylist()[0]["promoted"][0]).num_rows >= 1


def test_attribution_importance_is_verified_and_close_to_exact(tmp_path):
    """Default importance: every head estimated, the top ones (and every MLP) measured exactly."""
    from support.models import get_tiny

    model = get_tiny("llama")
    fast, slow = tmp_path / "fast.atlas.duckdb", tmp_path / "slow.atlas.duckdb"
    build_atlas(model, fast, only=["importance"], params={**SMALL, "importance_verify": 3}, progress=False)
    build_atlas(
        model, slow, only=["importance"], params={**SMALL, "importance_method": "mean-ablation"}, progress=False
    )
    with Atlas.open(fast) as a, Atlas.open(slow) as b:
        rows = a.sql("SELECT * FROM head_importance ORDER BY layer, head").to_pylist()
        exact = [r["delta_loss"] for r in b.sql("SELECT * FROM head_importance ORDER BY layer, head").to_pylist()]
        mlp_fast = a.sql("SELECT delta_loss, method FROM mlp_importance ORDER BY layer").to_pylist()
        mlp_slow = b.sql("SELECT delta_loss FROM mlp_importance ORDER BY layer").to_pylist()
    assert sum(r["method"] == "mean-ablation" for r in rows) == 3
    for row, truth in zip(rows, exact):
        if row["method"] == "mean-ablation":
            assert row["delta_loss"] == pytest.approx(truth, abs=1e-6)
        else:
            assert row["delta_loss"] == row["estimate"]
    assert all(r["method"] == "mean-ablation" for r in mlp_fast)
    assert [r["delta_loss"] for r in mlp_fast] == pytest.approx([r["delta_loss"] for r in mlp_slow], abs=1e-6)
    estimates = torch.tensor([r["estimate"] for r in rows])
    from lmatlas.causal import spearman

    assert spearman(estimates, torch.tensor(exact)) > 0.5


def test_the_census_checkpoints_live_beside_the_atlas_and_go_when_the_build_ends(tiny_dir, tmp_path, monkeypatch):
    import shutil

    import lmatlas.atlas.pipeline as pipeline

    removed, remove = [], shutil.rmtree

    def record_then_remove(folder, *args, **kwargs):
        removed.append(sorted(p.name for p in Path(folder).glob("needle-*")))
        return remove(folder, *args, **kwargs)

    monkeypatch.setattr(pipeline.shutil, "rmtree", record_then_remove)
    path = tmp_path / "census.atlas.duckdb"
    build_atlas(load(tiny_dir), path, only=["census"], params=SMALL, progress=False)
    assert len(removed) == 1 and removed[0], "the needle pass checkpointed into <atlas>.partial"
    assert not Path(f"{path}.partial").exists()  # a finished build leaves nothing to resume
