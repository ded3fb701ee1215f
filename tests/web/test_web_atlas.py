"""The explorer's atlas stages — ``corpus``, ``head_windows``, ``neuron_contexts`` — against plain
PyTorch re-derivations, and the atlases every web test shares (built once per session).

``web_atlases`` builds, on a 2-layer tiny Llama saved to disk: atlas A with every stage, and
atlas B (another seed's weights, same architecture) with a few stages, for the diff page.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.web import PARAMS, web_atlases

from lmatlas.atlas import Atlas
from lmatlas.atlas.pipeline import make_context
from lmatlas.atlas.stages.neuron_contexts import CONTEXT_AFTER, CONTEXT_BEFORE, HISTOGRAM_BINS
from lmatlas.model.loading import load


@pytest.fixture(scope="session")
def web_paths(tmp_path_factory):
    return web_atlases(tmp_path_factory)


@pytest.fixture(scope="module")
def eager(web_paths):
    """The atlas's model with eager attention, so Hugging Face itself returns the patterns."""
    model = load(web_paths["model"])
    model.hf.set_attn_implementation("eager")
    return model


def _rows(path, query):
    with Atlas.open(path) as atlas:
        return atlas.sql(query).to_pylist()


def test_corpus_table_holds_the_build_windows(web_paths, eager):
    windows = make_context(eager, params=PARAMS).corpus
    rows = _rows(web_paths["a"], "SELECT * FROM corpus ORDER BY window_id")
    assert [r["ids"] for r in rows] == windows.tolist()
    for row in rows:  # each id decoded alone; a partial UTF-8 byte is spelled <0xNN> instead of U+FFFD
        decoded = [eager.tokenizer.decode([i]) for i in row["ids"]]
        assert len(row["tokens"]) == len(decoded) == PARAMS["seq_len"]
        for mine, plain in zip(row["tokens"], decoded):
            assert mine == plain if "\ufffd" not in plain else mine.startswith("<0x")


def test_head_windows_equal_a_direct_computation(web_paths, eager):
    """Write norm from o_proj's input and weight by hand; attention from HF's own eager patterns."""
    ids = make_context(eager, params=PARAMS).corpus
    captured = []
    n_heads, d_head = eager.layout.n_heads, eager.layout.d_head
    o_proj = eager.blocks[1].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].clone()))
    with torch.no_grad():
        out = eager.hf(ids, output_attentions=True)
    handle.remove()
    z = captured[0].view(*ids.shape, n_heads, d_head)  # [window, pos, head, d_head]
    rows = _rows(web_paths["a"], "SELECT * FROM head_windows WHERE layer = 1 ORDER BY head, rank")
    assert len(rows) == n_heads * 3
    for head in range(n_heads):
        w_o = o_proj.weight.detach()[:, head * d_head : (head + 1) * d_head]  # [d_model, d_head]
        write = (z[:, :, head] @ w_o.T).norm(dim=-1)[:, 1:]  # [window, pos - 1]: position 0 excluded
        best, query = write.max(dim=1)
        order = best.argsort(descending=True)[:3].tolist()
        mine = [r for r in rows if r["head"] == head]
        assert [r["window_id"] for r in mine] == order
        for r, window in zip(mine, order):
            q = int(query[window]) + 1
            assert r["query_pos"] == q and r["start"] == 0
            assert r["write_norm"] == pytest.approx(float(best[window]), rel=1e-4)
            expected = out.attentions[1][window, head, q, : q + 1]
            np.testing.assert_allclose(r["attention"], expected.numpy(), atol=1e-5)
            assert sum(r["attention"]) == pytest.approx(1.0, abs=1e-4)  # causal: all mass on shown keys


def test_neuron_contexts_and_histograms_equal_a_direct_computation(web_paths, eager):
    ids = make_context(eager, params=PARAMS).corpus
    acts = []
    handle = eager.blocks[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0].clone()))
    with torch.no_grad():
        eager.hf(ids)
    handle.remove()
    acts = acts[0]  # [window, pos, neuron]
    seq_len = ids.shape[1]
    contexts = _rows(web_paths["a"], "SELECT * FROM neuron_contexts WHERE layer = 0 ORDER BY neuron, rank")
    hists = _rows(web_paths["a"], "SELECT * FROM neuron_histograms WHERE layer = 0 ORDER BY neuron")
    assert len(hists) == eager.layout.d_mlp and len(contexts) == 3 * eager.layout.d_mlp
    for neuron in (0, 17, 95):
        flat = acts[..., neuron].flatten()
        lo, hi = float(flat.min()), float(flat.max())
        h = hists[neuron]
        assert h["lo"] == pytest.approx(lo, abs=1e-6) and h["hi"] == pytest.approx(hi, abs=1e-6)
        assert h["scale"] == pytest.approx(max(abs(lo), abs(hi)), abs=1e-6)
        expected, _ = np.histogram(flat.numpy(), bins=HISTOGRAM_BINS, range=(lo, hi))
        assert sum(h["counts"]) == flat.numel()
        assert np.abs(np.array(h["counts"]) - expected).max() <= 1  # bin edges may round differently
        top = flat.topk(3)
        mine = [c for c in contexts if c["neuron"] == neuron]
        for c, value, index in zip(mine, top.values.tolist(), top.indices.tolist()):
            window, pos = divmod(index, seq_len)
            assert (c["window_id"], c["pos"]) == (window, pos)
            assert c["activation"] == pytest.approx(value, abs=1e-6)
            start, stop = max(0, pos - CONTEXT_BEFORE), min(seq_len, pos + CONTEXT_AFTER + 1)
            assert c["start"] == start
            expected_levels = (acts[window, start:stop, neuron] / h["scale"] * 127).round().to(torch.int64).tolist()
            assert c["levels"] == expected_levels
            assert c["levels"][pos - start] == round(127 * value / h["scale"])
