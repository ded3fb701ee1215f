"""The logit lens, checked against a direct computation and against the model's own output.

The direct reference does not use lmatlas's hooks or vocab projection: plain PyTorch
forward hooks on the decoder blocks capture their outputs, then the native final norm,
``@ lm_head.weight.T (+ bias)``, the config's soft-cap, and float64 softmax / entropy /
KL over the full ``[pos, d_vocab]`` matrices.
"""

from __future__ import annotations

import json

import pytest
import torch
from support.models import TINY_TYPES, get_tiny

from lmatlas.decode.lens import logit_lens
from lmatlas.decode.vocab import DecodeError
from lmatlas.model.arch import get_path

PROMPT = "The cat sat on the mat."


def direct_lens(model, prompt: str):
    """``(embedding stream, [layers] log-probs [pos, V] float64, final log-probs)`` computed by hand."""
    outputs, handles = [], []
    for block in model.blocks:
        handles.append(block.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o)))
    handles.append(
        model.blocks[0].register_forward_pre_hook(
            lambda m, args, kwargs: outputs.insert(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
    )
    try:
        ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            final = model.hf(input_ids=ids, use_cache=False).logits[0].double()
    finally:
        for handle in handles:
            handle.remove()
    config = model.hf.config
    cap = getattr(config, "final_logit_softcapping", None)
    head = model.hf.lm_head
    logps = []
    with torch.no_grad():
        for stream in outputs:
            x = get_path(model.hf, model.spec.final_norm)(stream[0]).double()
            logits = x @ head.weight.double().T
            if head.bias is not None:
                logits = logits + head.bias.double()
            if cap:
                logits = cap * torch.tanh(logits / cap)
            logps.append(torch.log_softmax(logits, -1))
    return logps[0], logps[1:], torch.log_softmax(final, -1)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_lens_matches_the_direct_computation(model_type):
    model = get_tiny(model_type)
    result = logit_lens(model, PROMPT, k=4, include_embed=True)
    embed, layers, final = direct_lens(model, PROMPT)
    assert result.labels == ["embed"] + [f"L{i}" for i in range(model.layout.n_layers)]
    assert result.shape == (model.layout.n_layers + 1, len(PROMPT))  # byte tokenizer: one token per character
    final_ids = final.argmax(-1)
    assert torch.equal(result.final_ids, final_ids)
    for r, logp in enumerate([embed] + layers):
        p = logp.exp()
        top = torch.topk(p, 4, dim=-1)
        torch.testing.assert_close(result.top_probs[r].double(), top.values, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.gather(-1, result.top_ids[r]), top.values, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            result.final_prob[r].double(), p[torch.arange(p.shape[0]), final_ids], rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(result.entropy[r].double(), -(p * logp).sum(-1), rtol=1e-4, atol=1e-5)
        kl = (final.exp() * (final - logp)).sum(-1)
        torch.testing.assert_close(result.kl[r].double(), kl, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_last_layer_is_the_models_output(model_type):
    """Independent of the lens code: the model's own logits, softmaxed."""
    model = get_tiny(model_type)
    result = logit_lens(model, PROMPT, k=3)
    probs = torch.softmax(model.forward(PROMPT)[0].double(), -1)
    top = torch.topk(probs, 3, dim=-1)
    torch.testing.assert_close(result.top_probs[-1].double(), top.values, rtol=1e-5, atol=1e-7)
    assert torch.equal(result.top_ids[-1, :, 0], top.indices[:, 0])
    assert torch.equal(result.final_ids, top.indices[:, 0])
    torch.testing.assert_close(result.final_prob[-1], result.top_probs[-1, :, 0])
    assert float(result.kl[-1].abs().max()) < 1e-5


def test_token_ids_and_strings_agree(llama):
    result = logit_lens(llama, PROMPT, k=2)
    assert result.input_tokens == list(PROMPT)
    ids = result.top_ids[0, 0].tolist()
    decoded = llama.tokenizer.batch_decode([[i] for i in ids])
    # plain decoding, except that byte tokens (decoding to U+FFFD) show their byte: <0xE2>; the byte of a
    # token id comes from encoding characters and pairing their UTF-8 bytes with the ids
    byte_of = {}
    for cp in [*range(0x80, 0x800), *range(0x800, 0x10000, 0x101), *range(0x10000, 0x110000, 0x1001)]:
        if not 0xD800 <= cp <= 0xDFFF:
            char = chr(cp)
            byte_of.update(zip(llama.tokenizer.encode(char, add_special_tokens=False), char.encode()))
    assert result.top_tokens[0][0] == [
        d if "\ufffd" not in d else f"<0x{byte_of[i]:02X}>" for i, d in zip(ids, decoded)
    ]
    data = result.to_dict()
    json.dumps(data)
    assert [row["layer"] for row in data["layers"]] == ["L0", "L1"]
    cell = data["layers"][1]["positions"][3]
    assert cell["top"][0]["id"] == int(result.top_ids[1, 3, 0]) and cell["kl"] == pytest.approx(float(result.kl[1, 3]))


def test_token_ids_work_without_text(llama):
    ids = torch.tensor([10, 20, 30, 40])
    by_ids = logit_lens(llama, ids, k=2)
    assert torch.equal(by_ids.input_ids, ids) and by_ids.shape == (2, 4)


@pytest.mark.parametrize("inputs, k", [(["a b", "c d"], 3), ("abc", 0), ("abc", 10_000)])
def test_bad_requests_raise_clear_errors(llama, inputs, k):
    with pytest.raises(DecodeError):
        logit_lens(llama, inputs, k=k)


@pytest.mark.slow
def test_smollm2_lens_ends_at_the_models_prediction(smollm2):
    prompt = "The capital of France is"
    result = logit_lens(smollm2, prompt, k=5)
    assert result.shape == (30, smollm2.tokenize(prompt)["input_ids"].shape[1])
    predicted = smollm2.generate(prompt, max_new_tokens=1)  # greedy decoding, decoded on its own path
    assert result.top_tokens[-1][-1][0].strip() == predicted.strip() and predicted.strip()
    assert float(result.kl[-1].abs().max()) < 1e-4
    # a robust fact only (no claim of monotone entropy or KL): layer 0 is far from the output
    assert float(result.kl[0, -1]) > 1.0


def test_lens_without_texts_gives_the_same_numbers_and_a_reused_buffer_the_same_logits():
    """``texts=False`` (the atlas stage's call) changes only the spelled tokens; ``project(out=...)``
    writes the same logits into a larger reused buffer as into a fresh one."""
    from lmatlas.decode.vocab import project

    model = get_tiny(TINY_TYPES[0])
    spelled = logit_lens(model, PROMPT, k=3, include_embed=True)
    bare = logit_lens(model, PROMPT, k=3, include_embed=True, texts=False)
    for name in ("top_ids", "top_probs", "final_ids", "final_prob", "entropy", "kl"):
        assert torch.equal(getattr(spelled, name), getattr(bare, name)), name
    assert spelled.top_tokens is not None and bare.top_tokens is None and bare.final_tokens is None
    vectors = torch.randn(5, model.layout.d_model, generator=torch.Generator().manual_seed(0))
    buffer = torch.full((9, model.layout.d_vocab), float("nan"))
    assert torch.equal(project(model, vectors, norm="full", out=buffer), project(model, vectors, norm="full"))


def test_top1_is_the_first_maximum_like_topk_ties_and_nan_included():
    """The lens reads its ``k = 1`` top token as the row maximum: the same value and id as
    ``torch.topk(p, 1)`` on rows with exact ties, NaNs, zeros and a single candidate."""
    from lmatlas.decode.lens import _top

    gen = torch.Generator().manual_seed(0)
    p = torch.rand(8, 300, generator=gen)
    p[1, [5, 17, 290]] = 2.0  # a three-way tie at the maximum
    p[2] = 0.0  # every entry tied
    p[3, [40, 41]] = float("nan")  # NaN ranks first, the first NaN wins
    p[4, [0, 299]] = 3.0  # the tie at both ends of the row
    p[5, 7] = float("inf")
    for k in (1, 3):
        got, ref = _top(p, k), torch.topk(p, k, dim=-1)
        assert torch.equal(got[1], ref.indices)
        assert torch.equal(got[0].view(torch.int32), ref.values.view(torch.int32))
    assert _top(p, 1)[1][:5, 0].tolist() == [int(p[0].argmax()), 5, 0, 40, 0]
    # and on the lens itself: k = 1 agrees with the first column of a larger k
    model = get_tiny(TINY_TYPES[0])
    one, five = logit_lens(model, PROMPT, k=1, texts=False), logit_lens(model, PROMPT, k=5, texts=False)
    assert torch.equal(one.top_ids[..., 0], five.top_ids[..., 0])
    assert torch.equal(one.top_probs[..., 0], five.top_probs[..., 0])
