"""Dictionary files: EleutherAI sparsify's layout and SAELens's, read and written (safetensors + JSON, never pickle).

=========  ===========================  ==============================================================
layout     files                        tensors
=========  ===========================  ==============================================================
sparsify   ``cfg.json``,                ``encoder.weight [n, d_in]``, ``encoder.bias [n]``,
           ``sae.safetensors``          ``W_dec [n, d_in]``, ``b_dec [d_in]``; ``W_skip [d_out, d_in]``
                                        with ``skip_connection`` (cfg: ``d_in``, ``num_latents``, ``k``,
                                        ``activation: "topk"``, ``transcode``, ``skip_connection``, ...)
saelens    ``cfg.json``,                ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
           ``sae_weights.safetensors``  ``b_dec`` (cfg: ``architecture: "topk"``, ``d_in``, ``d_sae``, ``k``,
                                        ``apply_b_dec_to_input``, ``metadata.hook_name``, ...)
=========  ===========================  ==============================================================

:func:`save` writes sparsify's layout by default (the only one of the two with TopK
transcoders); lmatlas's :class:`~lmatlas.features.dictionary.DictionaryCard` (model
identity, sites, training) rides along in ``cfg.json`` under ``"lmatlas"`` (sparsify) or
``metadata.lmatlas`` (SAELens), where both libraries ignore it. :func:`load` reads either
layout, from lmatlas or trained elsewhere; a file trained elsewhere records no model
fingerprint, so its site comes from the file (SAELens's ``hook_name``, sparsify's hookpoint
folder ``layers.15`` / ``layers.15.mlp``) or from ``site=``. With ``model=`` the dictionary
is refused for another model or a site of another width (:func:`check_fits`).

A SAELens file with ``apply_b_dec_to_input: false`` loads as is (its encoder sees ``x``);
``rescale_acts_by_decoder_norm`` is folded into the encoder (the top-k choice is the same).
SAELens's own transcoders are ReLU or JumpReLU, not TopK: refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmatlas.errors import DictionaryError
from lmatlas.features.dictionary import Dictionary, DictionaryCard, SkipTranscoder, TopKSAE, build, check_fits

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

LAYOUTS = ("sparsify", "saelens")
_TL_HOOKS = {
    "hook_resid_pre": "resid.pre",
    "hook_resid_mid": "resid.mid",
    "hook_resid_post": "resid.post",
    "hook_mlp_out": "mlp.out",
    "mlp.hook_post": "mlp.act",
    "ln2.hook_normalized": "mlp.in",
}


def tl_hook_name(site: str) -> str:
    """TransformerLens's name of a site (``L15.resid.post`` -> ``blocks.15.hook_resid_post``)."""
    layer, component = site.split(".", 1)
    hook = {v: k for k, v in _TL_HOOKS.items()}[component]
    return f"blocks.{layer[1:]}.{hook}"


def site_from_hook(name: str) -> str | None:
    """Our site for a TransformerLens hook name or a sparsify hookpoint folder, ``None`` when unknown."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name or "")
    if match and match[2] in _TL_HOOKS:
        return f"L{match[1]}.{_TL_HOOKS[match[2]]}"
    match = re.fullmatch(r"(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)(\.mlp)?", name or "")
    if match:
        return f"L{match[1]}.mlp.in" if match[2] else f"L{match[1]}.resid.post"
    return None


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(path))


def save(dictionary: Dictionary, path: str | Path, layout: str = "sparsify") -> Path:
    """Write ``dictionary`` to the folder ``path`` in ``layout`` (``sparsify`` or ``saelens``)."""
    if layout not in LAYOUTS:
        raise DictionaryError(f"Unknown dictionary layout {layout!r}: use one of {', '.join(LAYOUTS)}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    d, card = dictionary, dictionary.card
    with torch.no_grad():
        b_enc = d.b_enc
        if card.kind == "sae" and not d.subtract_b_dec and layout == "sparsify":
            b_enc = d.b_enc + d.b_dec @ d.W_enc  # sparsify's SAE encoder always sees x - b_dec
    if layout == "sparsify":
        tensors = {"encoder.weight": d.W_enc.t(), "encoder.bias": b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
        if card.kind == "transcoder":
            tensors["W_skip"] = d.W_skip.t()
        cfg = {
            "activation": "topk",
            "expansion_factor": max(1, card.n_latents // card.d_in),
            "normalize_decoder": True,
            "num_latents": card.n_latents,
            "k": card.k,
            "multi_topk": False,
            "skip_connection": card.kind == "transcoder",
            "transcode": card.kind == "transcoder",
            "d_in": card.d_in,
            "lmatlas": card.to_dict(),
        }
        _save_tensors(tensors, path / "sae.safetensors")
    else:
        if card.kind != "sae":
            raise DictionaryError(
                "SAELens has no TopK skip-transcoder (its transcoders are ReLU/JumpReLU): save transcoders with layout='sparsify'."
            )
        tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
        hook = tl_hook_name(card.site)
        cfg = {
            "architecture": "topk",
            "d_in": card.d_in,
            "d_sae": card.n_latents,
            "k": card.k,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": bool(d.subtract_b_dec),
            "normalize_activations": "none",
            "reshape_activations": "none",
            "rescale_acts_by_decoder_norm": False,
            "metadata": {"model_name": card.model.get("source"), "hook_name": hook, "lmatlas": card.to_dict()},
            # older SAELens configs
            "hook_name": hook,
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": card.k},
        }
        _save_tensors(tensors, path / "sae_weights.safetensors")
    (path / "cfg.json").write_text(json.dumps(cfg, indent=1, default=str))
    return path


def detect_layout(path: Path) -> str:
    if (path / "sae.safetensors").is_file():
        return "sparsify"
    if (path / "sae_weights.safetensors").is_file():
        return "saelens"
    raise DictionaryError(
        f"{path} holds no dictionary: expected cfg.json with sae.safetensors (sparsify) or sae_weights.safetensors (SAELens)."
    )


def _read(path: Path, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        cfg = json.loads((path / "cfg.json").read_text())
    except FileNotFoundError:
        raise DictionaryError(f"{path} has {name} but no cfg.json: the folder is incomplete.") from None
    except ValueError as err:
        raise DictionaryError(f"{path / 'cfg.json'} is not valid JSON ({err}).") from None
    try:
        tensors = load_file(str(path / name))
    except Exception as err:  # safetensors raises its own error types
        raise DictionaryError(f"{path / name} is not a readable safetensors file ({err}).") from None
    return cfg, {k: v.float() for k, v in tensors.items()}


def _need(tensors: dict[str, torch.Tensor], keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise DictionaryError(f"{path} lacks the tensors {', '.join(missing)} (it has {', '.join(sorted(tensors))}).")


def _card(
    recorded: dict | None, kind: str, site: str | None, hint: str | None, sizes: dict[str, int], path: Path
) -> DictionaryCard:
    if recorded:
        card = DictionaryCard.from_dict(recorded)
        if (card.d_in, card.d_out, card.n_latents, card.k) != (
            sizes["d_in"],
            sizes["d_out"],
            sizes["n_latents"],
            sizes["k"],
        ):
            raise DictionaryError(f"{path}: the recorded card {card} does not match the tensors' sizes {sizes}.")
        return card
    where = site or hint
    if where is None:
        raise DictionaryError(
            f"{path} does not say which site it reads (no lmatlas card, no hook name): pass the site (e.g. site='L15.resid.post')."
        )
    if kind == "transcoder" and where.endswith(".mlp.out"):
        where = where[: -len("out")] + "in"
    return DictionaryCard(
        kind, where, sizes["d_in"], sizes["n_latents"], sizes["k"], d_out=sizes["d_out"], training={"file": str(path)}
    )


def load(path: str | Path, model: "Model | None" = None, site: str | None = None) -> Dictionary:
    """Read a dictionary folder (either layout); with ``model``, refuse it for another model or ``site``."""
    path = Path(path)
    if not path.is_dir():
        raise DictionaryError(f"No dictionary folder at {path}.")
    layout = detect_layout(path)
    if layout == "sparsify":
        d = _load_sparsify(path, site)
    else:
        d = _load_saelens(path, site)
    if model is not None:
        check_fits(d, model, site)
    return d


def _load_sparsify(path: Path, site: str | None) -> Dictionary:
    cfg, t = _read(path, "sae.safetensors")
    _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
    if cfg.get("activation", "topk") != "topk":
        raise DictionaryError(
            f"{path} uses the {cfg.get('activation')!r} activation: lmatlas reads TopK dictionaries only."
        )
    n, d_in = t["encoder.weight"].shape
    transcoder = bool(cfg.get("transcode"))
    if cfg.get("skip_connection") and not transcoder:
        raise DictionaryError(
            f"{path} is an SAE with a skip connection: lmatlas reads TopK SAEs and skip-transcoders only."
        )
    sizes = {"d_in": d_in, "d_out": t["W_dec"].shape[1], "n_latents": n, "k": int(cfg["k"])}
    card = _card(
        cfg.get("lmatlas"), "transcoder" if transcoder else "sae", site, site_from_hook(path.name), sizes, path
    )
    d = build(card)
    with torch.no_grad():
        d.W_enc.copy_(t["encoder.weight"].t())
        d.b_enc.copy_(t["encoder.bias"])
        d.W_dec.copy_(t["W_dec"])
        d.b_dec.copy_(t["b_dec"])
        if isinstance(d, SkipTranscoder) and "W_skip" in t:
            d.W_skip.copy_(t["W_skip"].t())
    return d


def _load_saelens(path: Path, site: str | None) -> Dictionary:
    cfg, t = _read(path, "sae_weights.safetensors")
    _need(t, ("W_enc", "b_enc", "W_dec", "b_dec"), path)
    architecture = cfg.get("architecture") or cfg.get("activation_fn_str") or cfg.get("activation_fn")
    if architecture != "topk":
        raise DictionaryError(
            f"{path} is a SAELens {architecture!r} dictionary: lmatlas reads TopK ones only (architecture 'topk')."
        )
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise DictionaryError(
            f"{path} normalises its input ({cfg['normalize_activations']!r}) at run time: fold the scale into the weights first."
        )
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if k is None:
        raise DictionaryError(f"{path} does not record k (cfg 'k' or activation_fn_kwargs.k).")
    d_in, n = t["W_enc"].shape
    metadata = cfg.get("metadata") or {}
    hook = metadata.get("hook_name") or cfg.get("hook_name")
    sizes = {"d_in": d_in, "d_out": t["W_dec"].shape[1], "n_latents": n, "k": int(k)}
    card = _card(metadata.get("lmatlas"), "sae", site, site_from_hook(hook), sizes, path)
    d = TopKSAE(
        card.d_in, card.n_latents, card.k, card=card, subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True))
    )
    with torch.no_grad():
        W_enc, b_enc, W_dec = t["W_enc"], t["b_enc"], t["W_dec"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms = W_dec.norm(dim=1)
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        d.W_enc.copy_(W_enc)
        d.b_enc.copy_(b_enc)
        d.W_dec.copy_(W_dec)
        d.b_dec.copy_(t["b_dec"])
    return d
