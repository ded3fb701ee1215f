"""The post-projection maps of one-copy edge runs: read off the model's rotary, checked on the task's forwards.

A head's q/k/v enter the attention as ``u @ M_p`` (``u`` its projection, ``p`` the position).
:func:`lmatlas.model.rotary.position_maps` reads ``M_p`` off the model's own rotary with no
forward; here it is compared with the least-squares fit on random streams it replaced
(:meth:`HeadMaps.measure`) on every tiny family, with Llama's rotary written out by hand,
and the acceptance check must refuse maps that are wrong (another prompt length, no rotary,
a q/k-norm family). That the one-copy runs these maps drive equal the copy layout is
tests/causal/test_circuits_edges.py's ``test_one_copy_runs_equal_the_copy_layout``.
"""

from __future__ import annotations

import torch
from support.models import get_tiny

from lmatlas.causal import load_task, logit_diff
from lmatlas.causal.edge_run import EdgeRunner
from lmatlas.causal.edge_sliced import HeadMaps
from lmatlas.model.rotary import position_maps

QK_NORM = ("qwen3", "gemma3", "olmo2")  # a norm between projection and rotary: A_p is not linear


def _runs(model, task):
    """The clean and corrupt forwards the runner checks maps on."""
    sites = ["resid.pre", "attn.q", "attn.k", "attn.v"]
    return [model.run(task.corrupt, capture=sites), model.run(task.clean, capture=sites)]


def test_the_maps_read_off_the_rotary_equal_the_fitted_maps(tiny):
    task = load_task(tiny, "induction", n=3)
    length = task.clean.shape[1]
    derived = HeadMaps.derive(tiny, length, torch.float64)
    assert derived is not None and derived.length == length
    runs = _runs(tiny, task)
    if tiny.spec.family in QK_NORM:  # the rotary alone misses the q/k norm: refused on the real streams
        assert HeadMaps.measure(tiny, task.clean[:1], torch.float64) is None
        assert not derived.check(tiny, runs)
        return
    fitted = HeadMaps.measure(tiny, task.clean[:1], torch.float64)
    assert fitted is not None and derived.check(tiny, runs) and fitted.check(tiny, runs)
    for layer in range(tiny.layout.n_layers):
        for part in "qkv":
            a, b = derived.maps[layer][part], fitted.maps[layer][part]
            assert a.shape == (length, tiny.layout.d_head, tiny.layout.d_head)
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (layer, part, float((a - b).abs().max()))


def test_llamas_map_is_its_rotary_written_out_by_hand(llama):
    """``M_p = diag(cos) + R^T diag(sin)`` with ``rotate_half(x) = x @ R``: angles ``p * theta^(-2i/d)``."""
    d, length = llama.layout.d_head, 7
    theta = llama.hf.config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [P, d / 2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [P, d]
    rot = torch.zeros(d, d, dtype=torch.float64)  # x @ rot = cat(-x[d/2:], x[:d/2])
    half = d // 2
    rot[torch.arange(half) + half, torch.arange(half)] = -1.0
    rot[torch.arange(half), torch.arange(half) + half] = 1.0
    by_hand = torch.diag_embed(cos) + rot[None] * sin[:, None, :]  # [P, d, d]
    maps = position_maps(llama, length, torch.float64)
    for layer in range(llama.layout.n_layers):
        assert torch.allclose(maps[layer]["q"], by_hand, atol=1e-6, rtol=0)  # cos/sin pass through float32
        assert torch.allclose(maps[layer]["k"], by_hand, atol=1e-6, rtol=0)
        assert torch.equal(maps[layer]["v"], torch.eye(d, dtype=torch.float64).expand(length, -1, -1))


def test_the_check_refuses_maps_that_are_not_the_models(llama):
    """Maps of the right shape but wrong: no rotary, the rotary one position late, a value map rotated."""
    task = load_task(llama, "induction", n=3)
    length, runs = task.clean.shape[1], _runs(llama, task)
    right = HeadMaps.derive(llama, length, torch.float64)
    assert right.check(llama, runs)
    late = HeadMaps.derive(llama, length + 1, torch.float64)
    shifted = HeadMaps([{p: m[1:] for p, m in layer.items()} for layer in late.maps], length)
    identity = torch.eye(llama.layout.d_head, dtype=torch.float64).expand(length, -1, -1)
    plain = HeadMaps([dict.fromkeys("qkv", identity) for _ in right.maps], length)
    swapped = HeadMaps([{**layer, "v": layer["q"]} for layer in right.maps], length)
    for wrong in (shifted, plain, swapped):
        assert not wrong.check(llama, runs)


def test_the_one_copy_setup_is_the_two_task_forwards(llama):
    """No forward of random streams: the runner's setup is the corrupt and the clean run, the maps checked
    on them; a q/k-norm family falls back to the copy layout at the same cost."""
    for model, one_copy in ((llama, True), (get_tiny("qwen3"), False)):
        task = load_task(model, "induction", n=3)
        before = model.work.snapshot()
        runner = EdgeRunner(model, task, logit_diff(task.answer, task.wrong), progress=False)
        assert (model.work.snapshot() - before).forwards == 2
        assert (runner.maps is not None) == one_copy


def test_the_edge_index_is_the_pairwise_rule(llama):
    """``EdgeIndex.of`` compares layers at once and asks ``_reads_after`` only within a layer: the same graph as
    asking it for every pair (sequential and parallel residual)."""
    from lmatlas.causal.circuits import _reads_after
    from lmatlas.causal.edges import EdgeIndex

    for model in (llama, get_tiny("gpt_neox")):
        index = EdgeIndex.of(model)
        pairwise = torch.tensor([[_reads_after(model, s, t) for t in index.targets] for s in index.sources])
        assert torch.equal(index.allowed, pairwise) and index.allowed.dtype == torch.bool
