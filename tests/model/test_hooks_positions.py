"""Replacements know where they are: one edit means the same in a forward and at every step of generate."""

from __future__ import annotations

import threading

import pytest
import torch

from lmatlas.census import measure
from lmatlas.errors import SiteError
from lmatlas.model.tiny import TINY_CONFIGS, tiny_model

PROMPT = "The cat sat on"
NEW = 6


def _edit(model) -> dict:
    """Four replacements of different kinds: all positions, the last prompt token, a range, key positions."""
    d_model = model.layout.d_model
    push = torch.linspace(-1, 1, d_model)

    def halve_head_1(z, ctx):
        z = z.clone()
        z[:, :, 1] *= 0.5
        return z

    return {
        "L0.attn.z": halve_head_1,
        "L1.resid.pre@-1": lambda x, ctx: x + push,  # the last prompt token only, at every step
        "L0.mlp.out@6:": lambda x, ctx: x * 1.5,  # positions 6 and after (prompt tail and generated)
        "L1.attn.k@2": lambda k, ctx: torch.zeros_like(k),  # key position 2, re-applied at every step
    }


def _generate(model, batch, replace=None):
    def go():
        return model.hf.generate(
            **batch,
            max_new_tokens=NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=model.tokenizer.pad_token_id,
        )

    if replace is None:
        return go()
    with model.hooked(replace=replace):
        return go()


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_an_edit_during_generate_equals_the_edit_teacher_forced(model_type):
    model = tiny_model(model_type)
    batch = model.tokenize(PROMPT)
    n = batch["input_ids"].shape[1]
    edit = _edit(model)
    with torch.no_grad():
        edited = _generate(model, batch, edit)
        plain = _generate(model, batch)
    step_logits = torch.stack(edited.logits, dim=1)  # [1, NEW, vocab]: the logits of each decoding step
    forced = model.run(edited.sequences, replace=edit, prompt_len=n).logits[:, n - 1 : n - 1 + NEW]
    torch.testing.assert_close(step_logits, forced, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.stack(plain.logits, dim=1)[:, 0], step_logits[:, 0], atol=1e-3)


def test_a_tensor_patch_applies_row_by_row_during_generate(llama):
    """A full-length source tensor: every decoding step takes its own position's row (no expand_as failure)."""
    batch = llama.tokenize(PROMPT)
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        first = _generate(llama, batch)
    source = llama.run(first.sequences, capture=["L0.resid.post"])["L0.resid.post"] * 0.5  # [1, n + NEW, d]
    with torch.no_grad():
        patched = _generate(llama, batch, {"L0.resid.post": source})
        prompt_only = _generate(llama, batch, {"L0.resid.post": source[:, :n]})  # covers the prompt only
    forced = llama.run(patched.sequences, replace={"L0.resid.post": source}).logits[:, n - 1 : n - 1 + NEW]
    torch.testing.assert_close(
        torch.stack(patched.logits, 1)[:, : forced.shape[1]], forced[:, :NEW], rtol=1e-4, atol=1e-4
    )
    forced_prompt = llama.run(prompt_only.sequences, replace={"L0.resid.post": source[:, :n]}).logits
    torch.testing.assert_close(
        torch.stack(prompt_only.logits, 1), forced_prompt[:, n - 1 : n - 1 + NEW], rtol=1e-4, atol=1e-4
    )


def test_the_context_says_positions_step_batch_and_prompt(llama):
    seen = []

    def record(x, ctx):
        seen.append((ctx.step, ctx.positions.tolist(), ctx.batch, ctx.prompt_len, str(ctx)))
        return None

    batch = llama.tokenize(PROMPT)
    n = batch["input_ids"].shape[1]
    with torch.no_grad(), llama.hooked(replace={"L1.resid.post": record, "L0.mlp.act@-1": record}):
        _generate(llama, batch)
    post = [s for s in seen if s[4] == "L1.resid.post"]
    assert post[0] == (0, list(range(n)), 1, n, "L1.resid.post")
    assert [s[:2] for s in post[1:]] == [(k, [n - 1 + k]) for k in range(1, NEW)]
    last = [s for s in seen if s[4] == "L0.mlp.act"]
    assert last == [(0, [n - 1], 1, n, "L0.mlp.act")]  # @-1 is the last prompt token: the prompt forward only


def test_position_selectors_in_a_forward(llama):
    clean = llama.run(PROMPT, capture=["L0.resid.post"])["L0.resid.post"]
    n = clean.shape[1]
    cache = llama.run(
        PROMPT,
        capture=["L0.resid.post"],
        replace={
            "L0.resid.post@1:3": torch.zeros(1, 2, llama.layout.d_model),
            "L0.resid.post@-1": 7.0,
            "L0.resid.post@0,4": lambda x, ctx: x * 0 + ctx.positions.view(1, -1, 1).float(),
        },
    )
    got = cache["L0.resid.post"]
    assert float(got[:, 1:3].abs().max()) == 0.0
    assert float((got[:, n - 1] - 7.0).abs().max()) == 0.0
    assert float((got[:, 0]).abs().max()) == 0.0 and float((got[:, 4] - 4.0).abs().max()) == 0.0
    torch.testing.assert_close(got[:, 5 : n - 1], clean[:, 5 : n - 1])


@pytest.mark.parametrize(
    "replace, message",
    [
        ({"L0.attn.zz": 0.0}, "Did you mean 'attn.z'"),
        ({"L9.attn.z": 0.0}, "Layer 9 is out of range"),
        ({"L0.resid.post@99": 0.0}, "outside the input"),
        ({"L0.resid.post@-99": 0.0}, "outside the input"),
        ({"L0.resid.post@a:b": 0.0}, "Malformed positions"),
        ({"L0.attn.z": torch.zeros(3, 5)}, r"has shape \(3, 5\)"),
        ({"L0.attn.z": lambda z, ctx: z[:, :, :1]}, r"expected \(1, 14, 4, 16\)"),  # no silent broadcast over heads
        ({"L0.resid.post": torch.zeros(64)}, "exactly that shape"),  # a bare vector does not broadcast either
        ({"L0.resid.post@0,1": torch.zeros(1, 3, 64)}, "one entry per selected position"),
        ({"L0.mlp.out": lambda x, ctx: "nope"}, "returned str"),
    ],
)
def test_bad_replacements_are_clear_errors(llama, replace, message):
    calls = []
    handle = llama.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(SiteError, match=message):
            llama.run(PROMPT, replace=replace)
    finally:
        handle.remove()
    if "@" in next(iter(replace)) or "zz" in next(iter(replace)) or "L9" in next(iter(replace)):
        assert calls == []  # refused before any compute


def test_two_threads_on_two_copies_do_not_disturb_each_other():
    """Attention switch, hooks and memos are per model / per thread: concurrent runs give single-thread results."""
    a, b = tiny_model("llama"), tiny_model("llama")

    def sharpen(pattern, ctx):
        squared = pattern**2
        return squared / squared.sum(-1, keepdim=True)

    expected_a = a.run(PROMPT, replace={"attn.pattern": sharpen}).logits
    expected_b = b.forward(PROMPT)
    expected_b_act = b.run(PROMPT, capture=["L1.mlp.act"])["L1.mlp.act"]
    errors: list[str] = []
    start = threading.Barrier(2)

    def run_a():
        start.wait()
        for _ in range(25):
            with measure.shared():
                if not torch.equal(a.run(PROMPT, replace={"attn.pattern": sharpen}).logits, expected_a):
                    errors.append("a")

    def run_b():
        start.wait()
        for _ in range(25):
            if measure._MEMO.get() is not None:
                errors.append("memo leaked across threads")
            if not torch.equal(b.forward(PROMPT), expected_b):
                errors.append("b plain")
            if b.hf.config._attn_implementation != "sdpa":
                errors.append("b attention switched")
            if not torch.equal(b.run(PROMPT, capture=["L1.mlp.act"])["L1.mlp.act"], expected_b_act):
                errors.append("b capture")

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert a.hf.config._attn_implementation == "sdpa" and not a.hook_stack.sessions
