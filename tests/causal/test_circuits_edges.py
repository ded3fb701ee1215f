"""Circuits run edge by edge, on hand-built models whose circuits are known (tests/fixtures/planted.py).

Every planted model routes its behaviour through a few edges and one kind of composition
(K, Q or V), in MHA and in GQA (the planted heads share their KV group with a bystander).
The edge run is checked against independent computations: the full graph is the clean
run, the empty circuit the corrupt run, and a two-edge path (``embed -> L1.KV0.k``,
``L1.H0/H1 -> logits``) is re-derived in plain PyTorch.
"""

from __future__ import annotations

import pytest
import torch
from fixtures.planted import planted

from lmatlas.causal import load_task, logit_diff
from lmatlas.causal.circuits import edge_attribution
from lmatlas.causal.edge_run import EdgeRunner
from lmatlas.causal.edges import EdgeIndex
from lmatlas.causal.faithfulness import find_circuit
from lmatlas.errors import SiteError, TaskError

CASES = [(kind, gqa) for kind in "kqv" for gqa in (False, True)]
IDS = [f"{kind}-{'gqa' if gqa else 'mha'}" for kind, gqa in CASES]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    kind, gqa = request.param
    p = planted(kind, gqa)
    return p, EdgeRunner(p.model, p.task, logit_diff(p.task.answer, p.task.wrong))


def test_the_planted_circuit_is_faithful_and_every_edge_is_needed(case):
    p, runner = case
    assert runner.gap > 5  # the task works on the clean prompts and not on the corrupt ones
    full = runner.faithfulness(runner.index.mask(p.edges))
    assert float(full) >= 0.95
    minus = torch.stack([runner.index.mask(p.edges - {edge}) for edge in sorted(p.edges)])
    assert runner.faithfulness(minus).max() <= 0.2, dict(zip(sorted(p.edges), runner.faithfulness(minus).tolist()))


METHODS = [
    (0, "inputs", False),
    (0, "inputs", True),
    (4, "inputs", False),
    (4, "inputs", True),
    (4, "activations", False),
    (4, "activations", True),
]


@pytest.mark.parametrize(
    "steps, along, qk", METHODS, ids=["eap", "eap+qk", "eap-ig", "eap-ig+qk", "eap-ig-act", "eap-ig-act+qk"]
)
def test_the_circuit_found_contains_the_planted_edges(case, steps, along, qk):
    p, _ = case
    graph = edge_attribution(p.model, p.task, steps=steps, along=along, qk=qk)
    circuit = find_circuit(p.model, p.task, graph, target=0.8, verify=10)
    assert circuit.granularity == "edges"
    assert p.edges <= {(s, t) for s, t, _ in circuit.edges}
    assert circuit.faithfulness >= 0.95
    assert circuit.curve[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-3)
    assert circuit.to_dict()["granularity"] == "edges" and len(circuit.verification["exact"]) == 10


def test_the_node_run_hides_edges_the_edge_run_needs():
    """The failure this run fixes: kept whole, a head carries edges the circuit does not list."""
    p = planted("k", gqa=True)
    graph = edge_attribution(p.model, p.task, qk=False)
    nodes = find_circuit(p.model, p.task, graph, target=0.8, granularity="nodes", verify=0)
    assert nodes.granularity == "nodes" and nodes.faithfulness >= 0.8
    assert not p.edges <= {(s, t) for s, t, _ in nodes.edges}  # the node run calls an incomplete list faithful
    runner = EdgeRunner(p.model, p.task, logit_diff(p.task.answer, p.task.wrong))
    assert float(runner.faithfulness(runner.index.mask([(s, t) for s, t, _ in nodes.edges]))) < 0.5


def test_the_full_graph_is_the_clean_run_and_the_empty_one_the_corrupt_run(tiny):
    task = load_task(tiny, "induction", n=3)
    metric = logit_diff(task.answer, task.wrong)
    runner = EdgeRunner(tiny, task, metric)
    full, empty = runner.index.full(), torch.zeros_like(runner.index.allowed)
    half = full & (torch.rand(full.shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    values = runner.metric(torch.stack([full, empty, half]))
    clean = metric(tiny.forward(task.clean)).mean()
    corrupt = metric(tiny.forward(task.corrupt)).mean()
    assert float(values[0]) == pytest.approx(float(clean), abs=1e-4)
    assert float(values[1]) == pytest.approx(float(corrupt), abs=1e-5)
    assert float(runner.metric(half)) == pytest.approx(float(values[2]), abs=1e-5)  # batching changes nothing
    # patching through the full graph on the corrupt prompts with no patched edge is the corrupt run
    assert float(runner.patched([("embed", "logits")])) != pytest.approx(float(corrupt), abs=1e-6)


def _random_circuits(index, seed=0):
    """The full graph, the empty one and three random circuits of 10%, 30% and 60% of the edges."""
    full, gen = index.full(), torch.Generator().manual_seed(seed)
    parts = [full & (torch.rand(full.shape, generator=gen) < f) for f in (0.1, 0.3, 0.6)]
    return torch.stack([full, torch.zeros_like(full), *parts])


def test_one_copy_runs_equal_the_copy_layout(tiny):
    """The default layout (every input projected from its own stream in one copy of the batch) against the
    copy layout, where the model itself computes each distinct stream's q/k/v: circuits and one-edge patches."""
    task = load_task(tiny, "induction", n=3)
    metric = logit_diff(task.answer, task.wrong)
    fast = EdgeRunner(tiny, task, metric, progress=False)
    copies = EdgeRunner(tiny, task, metric, progress=False, sliced=False)
    # families whose q/k norm makes the post-projection map non-linear keep the copy layout
    assert (fast.maps is None) == (tiny.spec.family in ("qwen3", "gemma3", "olmo2"))
    masks = _random_circuits(fast.index)
    assert torch.allclose(fast.metric(masks), copies.metric(masks), atol=1e-5, rtol=0)
    edges = fast.index.edges_of(fast.index.full())[::7]
    assert torch.allclose(fast.patched(edges), copies.patched(edges), atol=1e-5, rtol=0)
    if fast.maps is not None:
        before = tiny.work.snapshot()
        fast.metric(masks)
        assert (tiny.work.snapshot() - before).tokens == masks.shape[0] * task.clean.numel()  # one copy each


def test_one_copy_runs_equal_the_copy_layout_on_planted_models(case):
    p, runner = case
    copies = EdgeRunner(p.model, p.task, runner.metric_fn, progress=False, sliced=False)
    assert runner.maps is not None
    masks = _random_circuits(runner.index, seed=1)
    assert torch.allclose(runner.metric(masks), copies.metric(masks), atol=1e-4, rtol=0)
    edges = sorted(p.edges)
    assert torch.allclose(runner.patched(edges), copies.patched(edges), atol=1e-4, rtol=0)


def _rms(x, weight, eps):
    """RMSNorm as Llama computes it (in float32, whatever the model's dtype)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x, inv_freq):
    """Llama rotary on ``[batch, pos, head, d_head]`` (angles in float32, as the model computes them)."""
    angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    cos = torch.cat([angles.cos()] * 2, -1)[None, :, None].to(x.dtype)
    sin = torch.cat([angles.sin()] * 2, -1)[None, :, None].to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_a_two_edge_path_matches_a_plain_pytorch_derivation():
    """Circuit {embed -> L1.KV0.k, L1.H0 -> logits, L1.H1 -> logits} of a float64 tiny Llama, by hand."""
    from lmatlas.model.tiny import tiny_model

    model = tiny_model("llama", seed=1, dtype=torch.float64)
    task = load_task(model, "induction", n=2)
    readout = torch.randn(model.layout.d_vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def metric(logits):  # every logit of the last position, in float64
        return logits[:, -1] @ readout

    edges = [("embed", "L1.KV0.k"), ("L1.H0", "logits"), ("L1.H1", "logits")]
    runner = EdgeRunner(model, task, metric)
    got = float(runner.metric(runner.index.mask(edges)))

    hf, block = model.hf, model.hf.model.layers[1]
    corrupt = model.run(task.corrupt, capture=["L1.resid.pre", "L1.attn.out", "L1.resid.post", "L0.resid.pre"])
    clean = model.run(task.clean, capture=["L0.resid.pre"])
    x = corrupt["L1.resid.pre"]
    keys_in = x + clean["L0.resid.pre"] - corrupt["L0.resid.pre"]
    attn, eps = block.self_attn, block.input_layernorm.variance_epsilon
    norm = block.input_layernorm.weight
    b, p, dh = x.shape[0], x.shape[1], 16
    q = _rotate((_rms(x, norm, eps) @ attn.q_proj.weight.T).view(b, p, 4, dh), hf.model.rotary_emb.inv_freq)
    k = _rotate((_rms(keys_in, norm, eps) @ attn.k_proj.weight.T).view(b, p, 2, dh), hf.model.rotary_emb.inv_freq)
    v = (_rms(x, norm, eps) @ attn.v_proj.weight.T).view(b, p, 2, dh)
    final = corrupt["L1.resid.post"].clone()
    for head in (0, 1):  # both read KV group 0
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, 0]) / dh**0.5
        scores = scores.masked_fill(torch.ones(p, p, dtype=torch.bool).triu(1), float("-inf"))
        z = torch.einsum("bqk,bkd->bqd", scores.softmax(-1), v[:, :, 0])
        write = z @ attn.o_proj.weight[:, head * dh : (head + 1) * dh].T
        final += write - corrupt["L1.attn.out"][:, :, head]
    logits = _rms(final, hf.model.norm.weight, hf.model.norm.variance_epsilon) @ hf.lm_head.weight.T
    expected = float(metric(logits.detach()).mean())
    assert got == pytest.approx(expected, abs=1e-10)
    assert min(abs(got - runner.corrupt_value), abs(got - runner.clean_value)) > 1e-4  # a real partial circuit


def test_one_edge_patch_into_the_logits_matches_a_direct_computation(llama):
    task = load_task(llama, "induction", n=2)
    metric = logit_diff(task.answer, task.wrong)
    runner = EdgeRunner(llama, task, metric)
    last = "L1.resid.post"
    corrupt = llama.run(task.corrupt, capture=[last, "L0.attn.out"])
    clean = llama.run(task.clean, capture=["L0.attn.out"])
    stream = corrupt[last] + clean["L0.attn.out"][:, :, 2] - corrupt["L0.attn.out"][:, :, 2]
    norm = llama.hf.model.norm
    logits = _rms(stream, norm.weight, norm.variance_epsilon) @ llama.hf.lm_head.weight.T
    assert float(runner.patched([("L0.H2", "logits")])) == pytest.approx(
        float(metric(logits.detach()).mean()), abs=1e-5
    )


@pytest.mark.parametrize(
    "edge, error, words",
    [
        (("L1.H0", "L0.mlp"), TaskError, "reads the residual stream before"),
        (("L1.mlp", "L1.H0.q"), TaskError, "reads the residual stream before"),
        (("L0.H9", "logits"), SiteError, "Head 9 is out of range"),
        (("embed", "L1.KV5.k"), SiteError, "KV group 5 is out of range"),
        (("L7.mlp", "logits"), SiteError, "Layer 7 is out of range"),
        (("embed", "L1.H0"), SiteError, "is not an edge target"),
    ],
)
def test_bad_edges_are_refused_in_one_line(llama, edge, error, words):
    with pytest.raises(error) as caught:
        EdgeIndex.of(llama).mask([edge])
    assert words in str(caught.value) and "\n" not in str(caught.value)
