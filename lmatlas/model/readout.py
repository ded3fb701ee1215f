"""Early-exit readouts and the taps that feed them: the residual stream read as next-token logits.

The convention is the one of the DoLa paper and its code: "layer ``l``" is the hidden
state after the first ``l`` blocks (``l = 0``: the embeddings, ``l = n_layers``: the
last block's output, which gives the model's own logits). Its early-exit logits are::

    logits_l = softcap( lm_head( final_norm(h_l) ) )          # [batch, d_vocab]

with the model's own final norm and unembedding (``W_U``, tied to the embeddings or
not), exactly as the final layer is read. With tied embeddings layer 0 is skipped by
the default buckets (reading the embeddings through their own transpose is close to the
identity and says nothing about the input).

:class:`LayerTap` captures ``h_l`` at the last position of every forward through
forward pre-hooks on the blocks (plain PyTorch hooks, so it works inside any
``generate``, including transformers' own loop), and :func:`exit_logits` reads several
layers in one matmul (``[n, d_model] @ W_U``: the unembedding is read from memory once).
:class:`FinalNormTap` keeps the final norm's output (what the unembedding reads), and
:func:`first_blocks` runs only the first blocks of the model (an early-exit drafter).

These are lmatlas's decoding taps: they live in the model layer because they hook the
native modules (decoding strategies, drafters and benchmarks use them, never raw hooks).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from lmatlas.model.arch import get_path
from lmatlas.model.families import spec_for_model_type


def blocks_of(hf: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a native ``*ForCausalLM`` module."""
    return get_path(hf, spec_for_model_type(hf.config.model_type).layers)


def final_norm_of(hf: nn.Module) -> nn.Module:
    """The final norm of a native ``*ForCausalLM`` module."""
    return get_path(hf, spec_for_model_type(hf.config.model_type).final_norm)


def n_layers_of(hf: nn.Module) -> int:
    return len(blocks_of(hf))


def ties_embeddings(hf: nn.Module) -> bool:
    """True when the unembedding is the embedding matrix (same storage)."""
    out, inp = hf.get_output_embeddings(), hf.get_input_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def softcap(hf: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The model's final logit softcap (Gemma 2), if it has one."""
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def exit_logits(hf: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``[..., d_vocab]`` float32 logits of hidden states ``[..., d_model]`` read like the last layer."""
    normed = final_norm_of(hf)(hidden)
    return softcap(hf, hf.get_output_embeddings()(normed)).float()


def exit_logits_at(hf: nn.Module, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``[n, batch, k]`` float32 logits of hidden states ``[n, batch, d_model]`` for ``token_ids`` ``[batch, k]`` only.

    The same readout as :func:`exit_logits` restricted to ``k`` rows of the unembedding per
    sequence: ``n * batch * k * d_model`` multiply-adds instead of ``n * batch * d_vocab * d_model``.
    """
    head = hf.get_output_embeddings()
    normed = final_norm_of(hf)(hidden)  # [n, batch, d]
    rows = head.weight[token_ids]  # [batch, k, d]
    logits = torch.einsum("nbd,bkd->nbk", normed.to(rows.dtype), rows)
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[token_ids][None]
    return softcap(hf, logits).float()


class LayerTap:
    """Capture ``h_l`` (the input of block ``l``) at the last position of each forward.

    ``with LayerTap(hf, [15, 17]) as tap: hf(...)`` then ``tap.last[15]`` is ``[batch, d_model]``.
    ``positions="all"`` keeps every position of the forward (``[batch, pos, d_model]``).
    Layers must lie in ``0 .. n_layers - 1`` (the final layer is the model's own output).
    """

    def __init__(self, hf: nn.Module, layers: Iterable[int], positions: str = "last"):
        self.hf = hf
        self.layers = sorted(set(int(layer) for layer in layers))
        self.positions = positions
        self.last: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "LayerTap":
        blocks = blocks_of(self.hf)
        for layer in self.layers:
            self._handles.append(blocks[layer].register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.last[layer] = hidden[:, -1].detach() if self.positions == "last" else hidden.detach()

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class FinalNormTap:
    """Keeps the final norm's output ``[batch, pos, d_model]`` of the last forward (``tap.value``)."""

    def __init__(self, hf: nn.Module):
        self.norm = final_norm_of(hf)
        self.value: torch.Tensor | None = None
        self._handle: Any = None

    def __enter__(self) -> "FinalNormTap":
        self._handle = self.norm.register_forward_hook(self._keep)
        return self

    def _keep(self, module, args, output) -> None:
        self.value = output

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class _StopAfterBlock(Exception):
    """Raised by the hook on the last block :func:`first_blocks` runs."""


def first_blocks(hf: nn.Module, input_ids: torch.Tensor, cache: Any, n_blocks: int) -> torch.Tensor:
    """``[batch, pos, d_model]``: the output of block ``n_blocks - 1`` (the blocks after it never run).

    The first ``n_blocks`` layers of ``cache`` receive this forward's keys and values, as in
    a full forward (an early-exit drafter shares the verifier's cache this way).
    """
    kept: dict[str, torch.Tensor] = {}

    def stop(module, args, output):
        kept["h"] = output[0] if isinstance(output, tuple) else output
        raise _StopAfterBlock

    handle = blocks_of(hf)[n_blocks - 1].register_forward_hook(stop)
    try:
        hf.base_model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    except _StopAfterBlock:
        pass
    finally:
        handle.remove()
    return kept["h"]
