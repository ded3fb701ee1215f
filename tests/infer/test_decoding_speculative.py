"""Speculative decoding: identical to greedy with every drafter, acceptance bookkeeping, draft heads, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from support.models import TINY_TYPES, get_tiny

from lmatlas.errors import LmatlasError
from lmatlas.infer.decoding.distill import continuations, head_agreement, head_targets, prompt_token_lists
from lmatlas.infer.decoding.draft_heads import (
    DraftHeads,
    DraftHeadsError,
    load_draft_heads,
    save_draft_heads,
    train_draft_heads,
)
from lmatlas.infer.decoding.drafters import EarlyExit, Heads, PromptLookup, make_drafter
from lmatlas.infer.decoding.speculative import speculative_generate

PROMPTS = ["abc abc abc abd abc ab", "The quick brown fox. The quick", "x = 1; y = 2; x = 1; y ="]


def _greedy(model, ids, n):
    with torch.no_grad():
        out = model.hf.generate(input_ids=ids, do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def _drafters(model):
    out = [PromptLookup(), Heads(DraftHeads(3, model.layout.d_model))]
    if "sliding_attention" not in (getattr(model.hf.config, "layer_types", None) or []):
        out.append(EarlyExit(1))
    return out


@pytest.mark.parametrize("family", TINY_TYPES)
def test_identical_to_greedy_every_drafter(family):
    model = get_tiny(family)
    for prompt in PROMPTS[:2]:
        ids = model.tokenize(prompt)["input_ids"]
        greedy = _greedy(model, ids, 24)
        for drafter in _drafters(model):
            for draft_len in (1, 4) if family == "llama" else (3,):
                result = speculative_generate(model, ids, drafter, 24, draft_len=draft_len)
                assert result.token_ids == greedy, (type(drafter).__name__, draft_len, prompt)
                assert sum(a + 1 for a in result.accepted) + 1 >= len(result.token_ids)
                assert all(0 <= a <= d <= draft_len for a, d in zip(result.accepted, result.drafted))


class _Oracle:
    """Proposes the true greedy continuation (or a wrong token), to check the acceptance arithmetic."""

    def __init__(self, tokens, prompt_len, wrong=False):
        self.tokens, self.prompt_len, self.wrong = tokens, prompt_len, wrong

    def check(self, hf):
        pass

    def propose(self, state, k):
        done = len(state.ids) - self.prompt_len
        nxt = self.tokens[done : done + k]
        return [(t + 1) % 200 for t in nxt] if self.wrong else nxt


def test_acceptance_arithmetic():
    model = get_tiny("llama")
    ids = model.tokenize(PROMPTS[1])["input_ids"]
    greedy = _greedy(model, ids, 21)
    perfect = speculative_generate(model, ids, _Oracle(greedy, ids.shape[1]), 21, draft_len=4)
    assert perfect.token_ids == greedy
    assert perfect.accepted == [4, 4, 4, 4] and perfect.mean_accepted_length == 5.0  # 1 + 4 rounds x 5 tokens
    wrong = speculative_generate(model, ids, _Oracle(greedy, ids.shape[1], wrong=True), 21, draft_len=4)
    assert wrong.token_ids == greedy and set(wrong.accepted) == {0} and len(wrong.accepted) == 20


def test_prompt_lookup_proposes_the_continuation_of_the_last_ngram():
    class State:
        ids = [5, 6, 7, 8, 9, 5, 6, 7]

    assert PromptLookup().propose(State, 2) == [8, 9]
    State.ids = [1, 2, 3]
    assert PromptLookup().propose(State, 3) == []


def test_draft_heads_train_save_load(tmp_path):
    model = get_tiny("llama")
    texts = ["the cat sat on the mat and the dog sat on the log " * 8]
    heads = train_draft_heads(
        model, 2, n_prompts=8, prompt_len=8, new_tokens=24, minutes=1, max_steps=60, batch=64, lr=1e-2, texts=texts
    )
    train = heads.meta["train"]
    assert train["steps"] == 60 and train["final_loss"] < train["first_loss"] and train["data"] == "corpus"
    assert len(train["heldout_top1"]) == 2 and train["heldout_positions"] > 0
    assert heads.vocab is not None and 0 < train["draft_vocab"] <= 4096 and 0 < train["draft_vocab_coverage"] <= 1
    path = save_draft_heads(heads, model, tmp_path / "h.safetensors")
    loaded = load_draft_heads(model, path)
    assert torch.equal(loaded.weight, heads.weight) and torch.equal(loaded.bias, heads.bias)
    assert torch.equal(loaded.vocab, heads.vocab)
    ids = model.tokenize(PROMPTS[0])["input_ids"]
    result = speculative_generate(model, ids, make_drafter(model, "heads", heads_path=str(path)), 30, draft_len=2)
    assert result.token_ids == _greedy(model, ids, 30)
    confident = speculative_generate(
        model, ids, make_drafter(model, "heads", heads_path=str(path), min_prob=0.3), 30, draft_len=2
    )
    assert confident.token_ids == result.token_ids and sum(confident.drafted) <= sum(result.drafted)
    with pytest.raises(LmatlasError, match="min_prob"):
        make_drafter(model, "heads", heads_path=str(path), min_prob=1.0)
    # independent re-computation of a head's draft: lm_head(h + silu(W h + b))
    h = torch.randn(model.layout.d_model)
    logits = model.hf.lm_head(h + torch.nn.functional.silu(loaded.weight[1] @ h + loaded.bias[1]))
    assert loaded.propose(model.hf, h, 2)[1] == int(loaded.vocab[logits[loaded.vocab].argmax()])
    loaded.vocab = None  # the whole vocabulary
    assert loaded.propose(model.hf, h, 2)[1] == int(logits.argmax())
    from lmatlas.model.tiny import tiny_model

    other = tiny_model("llama", seed=1)  # same architecture, other weights
    with pytest.raises(DraftHeadsError, match="another model"):
        load_draft_heads(other, path)


def test_distillation_targets_and_agreement():
    """Hand-built case: labels of head k are the model's own tokens k + 1 places after the next one,
    prompt / after-end positions are never targets, and the agreement counts top-1 hits."""
    tokens = torch.tensor([[-100, -100, 5, 6, 7, 8, 9, -100]])  # [1, 8]: prompt 2, 5 own tokens, pad
    hidden = torch.arange(8.0).view(1, 8, 1).expand(1, 8, 3).contiguous()  # h_t = [t, t, t]
    states, labels = head_targets(hidden, tokens, 2)
    # h_t (predicting tokens[t+1]) needs tokens[t+2], tokens[t+3] >= 0: t = 0 .. 3 (span = 8 - 1 - 2 = 5)
    assert states[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert labels.tolist() == [[5, 6, 7, 8], [6, 7, 8, 9]]

    identity = DraftHeads(2, 3)  # untrained heads: h + silu(0 h + 0) = h
    lm_head = torch.nn.Linear(3, 10, bias=False)
    with torch.no_grad():
        lm_head.weight.zero_()
        lm_head.weight[6] = 1.0  # every state (t > 0) guesses token 6
        lm_head.weight[8] = 0.5
    assert head_agreement(identity, lm_head, states[1:], labels[:, 1:]) == pytest.approx([1 / 3, 0.0])
    # a draft vocabulary without token 6: the argmax among the kept rows (8 beats 2 and 9)
    narrow = DraftHeads(2, 3, vocab=torch.tensor([2, 8, 9]))
    assert narrow.guess(lm_head, states[1:]).tolist() == [[8, 8, 8], [8, 8, 8]]
    assert head_agreement(narrow, lm_head, states[1:], labels[:, 1:]) == pytest.approx([1 / 3, 1 / 3])
    # the confidence cut: at h = [1, 1, 1] the logits are 3 (token 6), 1.5 (token 8), 0 (8 others)
    p6 = math.exp(3) / (math.exp(3) + math.exp(1.5) + 8)  # 0.617, the same for both heads
    hf = type("HF", (), {"get_output_embeddings": lambda self: lm_head})()
    h = torch.ones(3)
    assert identity.propose(hf, h, 2) == [6, 6] and identity.propose(hf, h, 2, min_prob=p6 - 0.01) == [6, 6]
    assert identity.propose(hf, h, 2, min_prob=p6 + 0.01) == []
    assert identity.guess(lm_head, h, with_prob=True)[1].tolist() == pytest.approx([p6, p6])


def test_draft_heads_chat_data_tiny():
    from lmatlas.model.tiny import tiny_model

    model = tiny_model("llama")
    with pytest.raises(LmatlasError, match="no chat template"):
        train_draft_heads(model, 2, data="chat", n_prompts=4, new_tokens=12, max_steps=2)
    with pytest.raises(LmatlasError, match="Unknown distillation source"):
        train_draft_heads(model, 2, data="books", n_prompts=4, new_tokens=12, max_steps=2)
    model.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    prompts = prompt_token_lists(model, "chat", 3, 0, None)
    assert len({len(p) for p in prompts}) > 1  # prompts of unequal length: left padding
    hidden, tokens = continuations(model, prompts, 10)
    width = max(len(p) for p in prompts)
    assert (tokens[:, :width] == -100).all() and hidden.shape[:2] == tokens.shape
    for row, prompt in enumerate(prompts):  # each row is the model's own greedy answer
        ids = torch.tensor([prompt])
        with torch.no_grad():
            alone = model.hf.generate(input_ids=ids, do_sample=False, max_new_tokens=10, pad_token_id=0)[
                0, len(prompt) :
            ]
        own = tokens[row, width:]
        assert own[own >= 0].tolist() == alone[: int((own >= 0).sum())].tolist()
    heads = train_draft_heads(model, 2, data="chat", n_prompts=16, new_tokens=16, max_steps=20, lr=1e-2)
    assert heads.meta["train"]["data"] == "chat" and heads.meta["train"]["steps"] == 20


def test_bad_input(tmp_path, monkeypatch):
    model = get_tiny("llama")
    ids = model.tokenize("hello")["input_ids"]
    monkeypatch.setenv("LMATLAS_CACHE", str(tmp_path))
    with pytest.raises(LmatlasError, match="train-draft-heads"):
        make_drafter(model, "heads")
    with pytest.raises(LmatlasError, match="draft at least one"):
        speculative_generate(model, ids, PromptLookup(), 4, draft_len=0)
    with pytest.raises(LmatlasError, match="Unknown drafter"):
        make_drafter(model, "medusa")
    with pytest.raises(LmatlasError, match="choose 1"):
        make_drafter(model, "early-exit", layers=model.layout.n_layers)
    with pytest.raises(LmatlasError, match="one prompt"):
        speculative_generate(model, torch.cat([ids, ids]), PromptLookup(), 4)


@pytest.mark.slow
def test_speculative_on_smollm2(smollm2):
    model = smollm2
    prompts = [
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
        "List three colours: red, green, blue. Again: red,",
    ]
    for prompt in prompts:
        ids = model.tokenize(prompt)["input_ids"]
        greedy = _greedy(model, ids, 40)
        for drafter in (PromptLookup(), EarlyExit(26)):
            result = speculative_generate(model, ids, drafter, 40, draft_len=4)
            assert result.token_ids == greedy, type(drafter).__name__
