"""lmatlas's captured values checked against independent, plain-PyTorch computations.

Every expected value here is re-derived by the test itself: from Hugging Face's own
eager attention weights, or from forward hooks the test puts on the *native* modules
(named in ``NATIVE`` below, independently of lmatlas's ArchSpec table). lmatlas is
only asked for the values under test (cache entries, weight views, replacements).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from lmatlas.model.tiny import TINY_CONFIGS, tiny_hf_model, tiny_model

FAMILIES = list(TINY_CONFIGS)
ATOL = 1e-5

_LLAMA = dict(
    block="model.layers.{}",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    up="mlp.up_proj",
    gate="mlp.gate_proj",
    down="mlp.down_proj",
)
_SANDWICH = dict(_LLAMA, post="post_attention_layernorm")
#: Native module names per family, written out by hand (``post``: post-attention norm).
NATIVE: dict[str, dict[str, str]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _SANDWICH,
    "gemma3_text": _SANDWICH,
    "olmo2": _SANDWICH,
    "phi3": dict(
        block="model.layers.{}",
        qkv="self_attn.qkv_proj",
        split="concat",
        o="self_attn.o_proj",
        gate_up="mlp.gate_up_proj",
        down="mlp.down_proj",
    ),
    "gpt2": dict(
        block="transformer.h.{}", qkv="attn.c_attn", split="concat", o="attn.c_proj", up="mlp.c_fc", down="mlp.c_proj"
    ),
    "gpt_neox": dict(
        block="gpt_neox.layers.{}",
        qkv="attention.query_key_value",
        split="per_head",
        o="attention.dense",
        up="mlp.dense_h_to_4h",
        down="mlp.dense_4h_to_h",
    ),
}


@dataclass
class Run:
    """One family: the lmatlas model, its traced cache and what our own hooks recorded."""

    family: str
    model: object
    ids: torch.Tensor
    cache: object
    sizes: tuple[int, int, int]  # (n_heads, n_kv_heads, d_head), read from the config by hand
    rec: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def module(self, layer: int, key: str) -> torch.nn.Module:
        names = NATIVE[self.family]
        return self.model.hf.get_submodule(f"{names['block'].format(layer)}.{names[key]}")

    def native_logits(self, hooks=()) -> torch.Tensor:
        """Plain forward of the native model with our own ``(layer, key, pre, fn)`` hooks."""
        handles = []
        for layer, key, pre, fn in hooks:
            mod = self.module(layer, key)
            handles.append(mod.register_forward_pre_hook(fn) if pre else mod.register_forward_hook(fn))
        try:
            with torch.no_grad():
                return self.model.hf(input_ids=self.ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()

    def lmatlas_logits(self, replace) -> torch.Tensor:
        cache = self.model.run(self.ids, replace=replace)
        return cache.logits


def head_sizes(config) -> tuple[int, int, int]:
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return n_heads, n_kv, getattr(config, "head_dim", None) or config.hidden_size // n_heads


@pytest.fixture(scope="module", params=FAMILIES)
def run(request) -> Run:
    """Trace once per family, recording each native module's (input, output) ourselves."""
    family = request.param
    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))  # 9 > sliding window 4
    r = Run(family, model, ids, None, head_sizes(model.hf.config))
    keys = [k for k in ("q", "k", "v", "qkv", "o", "up", "gate", "gate_up", "down", "post") if k in NATIVE[family]]
    handles = []
    for layer in range(model.hf.config.num_hidden_layers):
        for key in keys:

            def hook(mod, args, out, key=key, layer=layer):
                out = out[0] if isinstance(out, tuple) else out
                r.rec[(layer, key)] = (args[0].detach(), out.detach())

            handles.append(r.module(layer, key).register_forward_hook(hook))
    try:
        cache = model.run(ids, capture=["attn.pattern", "attn.k", "attn.v", "attn.z", "attn.out"])
        r.cache = cache
    finally:
        for h in handles:
            h.remove()
    return r


def layers(r: Run) -> range:
    return range(r.model.hf.config.num_hidden_layers)


def split_qkv(r: Run, layer: int) -> dict[str, torch.Tensor]:
    """The native q/k/v projections of ``layer`` as ``[batch, pos, head, d_head]``, split by hand."""
    n_heads, n_kv, d = r.sizes
    names = NATIVE[r.family]
    if "qkv" not in names:
        return {w: r.rec[(layer, w)][1].unflatten(-1, (-1, d)) for w in "qkv"}
    y = r.rec[(layer, "qkv")][1]
    if names["split"] == "per_head":  # [head, (q|k|v), d_head] interleaved
        q, k, v = y.unflatten(-1, (n_heads, 3 * d)).chunk(3, dim=-1)
        return dict(q=q, k=k, v=v)
    q, k, v = y.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)  # [q | k | v]
    return {w: t.unflatten(-1, (-1, d)) for w, t in zip("qkv", (q, k, v))}


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-4)


# -- 1, 2: attention patterns -----------------------------------------------------------------------
def test_pattern_matches_hf_eager_attentions(run):
    """1. ``attn.pattern`` equals the weights HF's own eager attention returns (same seed, fresh copy)."""
    hf = tiny_hf_model(run.model.hf.config.model_type, seed=0)
    for (name, p), p2 in zip(run.model.hf.named_parameters(), hf.parameters()):
        assert torch.equal(p, p2), name
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        out = hf(input_ids=run.ids, output_attentions=True, use_cache=False)
    assert len(out.attentions) == len(layers(run))
    for layer in layers(run):
        close(run.cache.pattern(layer), out.attentions[layer])
    close(run.cache.logits, out.logits, atol=1e-4)


def test_pattern_times_values_gives_z(run):
    """2. ``pattern @ v`` (query head h reads KV head h // group) reproduces ``attn.z``."""
    n_heads, n_kv, _ = run.sizes
    kv_of = torch.arange(n_heads) // (n_heads // n_kv)
    for layer in layers(run):
        v = run.cache.v(layer)[:, :, kv_of]  # [batch, key_pos, head, d_head]
        close(torch.einsum("bhqk,bkhd->bqhd", run.cache.pattern(layer), v), run.cache.z(layer))


# -- 3: weight views --------------------------------------------------------------------------------
def test_qkv_weight_views_reproduce_native_projections(run):
    """3. ``x @ W_Q[h] + b_Q[h]`` (and K, V) equal the raw native projection output of head h."""
    W = run.model.W
    names = NATIVE[run.family]
    for layer in layers(run):
        native = split_qkv(run, layer)
        for w, weight, bias in (("q", W.W_Q, W.b_Q), ("k", W.W_K, W.b_K), ("v", W.W_V, W.b_V)):
            x = run.rec[(layer, "qkv" if "qkv" in names else w)][0]
            got = torch.einsum("bpm,hmd->bphd", x, weight(layer))
            if bias(layer) is not None:
                got = got + bias(layer)
            assert got.shape == native[w].shape, w
            for h in range(got.shape[2]):
                close(got[:, :, h], native[w][:, :, h])


def test_output_and_mlp_weight_views_reproduce_native_modules(run):
    """3. ``sum_h z_h @ W_O[h] + b_O`` and ``W_in / W_gate / W_out`` reproduce the native submodules."""
    W = run.model.W
    n_heads, _, d = run.sizes
    names = NATIVE[run.family]

    def affine(x, weight, bias):
        return x @ weight + (0 if bias is None else bias)

    for layer in layers(run):
        z, o_out = run.rec[(layer, "o")]
        heads = torch.einsum("bphd,hdm->bpm", z.unflatten(-1, (n_heads, d)), W.W_O(layer))
        close(heads + (0 if W.b_O(layer) is None else W.b_O(layer)), o_out)
        if "gate_up" in names:  # Phi-3: gate first, then up
            x, y = run.rec[(layer, "gate_up")]
            gate, up = y.chunk(2, dim=-1)
            close(affine(x, W.W_gate(layer), None), gate)
        else:
            x, up = run.rec[(layer, "up")]
            if "gate" in names:
                gx, gate = run.rec[(layer, "gate")]
                close(affine(gx, W.W_gate(layer), None), gate)
            else:
                assert W.W_gate(layer) is None
        close(affine(x, W.W_in(layer), W.b_in(layer)), up)
        act, down = run.rec[(layer, "down")]
        close(affine(act, W.W_out(layer), W.b_out(layer)), down)


# -- 4: per-head writes -----------------------------------------------------------------------------
def test_head_out_sums_to_native_attention_write(run):
    """4. ``head_out(l).sum(2) + b_O`` equals o's output, or the post-attention norm's output."""
    for layer in layers(run):
        bias = run.module(layer, "o").bias if hasattr(run.module(layer, "o"), "bias") else None
        if "post" in NATIVE[run.family]:
            assert bias is None  # Gemma 2/3, OLMo-2: no output-projection bias to scale
            expected = run.rec[(layer, "post")][1]
        else:
            expected = run.rec[(layer, "o")][1]
        got = run.cache.head_out(layer).sum(2) + (0 if bias is None else bias)
        close(got, expected)


# -- 5: replacement semantics ------------------------------------------------------------------------
def _zero(index):
    def edit(x, site=None):
        x = x.clone()
        x[index] = 0.0
        return x

    return edit


def test_replace_z_head_matches_native_prehook(run):
    """5a. Zeroing head 1 of ``L0.attn.z`` equals zeroing its input columns of the native o projection."""
    d = run.sizes[2]
    native = run.native_logits([(0, "o", True, lambda m, args: (_zero((..., slice(d, 2 * d)))(args[0]),))])
    got = run.lmatlas_logits({"L0.attn.z": _zero((slice(None), slice(None), 1))})
    assert not torch.allclose(native, run.native_logits(), atol=1e-4)
    close(got, native)


#: A replacement must move the logits by this much more than the comparison's tolerance: an edit that
#: changed nothing (a dead neuron, an ignored replacement) cannot pass as "equal to the native edit".
MOVES = 100 * ATOL


def moved(edited: torch.Tensor, plain: torch.Tensor) -> float:
    return float((edited.float() - plain.float()).abs().max())


def test_replace_neuron_matches_native_prehook(run):
    """5b. Zeroing neuron 5 of ``L1.mlp.act`` equals zeroing column 5 of the native down projection input."""
    native = run.native_logits([(1, "down", True, lambda m, args: (_zero((..., 5))(args[0]),))])
    assert moved(native, run.native_logits()) > MOVES, "zeroing neuron 5 must change the native logits"
    got = run.lmatlas_logits({"L1.mlp.act": _zero((..., 5))})
    assert moved(got, run.native_logits()) > MOVES, "lmatlas's zeroed neuron must change the logits"
    close(got, native)


def test_replace_neuron_from_a_position_matches_native_prehook(run):
    """5b. ``L1.mlp.act@5:`` zeroes neuron 5 from position 5 on: earlier logits stay, later ones move as natively."""
    plain = run.native_logits()
    native = run.native_logits([(1, "down", True, lambda m, args: (_zero((..., slice(5, None), 5))(args[0]),))])
    close(native[:, :5], plain[:, :5])
    assert moved(native[:, 5:], plain[:, 5:]) > MOVES, "zeroing neuron 5 from position 5 must change the logits"
    got = run.lmatlas_logits({"L1.mlp.act@5:": _zero((..., 5))})
    close(got, native)


def test_replace_pattern_identity_keeps_logits(run):
    """5c. Writing the captured ``L0.attn.pattern`` back (pattern @ v path) leaves the logits unchanged."""
    got = run.lmatlas_logits({"L0.attn.pattern": run.cache.pattern(0).clone()})
    close(got, run.native_logits(), atol=1e-4)


def test_replace_pattern_matches_native_pattern_times_values(run):
    """5c. A *new* ``L0.attn.pattern`` gives the logits of a native forward whose o-projection input is
    that pattern times the native value projection, computed here by hand.

    The new pattern: head h attends to key ``q - (h % 2)`` (itself, or the previous token), far from
    the near-uniform attention of a random tiny model, so that ignoring it would show.
    """
    n_heads, n_kv, _ = run.sizes
    batch, n = run.ids.shape
    pattern = torch.zeros(batch, n_heads, n, n)  # [batch, head, pos, key_pos]
    for h in range(n_heads):
        for q in range(n):
            pattern[:, h, q, max(q - h % 2, 0)] = 1.0
    v = split_qkv(run, 0)["v"]  # [batch, key_pos, kv_head, d_head], the native projection's output
    kv_of = torch.arange(n_heads) // (n_heads // n_kv)
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v[:, :, kv_of].float())  # [batch, pos, head, d_head]
    native = run.native_logits([(0, "o", True, lambda m, args: (z.flatten(2).to(args[0].dtype),))])
    assert moved(native, run.native_logits()) > MOVES, "the new layer-0 pattern must change the logits"
    close(run.lmatlas_logits({"L0.attn.pattern": pattern.clone()}), native, atol=1e-4)


def test_replace_resid_mid_matches_native_write_edit(run):
    """5d. ``L1.resid.mid + delta`` equals adding delta to the native attention write (o, or its post norm).

    ``delta`` is 1.0 plus a ramp: a constant +1.0 on every dimension is removed by the
    mean subtraction of LayerNorm (GPT-2), so it would not move GPT-2's logits at all.
    """
    if run.family == "gpt_neox":
        pytest.skip("parallel residual: the MLP reads resid.pre, resid.mid is not its input")
    write = "post" if "post" in NATIVE[run.family] else "o"
    delta = 1.0 + torch.linspace(-1.0, 1.0, run.model.hf.config.hidden_size)

    def plus_delta(mod, args, out):
        return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

    native = run.native_logits([(1, write, False, plus_delta)])
    got = run.lmatlas_logits({"L1.resid.mid": lambda x, site: x + delta})
    assert not torch.allclose(got, run.native_logits(), atol=1e-3)
    close(got, native)


# -- 6: GQA mapping ---------------------------------------------------------------------------------
def test_gqa_head_to_kv_group(run):
    """6. ``cache.k/v(l, head=h)`` is KV head ``h // (n_heads // n_kv_heads)`` of the raw capture."""
    n_heads, n_kv, _ = run.sizes
    group = n_heads // n_kv
    assert run.cache["L0.attn.k"].shape[2] == n_kv
    for layer in layers(run):
        for h in range(n_heads):
            assert torch.equal(run.cache.k(layer, head=h), run.cache[f"L{layer}.attn.k"][:, :, h // group])
            assert torch.equal(run.cache.v(layer, head=h), run.cache[f"L{layer}.attn.v"][:, :, h // group])
