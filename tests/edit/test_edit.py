"""Edits: every intervention against a hand-written native hook, composition, files, generation, bad input."""

from __future__ import annotations

import pytest
import torch

from lmatlas.edit import Ablate, Add, Edit, Learned, Patch, Project, Scale, Set, stats_for
from lmatlas.errors import EditError, SiteError
from lmatlas.model.arch import get_path
from lmatlas.model.tiny import tiny_model

PROMPT = "The cat sat on the mat."
OTHER = "A dog ran in the park!!"  # same length in bytes: a patch source


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def native(model, module_path, fn, pre: bool, layer: int):
    """Run the plain model with one native PyTorch hook ``fn`` on a module of block ``layer``."""
    module = get_path(model.blocks[layer], module_path) if module_path else model.blocks[layer]
    handle = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        return model.forward(PROMPT)
    finally:
        handle.remove()


def _z_pre(head, new_value):
    def hook(module, args):
        z = args[0].clone().view(*args[0].shape[:-1], -1, 16)
        z[:, :, head] = new_value(z[:, :, head])
        return (z.reshape(args[0].shape),)

    return hook


def test_ablate_zero_head_equals_a_native_hook(model):
    expected = native(model, "self_attn.o_proj", _z_pre(2, torch.zeros_like), pre=True, layer=1)
    assert torch.equal(model.run(PROMPT, replace=Ablate("L1.H2")).logits, expected)


def test_ablate_mean_head_equals_a_native_hook(model):
    stats = stats_for(model)
    captured = []
    handle = model.blocks[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    try:
        model.hf(stats.input_ids)
    finally:
        handle.remove()
    mean = captured[0].view(*captured[0].shape[:-1], 4, 16).float().mean(dim=(0, 1))[2]  # independent mean
    expected = native(model, "self_attn.o_proj", _z_pre(2, lambda h: mean.expand_as(h)), pre=True, layer=1)
    torch.testing.assert_close(model.run(PROMPT, replace=Ablate("L1.H2", how="mean")).logits, expected)


def test_resample_draws_real_activations_deterministically(model):
    a = model.run(PROMPT, replace=Ablate("L1.N7", how="resample", seed=3), capture=["L1.mlp.act"])
    b = model.run(PROMPT, replace=Ablate("L1.N7", how="resample", seed=3), capture=["L1.mlp.act"])
    assert torch.equal(a.logits, b.logits)
    bank = stats_for(model)._banks[model.sites("L1.mlp.act")[0]][:, 7]
    drawn = a["L1.mlp.act"][0, :, 7]
    assert all(bool((bank - v).abs().min() < 1e-6) for v in drawn)


@pytest.mark.parametrize(
    "intervention, module_path, pre, layer, native_fn",
    [
        (
            Scale("L0.N5", 3.0),
            "mlp.down_proj",
            True,
            0,
            lambda m, a: (torch.cat([a[0][..., :5], a[0][..., 5:6] * 3.0, a[0][..., 6:]], -1),),
        ),
        (
            Set("L1.N9", 4.0),
            "mlp.down_proj",
            True,
            1,
            lambda m, a: (torch.cat([a[0][..., :9], torch.full_like(a[0][..., 9:10], 4.0), a[0][..., 10:]], -1),),
        ),
        (Scale("L0.H1", 0.5), "self_attn.o_proj", True, 0, _z_pre(1, lambda h: h * 0.5)),
    ],
)
def test_scale_and_set_equal_native_hooks(model, intervention, module_path, pre, layer, native_fn):
    expected = native(model, module_path, native_fn, pre=pre, layer=layer)
    assert torch.equal(model.run(PROMPT, replace=intervention).logits, expected)


def test_add_and_project_equal_native_hooks(model):
    vector = torch.linspace(-1, 1, 64)
    expected = native(model, None, lambda m, a, out: out + 2.0 * vector, pre=False, layer=0)
    assert torch.equal(model.run(PROMPT, replace=Add("L0.resid.post", vector, alpha=2.0)).logits, expected)
    unit = vector / vector.norm()
    removed = native(model, None, lambda m, a, out: out - (out @ unit)[..., None] * unit, pre=False, layer=0)
    torch.testing.assert_close(model.run(PROMPT, replace=Project("L0.resid.post", vector)).logits, removed)
    kept = native(model, None, lambda m, a, out: (out @ unit)[..., None] * unit, pre=False, layer=0)
    torch.testing.assert_close(model.run(PROMPT, replace=Project("L0.resid.post", vector, remove=False)).logits, kept)


def test_patch_with_a_full_source_cache_reproduces_the_source_run(model):
    source = model.run(OTHER, capture=["L0.resid.pre", "L1.attn.z"])
    patched = model.run(PROMPT, replace=Patch("L0.resid.pre", source))
    assert torch.equal(patched.logits, source.logits)
    z = source["L1.attn.z"][:, :, 3]
    expected = native(model, "self_attn.o_proj", _z_pre(3, lambda h: z), pre=True, layer=1)
    assert torch.equal(model.run(PROMPT, replace=Patch("L1.H3", source)).logits, expected)


def test_learned_intervention_is_trainable(model):
    layer = torch.nn.Linear(16, 16).double().float()
    with torch.no_grad():
        layer.weight.copy_(torch.eye(16))
        layer.bias.zero_()
    cache = model.run(PROMPT, replace=Learned("L1.H0", layer), grad=True)
    torch.testing.assert_close(cache.logits.detach(), model.forward(PROMPT))
    cache.logits[0, -1].logsumexp(-1).backward()
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0


def test_composition_order_is_left_to_right(model):
    vector = torch.ones(64)
    x = model.run(PROMPT, capture=["L0.resid.post"])["L0.resid.post"]
    first = model.run(
        PROMPT, replace=Scale("L0.resid.post", 2.0) | Add("L0.resid.post", vector), capture=["L0.resid.post"]
    )["L0.resid.post"]
    second = model.run(
        PROMPT, replace=Add("L0.resid.post", vector) | Scale("L0.resid.post", 2.0), capture=["L0.resid.post"]
    )["L0.resid.post"]
    torch.testing.assert_close(first, x * 2 + 1)
    torch.testing.assert_close(second, (x + 1) * 2)


def test_an_edit_inside_generate_equals_the_edit_teacher_forced(model):
    edit = Ablate("L1.H2") | Set("L0.N3@-1", 5.0) | Add("L1.resid.mid@4:", torch.full((64,), 0.3))
    batch = model.tokenize("Once upon")
    n = batch["input_ids"].shape[1]
    with model.edit(edit), torch.no_grad():
        out = model.hf.generate(
            **batch,
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    forced = model.run(out.sequences, replace=edit, prompt_len=n).logits[:, n - 1 : n + 5]
    torch.testing.assert_close(torch.stack(out.logits, 1), forced, rtol=1e-4, atol=1e-4)


def test_steps_choose_the_forward_calls(model):
    batch = model.tokenize("Once upon")
    n = batch["input_ids"].shape[1]
    vector = torch.full((64,), 0.5)

    def logits(edit):
        with model.edit(edit), torch.no_grad():
            out = model.hf.generate(
                **batch,
                max_new_tokens=5,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=model.tokenizer.pad_token_id,
            )
        return torch.stack(out.logits, 1)

    torch.testing.assert_close(
        logits(Add("L0.resid.post", vector, steps="prompt")), logits(Add(f"L0.resid.post@:{n}", vector))
    )
    torch.testing.assert_close(
        logits(Add("L0.resid.post", vector, steps="generated")), logits(Add(f"L0.resid.post@{n}:", vector))
    )
    torch.testing.assert_close(
        logits(Add("L0.resid.post", vector, steps=(2, 4))), logits(Add(f"L0.resid.post@{n + 1}:{n + 3}", vector))
    )


def test_save_and_load_round_trip(model, tmp_path):
    edit = (
        Ablate("L1.H2")
        | Scale("L0.N5", 3.0)
        | Set("L1.N9@-1", 4.0)
        | Add("L0.resid.post", torch.linspace(0, 1, 64), alpha=2.0, steps=(1, 3))
        | Project("L1.resid.mid", torch.ones(64))
        | Patch("L1.H0", torch.zeros(1, 23, 4, 16))
    )
    path = edit.save(tmp_path / "my.edit.json", model)
    assert (tmp_path / "my.edit.safetensors").exists()
    loaded = Edit.load(path, model)
    assert loaded.describe() == edit.describe()
    assert torch.equal(model.run(PROMPT, replace=loaded).logits, model.run(PROMPT, replace=edit).logits)
    assert b"pickle" not in path.read_bytes()


def test_an_edit_file_of_another_model_is_refused(model, tmp_path):
    path = (Ablate("L1.H2") | Add("L0.resid.post", torch.ones(64))).save(tmp_path / "e.json", model)
    other = tiny_model("llama", seed=1)
    with pytest.raises(EditError, match="does not transfer"):
        Edit.load(path, other)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(EditError, match="Cannot read"):
        Edit.load(tmp_path / "junk.json", model)


def test_provenance_and_the_edited_handle(model):
    plain = model.forward(PROMPT)
    edit = Ablate("L1.H2") | Scale("L0.N5", 3.0)
    handle = model.edited(edit)
    edited = handle.run(PROMPT)
    assert edited.edit == edit.describe()
    assert not torch.equal(edited.logits, plain)
    assert torch.equal(model.forward(PROMPT), plain)  # the original is untouched
    assert "edit" not in model.card() and handle.card()["edit"] == edit.describe()
    with model.edit(edit):
        assert model.card()["edit"] == edit.describe()
        assert torch.equal(model.forward(PROMPT), edited.logits)


def test_compare_scores_both_continuations_under_both_models(model):
    edit = Ablate("L1.H2") | Ablate("L0.H1") | Set("L1.N9", 8.0)
    result = model.generate("Once upon", 6, edit=edit, compare=True)
    n = model.tokenize("Once upon")["input_ids"].shape[1]
    for continuation in (result.plain, result.edited):
        ids = torch.cat([model.tokenize("Once upon")["input_ids"][0], torch.tensor(continuation.ids)])[None]
        for under, edit_used in ((continuation.logprob_plain, None), (continuation.logprob_edited, edit)):
            logits = model.run(ids, replace=edit_used).logits[0, n - 1 : n - 1 + len(continuation.ids)]
            expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(continuation.ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(under), expected, rtol=1e-5, atol=1e-5)
    assert (
        result.plain.ids
        == model.hf.generate(
            **model.tokenize("Once upon"), max_new_tokens=6, do_sample=False, pad_token_id=model.tokenizer.pad_token_id
        )[0, n:].tolist()
    )


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (Ablate("L0.attn.zz"), SiteError, "Did you mean"),
        (Ablate("L1.H9"), SiteError, "Head 9 is out of range"),
        (Set("L1.N500", 1.0), SiteError, "Neuron 500 is out of range"),
        (Add("L0.resid.post", torch.ones(63)), EditError, r"needs \(64,\)"),
        (Add("L0.resid.post", torch.tensor([float("nan")] * 64)), EditError, "NaN or infinite"),
        (Set("L1.N9", float("inf")), EditError, "finite"),
        (Scale("L1.H1", float("nan")), EditError, "finite"),
        (Set("L1.N9@40", 1.0), SiteError, "outside the input"),
        (Ablate("L1.H1", how="average"), EditError, "zero, mean, resample"),
        (Add("L0.resid.post", torch.ones(64), steps="later"), EditError, "steps="),
        (Patch("L1.H0", {}), EditError, "holds no L1.attn.z"),
    ],
)
def test_bad_edits_fail_before_any_compute(model, edit, error, message):
    calls = []
    handle = model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error, match=message):
            model.run(PROMPT, replace=edit)
    finally:
        handle.remove()
    assert calls == []
    assert not model.hook_stack.sessions
