"""Neuron decoding, checked against the native modules with plain full-matrix computations,
and causally on SmolLM2: clamping a neuron that decodes to a word makes the model say it."""

from __future__ import annotations

import pytest
import torch
from support.decode import assert_same_topk
from support.models import TINY_TYPES, get_tiny, save_tiny_hf

from lmatlas.decode.neurons import decode_neurons, embed_scale, input_tokens
from lmatlas.decode.vocab import DecodeError
from lmatlas.errors import SiteError
from lmatlas.model.arch import get_path

K = 5


def one_hot_writes(model, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]``: what the native down projection (and post-MLP norm) writes for act = e_n."""
    block = model.blocks[layer]
    down = get_path(block, model.spec.mlp_out)
    eye = torch.eye(model.layout.d_mlp)
    with torch.no_grad():
        writes = down(eye) - down(torch.zeros(1, model.layout.d_mlp))  # the bias cancels
        if model.spec.mlp_post_norm:  # the post norm scales each row by a positive number
            writes = get_path(block, model.spec.mlp_post_norm)(writes)
    return writes


def native_output_logits(model, layer: int) -> torch.Tensor:
    """``[d_mlp, V]``: lm_head(final_norm(write)) without the norm's bias, dense float32."""
    final = get_path(model.hf, model.spec.final_norm)
    with torch.no_grad():
        normed = final(one_hot_writes(model, layer))
        if getattr(final, "bias", None) is not None:
            normed = normed - final.bias
        return normed.float() @ get_path(model.hf, model.spec.unembed).weight.float().T


def native_input_preacts(model, layer: int) -> dict[str, torch.Tensor]:
    """``{"gate"|"in": [d_mlp, V]}``: the native projections of every token's embedding through the MLP norm."""
    block = model.blocks[layer]
    spec = model.spec
    with torch.no_grad():
        e = get_path(model.hf, spec.embed)(torch.arange(model.layout.d_vocab))  # scaled by the module
        x = get_path(block, spec.mlp_norm)(e) if spec.mlp_norm else e
        if spec.gate_up:
            gate, up = get_path(block, spec.gate_up)(x).chunk(2, dim=-1)
            out = {"gate": gate, "in": up}
        else:
            out = {"in": get_path(block, spec.mlp_in)(x)}
            if spec.mlp_gate:
                out["gate"] = get_path(block, spec.mlp_gate)(x)
    return {name: value.float().T for name, value in out.items()}


def assert_proportional(got: torch.Tensor, ref_rows: torch.Tensor, ids: torch.Tensor):
    """``got[i] == c_i * ref[i, ids[i]]`` with one positive ``c_i`` per row (a norm's positive scale)."""
    ref = torch.gather(ref_rows, 1, ids)
    ratio = got / ref
    assert (ratio > 0).all()
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=1e-6)


def assert_offset(got: torch.Tensor, ref_rows: torch.Tensor, ids: torch.Tensor):
    """``got[i] == ref[i, ids[i]] - b_i`` with one constant ``b_i`` per row (biases)."""
    diff = got - torch.gather(ref_rows, 1, ids)
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", TINY_TYPES)
@pytest.mark.parametrize("method", ["plain", "bf16"])
def test_every_neuron_against_the_native_modules(model_type, method):
    model = get_tiny(model_type)
    dec = decode_neurons(model, k=K, method=method)
    d_mlp = model.layout.d_mlp
    assert dec.layers == list(range(model.layout.n_layers))
    assert dec.promoted.ids.shape == (model.layout.n_layers * d_mlp, K)
    expected_inputs = {"gate", "in"} if model.spec.gated else {"in"}
    assert set(dec.inputs) == expected_inputs
    for layer in dec.layers:
        rows = slice(layer * d_mlp, (layer + 1) * d_mlp)
        # outputs: rankings equal to the native path's, logits proportional to it (the norm's 1/rms)
        out = native_output_logits(model, layer)
        ranking = [(dec.promoted, True), (dec.suppressed, False)]
        for r, largest in ranking:
            scores = out * (r.logits[rows, :1] / torch.gather(out, 1, r.ids[rows, :1]))  # rescale to ours
            assert_same_topk(r.ids[rows], r.logits[rows], scores, K, largest=largest)
            assert_proportional(r.logits[rows], out, r.ids[rows])
        # inputs: the tokens with the largest native pre-activation, values up to per-neuron biases
        for name, pre in native_input_preacts(model, layer).items():
            r = dec.inputs[name]
            shift = r.logits[rows, :1] - torch.gather(pre, 1, r.ids[rows, :1])
            assert_same_topk(r.ids[rows], r.logits[rows], pre + shift, K)
            assert_offset(r.logits[rows], pre, r.ids[rows])


def test_rows_records_and_errors(llama):
    dec = decode_neurons(llama, layers=1, k=3, inputs=False)
    assert dec.layers == [1] and dec.inputs == {}
    assert dec.row(1, 5) == 5
    record = dec.neuron(1, 5, llama.tokenizer)
    assert record["neuron"] == "L1.N5"
    assert len(record["promoted"]) == 3 and isinstance(record["promoted"][0][0], str)
    assert [t for t, _ in record["promoted"]] == [llama.tokenizer.decode([i]) for i in dec.promoted.ids[5].tolist()]
    assert len(dec.records(llama.tokenizer)) == llama.layout.d_mlp
    with pytest.raises(DecodeError, match="not decoded"):
        dec.row(0, 5)
    with pytest.raises(DecodeError, match="out of range"):
        dec.row(1, 10_000)
    with pytest.raises(SiteError, match="Layer 7 is out of range"):
        decode_neurons(llama, layers=[7])
    with pytest.raises(DecodeError, match="norm mode"):
        decode_neurons(llama, norm="full")


def test_named_inputs_decode_only_those(llama):
    """``inputs=["gate"]`` decodes the gate side alone, the same ranking as with every side."""
    every = decode_neurons(llama, k=3, method="plain", progress=False)
    gate = decode_neurons(llama, k=3, method="plain", inputs=["gate"], progress=False)
    assert set(every.inputs) == {"gate", "in"} and set(gate.inputs) == {"gate"}
    assert torch.equal(gate.inputs["gate"].ids, every.inputs["gate"].ids)
    assert torch.equal(gate.inputs["gate"].logits, every.inputs["gate"].logits)
    assert torch.equal(gate.promoted.ids, every.promoted.ids)


def test_progress_covers_all_phases(llama):
    seen = []
    decode_neurons(llama, k=3, method="bf16", progress=lambda done, total: seen.append((done, total)))
    rows = llama.layout.n_layers * llama.layout.d_mlp
    assert seen[-1] == (3 * rows, 3 * rows)  # outputs, gate, in
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_gemma_inputs_use_the_embedding_scale():
    model = get_tiny("gemma3_text")
    assert embed_scale(model) == pytest.approx(model.layout.d_model**0.5, rel=1e-3)
    # the raw ("none") input tokens are the embedding rows times that scale
    torch.testing.assert_close(input_tokens(model, "none"), model.W.W_E.float() * embed_scale(model))


# -- SmolLM2 -------------------------------------------------------------------------------------------------
NOUNS = [
    " dog",
    " dogs",
    " cat",
    " cats",
    " water",
    " car",
    " house",
    " fish",
    " tree",
    " horse",
    " bird",
    " book",
    " food",
    " coffee",
    " music",
    " money",
    " fire",
    " city",
    " king",
    " rain",
    " snow",
    " bread",
    " milk",
    " children",
    " phone",
    " computer",
    " ship",
    " train",
    " river",
    " mountain",
    " flower",
    " gold",
    " oil",
    " sugar",
    " eye",
    " school",
    " sea",
    " hair",
    " hands",
    " blood",
]
PROMPT = "Let me tell you a story about the"
CALIBRATION = [
    "The weather today is nice, so I think",
    "My favourite thing in the world is",
    "Once upon a time there was a",
    "The most important lesson I learned is",
]


@pytest.fixture(scope="module")
def smollm2_neurons(smollm2):
    """The fast kernel on the layers the tests read: 0, 14 and the last third (where word neurons live)."""
    return decode_neurons(smollm2, layers=[0, 14, *range(20, 30)], k=20, inputs=False)


@pytest.mark.slow
def test_smollm2_pruned_equals_plain_on_whole_layers(smollm2, smollm2_neurons):
    """The exact pruned top-k (auto kernel) == plain float32 matmul + topk, for every neuron of 3 layers."""
    layers = [0, 14, 29]
    plain = decode_neurons(smollm2, layers=layers, k=20, inputs=False, method="plain")
    d_mlp = smollm2.layout.d_mlp
    rows = torch.cat([torch.arange(smollm2_neurons.row(l, 0), smollm2_neurons.row(l, 0) + d_mlp) for l in layers])
    for fast, ref in ((smollm2_neurons.promoted, plain.promoted), (smollm2_neurons.suppressed, plain.suppressed)):
        same = (fast.ids[rows].sort(1).values == ref.ids.sort(1).values).all(1)
        assert same.float().mean() > 0.999  # the rest: float32 ties at the k-th rank
        torch.testing.assert_close(fast.logits[rows][same], ref.logits[same], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(fast.logits[rows], ref.logits, atol=1e-4, rtol=1e-5)  # ties have equal values


def _max_activation(model, layer: int, neuron: int) -> float:
    peak = 0.0
    for prompt in CALIBRATION:
        cache = model.run(prompt, capture=[f"L{layer}.mlp.act"])
        peak = max(peak, cache.neurons(layer, neuron).abs().max().item())
    return peak


def _probability(model, token: int, clamp: tuple[int, int, float] | None = None) -> float:
    replace = None
    if clamp is not None:
        layer, neuron, value = clamp

        def set_neuron(act, site):
            act = act.clone()
            act[..., neuron] = value  # every position
            return act

        replace = {f"L{layer}.mlp.act": set_neuron}
    cache = model.run(PROMPT, replace=replace)
    return torch.softmax(cache.logits[0, -1].float(), -1)[token].item()


@pytest.mark.slow
def test_smollm2_clamping_a_word_neuron_makes_the_model_say_the_word(smollm2, smollm2_neurons):
    """Decoding finds a neuron whose top promoted token is a concrete noun; clamping it high raises
    that noun's next-token probability, while clamping a neuron with another top noun does not."""
    model, dec = smollm2, smollm2_neurons
    noun_ids = {}
    for word in NOUNS:
        ids = model.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) == 1:
            noun_ids[ids[0]] = word
    top1, logit1 = dec.promoted.ids[:, 0], dec.promoted.logits[:, 0]
    candidates = [i for i in torch.argsort(logit1, descending=True).tolist() if top1[i].item() in noun_ids]
    assert len(candidates) >= 2, "no neuron decodes to a concrete noun"
    target = candidates[0]
    control = next(i for i in candidates if top1[i] != top1[target])
    word = top1[target].item()
    (t_index, t_neuron), (c_index, c_neuron) = divmod(target, model.layout.d_mlp), divmod(control, model.layout.d_mlp)
    t_layer, c_layer = dec.layers[t_index], dec.layers[c_index]

    base = _probability(model, word)
    boosted = _probability(model, word, (t_layer, t_neuron, 10 * _max_activation(model, t_layer, t_neuron)))
    controlled = _probability(model, word, (c_layer, c_neuron, 10 * _max_activation(model, c_layer, c_neuron)))
    message = (
        f"L{t_layer}.N{t_neuron} ({noun_ids[word]!r}) vs control L{c_layer}.N{c_neuron} "
        f"({noun_ids[top1[control].item()]!r}): base {base:.2e}, clamped {boosted:.2e}, "
        f"control {controlled:.2e}"
    )
    assert boosted > 20 * base, message
    assert controlled <= base, message


# -- CLI -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):

    return str(save_tiny_hf(tmp_path_factory.mktemp("tiny-llama")))


def test_cli_neurons_json_matches_the_python_api(tiny_dir):
    import json

    from typer.testing import CliRunner

    import lmatlas
    from lmatlas.cli import app

    result = CliRunner().invoke(app, ["neurons", tiny_dir, "--layer", "1", "--top", "4", "--sort", "index", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layer"] == 1 and data["k"] == 4 and len(data["neurons"]) == 96
    model = lmatlas.load(tiny_dir)
    expected = decode_neurons(model, layers=[1], k=4, method="plain").neuron(1, 17, model.tokenizer)
    got = data["neurons"][17]
    assert got["neuron"] == "L1.N17"
    for key in ("promoted", "suppressed", "excited_by_gate", "excited_by_in"):
        assert [t for t, _ in got[key]] == [t for t, _ in expected[key]]
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in expected[key]], abs=1e-3)


def test_cli_neurons_table_and_bad_input(tiny_dir):
    from typer.testing import CliRunner

    from lmatlas.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["neurons", tiny_dir, "--layer", "0", "--neuron", "3", "--top", "5"])
    assert result.exit_code == 0, result.output
    assert "L0.N3" in result.stdout and "promoted" in result.stdout and "L0.N4" not in result.stdout
    for args, message in (
        (["--layer", "9"], "Layer 9 is out of range"),
        (["--layer", "0", "--neuron", "500"], "Neuron 500 is out of range"),
        (["--layer", "0", "--top", "0"], "greater than or equal to 1"),
    ):
        result = runner.invoke(app, ["neurons", tiny_dir, *args])
        assert result.exit_code == 2, result.output
        assert message in result.output


def test_decode_benchmark_quick(capsys, monkeypatch):
    """bench/decode.py --quick prints one JSON object: timings, ratios and an exact comparison with plain."""
    import json
    import runpy
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench" / "decode.py"
    monkeypatch.setattr(sys, "argv", ["decode.py", "--quick", "--methods", "bf16,int8"])
    runpy.run_path(str(bench), run_name="__main__")
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "decode" and report["neurons"] == 192
    assert report["results"]["plain"]["ratio_vs_plain"] == 1.0
    for method in ("bf16", "int8"):
        assert report["results"][method]["median_s"] > 0
        for side in ("top", "bottom"):
            exact = report["exact"][method][side]
            assert exact["real_differences"] == 0
            assert exact["identical_sets"] + exact["tie_only_differences"] == 192
