"""Dictionary files: sparsify's and SAELens's layouts, round trips, files written by hand, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lmatlas.errors import DictionaryError
from lmatlas.features import files
from lmatlas.features.dictionary import DictionaryCard, SkipTranscoder, TopKSAE
from lmatlas.model.provenance import identity


def _fill(d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    d.normalize_decoder()
    return d


def _x(n=20, d=64, seed=5):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _topk_reference(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k then ReLU, the other latents 0 (SAELens's TopK; the same latents as ReLU then top-k)."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


@pytest.mark.parametrize("layout", files.LAYOUTS)
def test_sae_round_trips_in_both_layouts(llama, tmp_path, layout):
    card = DictionaryCard("sae", "L1.resid.post", 64, 256, 8, model=identity(llama), seed=4, training={"steps": 3})
    sae = _fill(TopKSAE(64, 256, 8, card=card))
    files.save(sae, tmp_path / "d", layout)
    loaded = files.load(tmp_path / "d", llama)
    assert loaded.card == card
    x = _x()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x)[0], sae(x)[0])
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    if layout == "sparsify":
        assert (cfg["num_latents"], cfg["k"], cfg["d_in"], cfg["activation"]) == (256, 8, 64, "topk")
    else:
        assert (cfg["d_sae"], cfg["k"], cfg["architecture"], cfg["metadata"]["hook_name"]) == (
            256,
            8,
            "topk",
            "blocks.1.hook_resid_post",
        )


def test_transcoder_round_trips_in_sparsify_layout_only(llama, tmp_path):
    card = DictionaryCard("transcoder", "L1.mlp.in", 64, 128, 4, model=identity(llama))
    tc = _fill(SkipTranscoder(64, 64, 128, 4, card=card))
    files.save(tc, tmp_path / "t")
    loaded = files.load(tmp_path / "t", llama, "L1.mlp.out")
    x = _x()
    assert torch.equal(loaded(x)[0], tc(x)[0])
    with pytest.raises(DictionaryError, match="SAELens has no TopK skip-transcoder"):
        files.save(tc, tmp_path / "s", "saelens")


def test_a_dictionary_is_refused_for_another_model_or_site(llama, tmp_path):
    from lmatlas.model.tiny import tiny_model

    card = DictionaryCard("sae", "L1.resid.post", 64, 128, 4, model=identity(llama))
    files.save(_fill(TopKSAE(64, 128, 4, card=card)), tmp_path / "d")
    with pytest.raises(DictionaryError, match="made for another model"):
        files.load(tmp_path / "d", tiny_model("llama", seed=3))
    with pytest.raises(DictionaryError, match="made for L1.resid.post, not L0.resid.post"):
        files.load(tmp_path / "d", llama, "L0.resid.post")
    with pytest.raises(DictionaryError, match="holds no dictionary"):
        files.load(tmp_path)
    (tmp_path / "d" / "cfg.json").write_text("{not json")
    with pytest.raises(DictionaryError, match="not valid JSON"):
        files.load(tmp_path / "d")


def test_a_sparsify_folder_written_by_hand_loads_and_encodes_identically(llama, tmp_path):
    """Keys and cfg as EleutherAI's sparsify writes them (encoder is an nn.Linear: weight [n, d_in])."""
    gen = torch.Generator().manual_seed(11)
    n, d, k = 96, 64, 6
    enc_w, enc_b = torch.randn(n, d, generator=gen), torch.randn(n, generator=gen)
    W_dec, b_dec = torch.randn(n, d, generator=gen), torch.randn(d, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    folder = tmp_path / "layers.1"  # sparsify names a hookpoint's folder after the module: the block's output
    folder.mkdir()
    save_file(
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
        str(folder / "sae.safetensors"),
    )
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": n, "k": k}
    (folder / "cfg.json").write_text(
        json.dumps({**cfg, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d})
    )
    sae = files.load(folder, llama)
    assert sae.card.site == "L1.resid.post" and sae.card.model == {}
    x = _x(d=d)
    latents = _topk_reference((x - b_dec) @ enc_w.t() + enc_b, k)
    assert torch.equal(sae.encode(x), latents)
    torch.testing.assert_close(sae(x)[0], latents @ W_dec + b_dec)

    # a skip-transcoder of MLP 1: input not centred, output += x @ W_skip.T
    W_skip = torch.randn(d, d, generator=gen)
    tfolder = tmp_path / "layers.1.mlp"
    tfolder.mkdir()
    save_file(
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec, "W_skip": W_skip},
        str(tfolder / "sae.safetensors"),
    )
    (tfolder / "cfg.json").write_text(json.dumps({**cfg, "skip_connection": True, "transcode": True, "d_in": d}))
    tc = files.load(tfolder, llama)
    assert (tc.card.kind, tc.card.site, tc.card.out_site) == ("transcoder", "L1.mlp.in", "L1.mlp.out")
    latents = _topk_reference(x @ enc_w.t() + enc_b, k)
    assert torch.equal(tc.encode(x), latents)
    torch.testing.assert_close(tc(x)[0], latents @ W_dec + b_dec + x @ W_skip.t())


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_a_saelens_folder_written_by_hand_loads_and_encodes_identically(llama, tmp_path, apply_b_dec):
    gen = torch.Generator().manual_seed(12)
    n, d, k = 80, 64, 5
    W_enc, b_enc = torch.randn(d, n, generator=gen), torch.randn(n, generator=gen)
    W_dec, b_dec = torch.randn(n, d, generator=gen), torch.randn(d, generator=gen)
    save_file(
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(tmp_path / "sae_weights.safetensors")
    )
    cfg = {
        "architecture": "topk",
        "d_in": d,
        "d_sae": n,
        "k": k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {"model_name": "some-model", "hook_name": "blocks.0.hook_resid_post"},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = files.load(tmp_path, llama)
    assert sae.card.site == "L0.resid.post"
    x = _x(d=d)
    latents = _topk_reference((x - b_dec * apply_b_dec) @ W_enc + b_enc, k)
    assert torch.equal(sae.encode(x), latents)
    torch.testing.assert_close(sae(x)[0], latents @ W_dec + b_dec)
    # written again in sparsify's layout (whose SAE always centres), it still encodes the same
    files.save(sae, tmp_path / "again", "sparsify")
    torch.testing.assert_close(files.load(tmp_path / "again").encode(x), latents, atol=1e-4, rtol=1e-4)


def test_saelens_older_configs_rescaled_decoders_and_refusals(llama, tmp_path):
    gen = torch.Generator().manual_seed(13)
    n, d, k = 40, 64, 4
    W_enc, b_enc = torch.randn(d, n, generator=gen), torch.randn(n, generator=gen)
    W_dec, b_dec = torch.randn(n, d, generator=gen) * 3, torch.randn(d, generator=gen)
    save_file(
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(tmp_path / "sae_weights.safetensors")
    )
    old = {
        "d_in": d,
        "d_sae": n,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": k},
        "hook_name": "blocks.1.hook_mlp_out",
    }
    old["rescale_acts_by_decoder_norm"] = True
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    sae = files.load(tmp_path, llama)
    assert sae.card.site == "L1.mlp.out" and sae.card.k == k
    x = _x(d=d)
    norms = W_dec.norm(dim=1)
    latents = _topk_reference(((x - b_dec) @ W_enc + b_enc) * norms, k)
    torch.testing.assert_close(sae(x)[0], (latents / norms) @ W_dec + b_dec, atol=1e-4, rtol=1e-4)
    (tmp_path / "cfg.json").write_text(json.dumps({**old, "activation_fn_str": "relu"}))
    with pytest.raises(DictionaryError, match="TopK ones only"):
        files.load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**old, "hook_name": None}))
    with pytest.raises(DictionaryError, match="does not say which site"):
        files.load(tmp_path)
    assert files.load(tmp_path, site="L1.resid.pre").card.site == "L1.resid.pre"
