"""The GGUF conversion cache: a warm load equals a cold one, and only complete entries count."""

from __future__ import annotations

import pytest
import torch

import lmatlas
from lmatlas.model import gguf_cache
from lmatlas.model.tiny import byte_tokenizer, tiny_hf_model

SHA = "ab" * 32


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMATLAS_CACHE", str(tmp_path))
    return tmp_path


def test_store_then_load_round_trips(cache_home):
    hf = tiny_hf_model("gemma3_text")
    assert gguf_cache.cached(SHA) is None
    path = gguf_cache.store(SHA, hf, byte_tokenizer())
    assert path == gguf_cache.cached(SHA) and path.parent.parent == cache_home
    assert {p.suffix for p in path.iterdir()} >= {".json", ".safetensors"}
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # nothing to unpickle
    reloaded = lmatlas.load(path)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.equal(reloaded.forward(ids), hf(ids).logits.detach())


def test_an_interrupted_conversion_is_not_used(cache_home):
    staging = gguf_cache.cache_dir(SHA)
    staging.mkdir(parents=True)
    (staging / "config.json").write_text("{}")  # written, but never marked complete
    assert gguf_cache.cached(SHA) is None


def test_the_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LMATLAS_GGUF_CACHE", "0")
    assert not gguf_cache.enabled()
    monkeypatch.setenv("LMATLAS_GGUF_CACHE", "1")
    assert gguf_cache.enabled()


@pytest.mark.slow
def test_warm_load_of_the_packaged_model_equals_the_cold_one(cache_home):
    cold = lmatlas.load()  # converts from GGUF and fills the cache
    assert gguf_cache.cached(cold.card()["file_sha256"]) is not None
    warm = lmatlas.load()
    text = "Hello world, the café is open! 123"
    assert torch.equal(cold.tokenize(text)["input_ids"], warm.tokenize(text)["input_ids"])
    assert torch.equal(cold.forward(text), warm.forward(text))
    assert cold.card() == warm.card()
    assert cold.tokenizer.chat_template == warm.tokenizer.chat_template
