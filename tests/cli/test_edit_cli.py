"""``lmatlas generate``: plain and edited continuations, checked against native PyTorch hooks and a hand-run greedy loop.

The tiny models are saved to directories (the CLI loads models by source); every
continuation and log-probability the command prints is recomputed here without
lmatlas: a greedy loop of full forwards through the Hugging Face module, with the
edit written as plain ``register_forward_pre_hook`` / ``register_forward_hook`` hooks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack

import pytest
import torch
from typer.testing import CliRunner

from lmatlas.cli import app
from lmatlas.model.tiny import byte_tokenizer, tiny_hf_model

runner = CliRunner()
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}{% if add_generation_prompt %}<bos>{% endif %}"
)
EOS, D_HEAD = 257, 16  # the tiny models' <eos> id and head size (4 query heads, d_model 64)


def _save(path, seed: int, chat: bool):
    hf = tiny_hf_model("llama", seed=seed)
    tokenizer = byte_tokenizer()
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return hf, tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(directory, hf module, tokenizer)`` of a tiny llama with a chat template."""
    path = tmp_path_factory.mktemp("tiny-llama")
    hf, tokenizer = _save(path, 0, chat=True)
    return str(path), hf.eval(), tokenizer


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another tiny llama (other weights, no chat template)."""
    path = tmp_path_factory.mktemp("tiny-llama-other")
    _save(path, 1, chat=False)
    return str(path)


def invoke(*args: str):
    result = runner.invoke(app, ["generate", *args])
    return result


def json_of(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- independent re-computation ------------------------------------------------------------------------
def native_hooks(hf, ablate=(), scale=(), set_=(), add=None):
    """Edits as plain PyTorch hooks on the llama modules (head slices of o_proj's input, down_proj's input)."""
    layers = hf.model.layers
    stack = ExitStack()

    def on_input(module, fn):
        def pre(mod, args):
            x = args[0].clone()
            fn(x)
            return (x, *args[1:])

        stack.callback(module.register_forward_pre_hook(pre).remove)

    for layer, head in ablate:
        on_input(layers[layer].self_attn.o_proj, lambda x, h=head: x[..., h * D_HEAD : (h + 1) * D_HEAD].zero_())
    for layer, head, factor in scale:
        on_input(
            layers[layer].self_attn.o_proj, lambda x, h=head, f=factor: x[..., h * D_HEAD : (h + 1) * D_HEAD].mul_(f)
        )
    for layer, neuron, value in set_:
        on_input(layers[layer].mlp.down_proj, lambda x, n=neuron, v=value: x[..., n].fill_(v))
    if add is not None:
        layer, vector = add

        def post(mod, args, output):
            if isinstance(output, tuple):
                return (output[0] + vector, *output[1:])
            return output + vector

        stack.callback(layers[layer].register_forward_hook(post).remove)
    return stack


def native_greedy(hf, prompt_ids: list[int], n: int, hooks=None) -> tuple[list[int], list[float]]:
    """Greedy loop of full forwards (no KV cache), stopping at <eos>; then each new token's log-probability."""
    ids = list(prompt_ids)
    with torch.no_grad(), hooks if hooks is not None else ExitStack():
        for _ in range(n):
            logits = hf(torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
            if ids[-1] == EOS:
                break
        new = ids[len(prompt_ids) :]
        logits = hf(torch.tensor([ids]), use_cache=False).logits[0, len(prompt_ids) - 1 : len(ids) - 1]
    logprobs = torch.log_softmax(logits.float(), -1)[torch.arange(len(new)), torch.tensor(new)].tolist()
    return new, logprobs


def native_score(hf, prompt_ids: list[int], new: list[int], hooks=None) -> list[float]:
    with torch.no_grad(), hooks if hooks is not None else ExitStack():
        logits = hf(torch.tensor([prompt_ids + new]), use_cache=False).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(new)), torch.tensor(new)].tolist()


def prompt_of(tokenizer, text: str, chat: bool = False) -> list[int]:
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    return tokenizer(text)["input_ids"]


# -- plain generation ----------------------------------------------------------------------------------
def test_plain_generate_matches_a_native_greedy_loop(tiny):
    path, hf, tokenizer = tiny
    data = json_of(invoke(path, "hello there", "-n", "10", "--json"))
    new, logprobs = native_greedy(hf, prompt_of(tokenizer, "hello there"), 10)
    assert data["ids"] == new and data["prompt"] == "hello there" and data["chat"] is False
    assert data["logprob_plain"] == pytest.approx(logprobs, abs=1e-4)
    assert data["stopped_by"] is None and len(new) == 10


def test_chat_template_is_applied(tiny):
    path, hf, tokenizer = tiny
    data = json_of(invoke(path, "hi", "-n", "6", "--chat", "--json"))
    chat_ids = prompt_of(tokenizer, "hi", chat=True)
    assert chat_ids[0] == 256 and chat_ids != prompt_of(tokenizer, "hi")  # the template did something
    assert data["ids"] == native_greedy(hf, chat_ids, 6)[0] and data["chat"] is True


def test_plain_table_lists_tokens_with_log_probs(tiny):
    path, hf, tokenizer = tiny
    result = invoke(path, "hello there", "-n", "5")
    assert result.exit_code == 0, result.output
    assert "Continuation of 'hello there'" in result.stdout and "log p" in result.stdout
    _, logprobs = native_greedy(hf, prompt_of(tokenizer, "hello there"), 5)
    assert all(f"{lp:.3f}" in result.stdout for lp in logprobs)


# -- edited generation ---------------------------------------------------------------------------------
EDIT_ARGS = ("--ablate", "L0.H1", "--scale", "L1.H0=2", "--set", "L1.N3=5")


def test_edit_options_match_native_hooks(tiny):
    path, hf, tokenizer = tiny
    data = json_of(invoke(path, "hello there", "-n", "8", *EDIT_ARGS, "--json"))
    prompt = prompt_of(tokenizer, "hello there")
    hooks = lambda: native_hooks(hf, ablate=[(0, 1)], scale=[(1, 0, 2.0)], set_=[(1, 3, 5.0)])  # noqa: E731
    plain, plain_lp = native_greedy(hf, prompt, 8)
    edited, edited_lp = native_greedy(hf, prompt, 8, hooks())
    assert data["edit"] == [
        "Ablate('L0.H1', how='zero', seed=0)",
        "Scale('L1.H0', factor=2.0)",
        "Set('L1.N3', value=5.0)",
    ]
    assert data["plain"]["ids"] == plain and data["edited"]["ids"] == edited
    assert data["plain"]["logprob_plain"] == pytest.approx(plain_lp, abs=1e-4)
    assert data["edited"]["logprob_edited"] == pytest.approx(edited_lp, abs=1e-4)
    assert data["plain"]["logprob_edited"] == pytest.approx(native_score(hf, prompt, plain, hooks()), abs=1e-4)
    assert data["edited"]["logprob_plain"] == pytest.approx(native_score(hf, prompt, edited), abs=1e-4)
    first = next((i for i, (a, b) in enumerate(zip(plain, edited)) if a != b), None)
    assert data["first_difference"] == first and first is not None  # this edit changes the text


def test_side_by_side_table(tiny):
    path, hf, tokenizer = tiny
    result = invoke(path, "hello there", "-n", "8", *EDIT_ARGS)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in ("unedited", "edited", "First difference at token", "Set('L1.N3', value=5.0)", "plain"):
        assert expected in text, expected
    prompt = prompt_of(tokenizer, "hello there")
    edited, edited_lp = native_greedy(
        hf, prompt, 8, native_hooks(hf, ablate=[(0, 1)], scale=[(1, 0, 2.0)], set_=[(1, 3, 5.0)])
    )
    assert f"{edited_lp[-1]:.3f}" in text


def test_steering_vector_from_files_matches_native_addition(tiny, tmp_path):
    path, hf, tokenizer = tiny
    (tmp_path / "pos.txt").write_text("I love this\n\nwonderful day\n")
    (tmp_path / "neg.txt").write_text("I hate this\nawful day\n")
    data = json_of(
        invoke(
            path,
            "hello",
            "-n",
            "6",
            "--steer",
            "0",
            "--positive",
            str(tmp_path / "pos.txt"),
            "--negative",
            str(tmp_path / "neg.txt"),
            "--alpha",
            "3",
            "--json",
        )
    )

    def last_stream(texts):  # block 0's output at the last token: hidden_states[1]
        with torch.no_grad():
            return torch.stack(
                [
                    hf(
                        torch.tensor([tokenizer(t)["input_ids"]]), output_hidden_states=True, use_cache=False
                    ).hidden_states[1][0, -1]
                    for t in texts
                ]
            ).mean(0)

    vector = last_stream(["I love this", "wonderful day"]) - last_stream(["I hate this", "awful day"])
    prompt = prompt_of(tokenizer, "hello")
    edited, edited_lp = native_greedy(hf, prompt, 6, native_hooks(hf, add=(0, 3.0 * vector)))
    assert data["edit"] == ["Add('L0.resid.post', vector=tensor[64], alpha=3.0)"]
    assert data["edited"]["ids"] == edited
    assert data["edited"]["logprob_edited"] == pytest.approx(edited_lp, abs=1e-4)


def test_save_edit_then_reload_gives_the_same_continuations(tiny, tmp_path):
    path, _, _ = tiny
    (tmp_path / "pos.txt").write_text("good\n")
    (tmp_path / "neg.txt").write_text("bad\n")
    saved = tmp_path / "my.edit.json"
    first = json_of(
        invoke(
            path,
            "hello",
            "-n",
            "6",
            *EDIT_ARGS,
            "--steer",
            "1",
            "--positive",
            str(tmp_path / "pos.txt"),
            "--negative",
            str(tmp_path / "neg.txt"),
            "--save-edit",
            str(saved),
            "--json",
        )
    )
    assert first["saved_edit"] == str(saved) and (tmp_path / "my.edit.safetensors").is_file()
    document = json.loads(saved.read_text())
    assert [i["type"] for i in document["interventions"]] == ["Ablate", "Scale", "Set", "Add"]
    again = json_of(invoke(path, "hello", "-n", "6", "--edit", str(saved), "--json"))
    assert again["edit"] == first["edit"] and again["edited"] == first["edited"]
    more = json_of(invoke(path, "hello", "-n", "6", "--edit", str(saved), "--ablate", "L1.H2", "--json"))
    assert more["edit"] == first["edit"] + ["Ablate('L1.H2', how='zero', seed=0)"]


def test_empty_continuation_says_which_stop_token(tiny, tmp_path):
    """Steering the last block's output along <eos>'s unembedding row makes <eos> the first token."""
    from lmatlas.edit import Add, Edit
    from lmatlas.model.loading import load

    path, hf, _ = tiny
    model = load(path)
    eos_row = hf.lm_head.weight[EOS].detach()
    Edit((Add("L1.resid.post", eos_row, alpha=100.0),)).save(tmp_path / "eos.edit.json", model)
    data = json_of(invoke(path, "hello", "-n", "5", "--edit", str(tmp_path / "eos.edit.json"), "--json"))
    assert data["edited"]["ids"] == [EOS] and data["edited"]["text"] == ""
    assert data["edited"]["stopped_by"] == "the model generated '<eos>' (a stop token) as its first token"
    table = invoke(path, "hello", "-n", "5", "--edit", str(tmp_path / "eos.edit.json"))
    assert "(empty: the model generated '<eos>' (a stop token) as its first token)" in " ".join(
        table.stdout.replace("│", " ").split()
    )


# -- bad input: exit 2, one line, before anything runs ----------------------------------------------------
BAD = [
    (["--ablate", "L0.foo"], "Malformed site name 'L0.foo'"),
    (["--ablate", "L0.H9"], "Head 9 is out of range"),
    (["--set", "L1.N96=1"], "Neuron 96 is out of range"),
    (["--ablate", "L7.H0"], "out of range"),
    (["--set", "L1.N3=nan"], "the value must be a finite number"),  # refused before the model loads
    (["--scale", "L1.H0=inf"], "the factor must be a finite number"),
    (["--scale", "L1.H0"], "give TARGET=FACTOR"),
    (["--set", "L1.N3=big"], "'big' is not a number"),
    (["--steer", "0"], "--steer LAYER needs --positive FILE and --negative FILE"),
    (["--positive", "x.txt"], "add --steer LAYER"),
    (["--steer", "0", "--positive", "/nonexistent/p.txt", "--negative", "/nonexistent/n.txt"], "no such file"),
    (["--edit", "/nonexistent/e.json"], "no such file"),
    (["--save-edit", "out.json"], "--save-edit needs an edit"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(tiny, args, message):
    result = invoke(tiny[0], "hello", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output


def test_bad_steering_layer_and_empty_files(tiny, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "pos.txt").write_text("good\n")
    result = invoke(
        tiny[0],
        "hello",
        "--steer",
        "5",
        "--positive",
        str(tmp_path / "pos.txt"),
        "--negative",
        str(tmp_path / "pos.txt"),
    )
    assert result.exit_code == 2 and "Layer 5" in result.output, result.output
    result = invoke(
        tiny[0],
        "hello",
        "--steer",
        "0",
        "--positive",
        str(tmp_path / "pos.txt"),
        "--negative",
        str(tmp_path / "empty.txt"),
    )
    assert result.exit_code == 2 and "holds no prompts" in result.output, result.output


def test_json_error_object(tiny):
    result = invoke(tiny[0], "hello", "--ablate", "L0.H9", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]  # stdout holds the error object and nothing else
    assert error["type"] == "SiteError" and "Head 9 is out of range" in error["message"]


def test_edit_file_of_another_model_is_refused(tiny, other, tmp_path):
    saved = tmp_path / "a.edit.json"
    json_of(invoke(tiny[0], "hello", "-n", "2", "--ablate", "L0.H1", "--save-edit", str(saved), "--json"))
    result = invoke(other, "hello", "--edit", str(saved))
    assert result.exit_code == 2 and "does not transfer" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    error = json.loads(invoke(other, "hello", "--edit", str(saved), "--json").stdout)["error"]
    assert error["type"] == "EditError" and "does not transfer" in error["message"]


def test_chat_without_a_template_and_bad_arguments(other):
    result = invoke(other, "hello", "--chat")
    assert result.exit_code == 2 and "has no chat template" in result.output, result.output
    result = invoke(other, "hello", "extra", "words")
    assert result.exit_code == 2 and "Expected [MODEL] PROMPT" in result.output
    result = invoke(other, "   ")
    assert result.exit_code == 2 and "The prompt is empty" in result.output


# -- the packaged instruct model -------------------------------------------------------------------------
@pytest.mark.slow
def test_packaged_instruct_model_needs_its_chat_template():
    """Without --chat SmolLM2-135M-Instruct ends its turn at once; the command says so. With --chat it talks."""
    bare = json_of(invoke("Tell me a story.", "-n", "4", "--json"))
    assert bare["text"] == "" and bare["ids"][0] == 2
    assert bare["stopped_by"] == "the model generated '<|im_end|>' (a stop token) as its first token"
    table = invoke("Tell me a story.", "-n", "4")
    assert "<|im_end|>" in table.stdout and "empty" in table.stdout
    chat = json_of(invoke("Tell me a story.", "-n", "4", "--chat", "--set", "L28.N931=8", "--json"))
    assert chat["plain"]["text"].strip() and len(chat["plain"]["ids"]) == 4
    assert all(lp <= 0 for lp in chat["plain"]["logprob_plain"] + chat["edited"]["logprob_edited"])


# -- positions generation never reaches (a fix in lmatlas.edit.generation / Model.generate) -------------------
def test_positions_generation_never_reaches_are_refused_before_compute(tiny):
    """``@99`` with an 11-token prompt and 4 new tokens used to do nothing in generate, then fail in scoring."""
    from lmatlas.edit import Ablate
    from lmatlas.errors import SiteError
    from lmatlas.model.loading import load

    result = invoke(tiny[0], "hello there", "-n", "4", "--ablate", "L0.H1@99", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "SiteError" and "never reached" in error["message"]
    assert "positions 0..13" in error["message"]  # 11 prompt tokens + 4 new - the last one, never fed back
    model = load(tiny[0])
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(SiteError, match="never reached"):
            model.generate("hello there", 4, edit=Ablate("L0.H1@14"))
        with pytest.raises(SiteError, match="never reached"):
            model.generate("hello there", 4, edit=Ablate("L0.H1@0,14"), compare=True)
        assert calls == []  # nothing ran
        # the last position generation runs is 13: an edit there acts (the 4th token differs or not, but runs)
        plain = model.generate("hello there", 4)
        edited = model.generate("hello there", 4, edit=Ablate("L0.H1@13"))
        assert isinstance(edited, str) and isinstance(plain, str) and calls
    finally:
        handle.remove()


def test_generate_help_loads_no_heavy_module():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom lmatlas.cli import app\n"
        "result = CliRunner().invoke(app, ['generate', '--help'])\n"
        "assert result.exit_code == 0 and '--save-edit' in result.output, result.output\n"
        "print([m for m in ('torch', 'transformers', 'duckdb', 'pyarrow') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
