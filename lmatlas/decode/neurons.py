"""Decode every MLP neuron of every layer through the model's own vocabulary, in one call.

An MLP neuron ``L{l}.N{n}`` reads the residual stream through one (plain MLP) or two
(gated MLP) input directions and writes one output direction::

    pre_in_n   = norm_mlp(x) · W_in[:, n]       (+ b_in[n])     # "in" / up projection
    pre_gate_n = norm_mlp(x) · W_gate[:, n]                      # gated MLPs only
    act_n      = act(pre_gate_n) * pre_in_n   (or act(pre_in_n))  # the site L{l}.mlp.act
    write     += act_n * W_out[n]                                # times post-MLP norm gain

Weight-based decoding reads these directions as tokens:

* **promoted / suppressed** — the output row ``W_out[n]``, times the gain of the
  post-MLP norm where the family has one (Gemma 2/3, OLMo-2), projected through the
  unembedding with the final norm's gain (``norm="gain"``, see
  :mod:`lmatlas.decode.vocab`): the ``k`` tokens whose logits a positive activation
  raises most (promoted) and lowers most (suppressed).
* **inputs** — "which tokens excite it": each input column (``W_gate[:, n]`` and
  ``W_in[:, n]``) times the gain of the pre-MLP norm, against every token as the MLP
  would see it if the token's embedding were the residual stream: the embedding as
  the embedding module scales it (``embed_scale * W_E[t]``, e.g. ``sqrt(d_model)``
  for Gemma), normalised by the pre-MLP norm's statistic (:func:`input_tokens`).
  The ``k`` tokens with the largest pre-activation (biases, constant per neuron, left out).

On the output side the final norm's statistic (``rsqrt(mean(x**2))``, one positive
number per position) scales every logit alike and is left out: logits are those of
the direction itself. All ``n_layers * d_mlp`` directions are decoded together with the
exact pruned top-k of :mod:`lmatlas.decode.fast_topk` (SmolLM2's 46,080 neurons in
seconds), identical to the plain float32 matmul + top-k.

>>> dec = decode_neurons(model, k=20)                         # doctest: +SKIP
>>> dec.neuron(12, 1031, model.tokenizer)["promoted"]         # doctest: +SKIP
[(' dog', 3.1), (' dogs', 2.9), (' puppy', 2.4)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from lmatlas.decode.fast_topk import SCORERS, PrunedTopK, TokenIndex, auto_method, build_index, pruned_topk
from lmatlas.decode.token_text import token_texts
from lmatlas.decode.vocab import DecodeError, TokenRanking, check_k, prepare, unembed_matrix
from lmatlas.model.norms import block_norm_gain, norm_eps
from lmatlas.model.sites import check_layer, neuron_name
from lmatlas.progress import ProgressArg, progress_task

if TYPE_CHECKING:
    from lmatlas.model.handle import Model

Progress = Callable[[int, int], None]
OUTPUT_NORMS = ("none", "gain")


@dataclass
class NeuronDecoding:
    """What every decoded neuron promotes, suppresses and is excited by.

    Rows are layer-major: row ``i * d_mlp + n`` is neuron ``n`` of ``layers[i]``
    (use :meth:`row`).

    Attributes:
        layers: the decoded layers, in order.
        d_mlp: neurons per layer.
        k: tokens per ranking.
        promoted: ``[rows, k]`` tokens with the largest logits of the output direction, best first.
        suppressed: ``[rows, k]`` tokens with the smallest logits, most suppressed first.
        inputs: ``{"gate": ranking, "in": ranking}`` (``"gate"`` for gated MLPs only):
            ``[rows, k]`` tokens that most excite each input projection (:func:`input_tokens`).
        method: the top-k kernel used (``bf16``, ``int8`` or ``plain``).
        rescored: exact float32 scores computed per output direction and side (``d_vocab``
            for ``plain``; a few dozen for the pruned kernels).
    """

    layers: list[int]
    d_mlp: int
    k: int
    promoted: TokenRanking
    suppressed: TokenRanking
    inputs: dict[str, TokenRanking] = field(default_factory=dict)
    method: str = "plain"
    rescored: float = 0.0

    def row(self, layer: int, neuron: int) -> int:
        """Row of ``L{layer}.N{neuron}`` in the rankings."""
        if layer not in self.layers:
            raise DecodeError(f"Layer {layer} was not decoded: this decoding covers layers {self.layers}.")
        if not 0 <= neuron < self.d_mlp:
            raise DecodeError(
                f"Neuron {neuron} is out of range: layers have {self.d_mlp} neurons (0..{self.d_mlp - 1})."
            )
        return self.layers.index(layer) * self.d_mlp + neuron

    def neuron(self, layer: int, neuron: int, tokenizer: Any = None) -> dict[str, Any]:
        """One neuron as ``{"neuron": "L3.N17", "promoted": [(token, logit), ...], ...}``.

        Tokens are strings when a tokenizer is given, ids otherwise.
        """
        i = self.row(layer, neuron)
        out: dict[str, Any] = {"neuron": neuron_name(layer, neuron), "layer": layer, "index": neuron}
        rankings = {
            "promoted": self.promoted,
            "suppressed": self.suppressed,
            **{f"excited_by_{name}": r for name, r in self.inputs.items()},
        }
        for key, ranking in rankings.items():
            ids = ranking.ids[i].tolist()
            tokens = token_texts(tokenizer, ids) if tokenizer is not None else ids  # byte tokens as <0xE2>
            out[key] = [(t, round(float(v), 4)) for t, v in zip(tokens, ranking.logits[i].tolist())]
        return out

    def records(self, tokenizer: Any = None, layer: int | None = None) -> list[dict[str, Any]]:
        """:meth:`neuron` for every decoded neuron (of one ``layer`` if given)."""
        layers = self.layers if layer is None else [layer]
        return [self.neuron(l, n, tokenizer) for l in layers for n in range(self.d_mlp)]


# -- the directions ---------------------------------------------------------------------------------------
def output_directions(model: "Model", layer: int, norm: str = "gain") -> torch.Tensor:
    """``[d_mlp, d_model]`` float32: each neuron's write direction, as the unembedding sees it.

    ``W_out`` rows, times the post-MLP norm's gain (Gemma 2/3, OLMo-2) and, for
    ``norm="gain"``, through the final norm's gain (centred first before a LayerNorm:
    :func:`lmatlas.decode.vocab.prepare`).
    """
    if norm not in OUTPUT_NORMS:
        raise DecodeError(f"Unknown norm mode {norm!r} for neuron directions: use 'gain' (default) or 'none'.")
    rows = model.W.W_out(layer).detach().float()
    post = block_norm_gain(model, layer, "mlp_post_norm")
    if post is not None:
        rows = rows * post
    return prepare(model, rows, norm)


def input_directions(model: "Model", layer: int, norm: str = "gain") -> dict[str, torch.Tensor]:
    """``{"gate": [d_mlp, d_model], "in": [d_mlp, d_model]}`` float32 input directions of each neuron.

    Columns of ``W_gate`` (gated MLPs only) and ``W_in``, times the pre-MLP norm's gain
    for ``norm="gain"``: ``input_tokens(model) @ direction`` is then the neuron's
    pre-activation for each token (up to the per-neuron constants of biases).
    """
    if norm not in OUTPUT_NORMS:
        raise DecodeError(f"Unknown norm mode {norm!r} for neuron directions: use 'gain' (default) or 'none'.")
    gain = block_norm_gain(model, layer, "mlp_norm") if norm == "gain" else None
    out = {}
    for name, W in (("gate", model.W.W_gate(layer)), ("in", model.W.W_in(layer))):
        if W is not None:
            rows = W.detach().float().T  # [d_mlp, d_model]
            out[name] = rows * gain if gain is not None else rows
    return out


def input_tokens(model: "Model", norm: str = "gain", chunk: int = 8192) -> torch.Tensor:
    """``[d_vocab, d_model]`` float32: each token as the MLPs' input projections see it.

    The token's embedding as the embedding module scales it (``embed_scale * W_E[t]``),
    then, for ``norm="gain"``, the pre-MLP norm's statistic as if that embedding were the
    residual stream: ``e * rsqrt(mean(e**2) + eps)`` for RMS norms,
    ``(e - mean(e)) * rsqrt(var(e) + eps)`` for LayerNorms (the gain goes on the neuron's
    side, :func:`input_directions`; families without a pre-MLP norm, like OLMo-2, use ``e``).
    A float32 copy of the embedding, built ``chunk`` rows at a time.
    """
    W_E = model.W.W_E.detach()
    scale = embed_scale(model)
    norm_module = None
    if norm == "gain" and model.spec.mlp_norm is not None:
        norm_module = model.module("mlp_norm", 0)
    out = torch.empty(W_E.shape, dtype=torch.float32, device=W_E.device)
    for start in range(0, W_E.shape[0], chunk):
        e = W_E[start : start + chunk].float() * scale
        if norm_module is not None:
            eps = norm_eps(norm_module)
            if model.spec.norm_kind.centres:
                e = e - e.mean(-1, keepdim=True)
            e = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + eps)
        out[start : start + chunk] = e
    return out


def embed_scale(model: "Model") -> float:
    """The factor the embedding module multiplies ``W_E`` rows by (``sqrt(d_model)`` for Gemma), else 1."""
    embed = model.module("embed")
    scale = getattr(embed, "embed_scale", None)
    return 1.0 if scale is None else float(scale)


# -- decoding ---------------------------------------------------------------------------------------------
def decode_neurons(
    model: "Model",
    layers: int | Sequence[int] | None = None,
    k: int = 20,
    *,
    inputs: bool | Sequence[str] = True,
    norm: str = "gain",
    method: str = "auto",
    progress: ProgressArg | Progress = True,
) -> NeuronDecoding:
    """Decode every neuron of ``layers`` (default: all) through the vocabulary in one call.

    Args:
        layers: a layer, a list of layers, or None for every layer.
        k: tokens per ranking.
        inputs: also decode the input directions: ``True`` both (``gate`` and ``in``: 2-3x the
            work), ``False`` neither, or the names of those to decode (``["gate"]``; a name the
            MLP lacks is skipped).
        norm: ``"gain"`` (default: apply the final / pre-MLP norm gains) or ``"none"``.
        method: top-k kernel: ``auto``, ``bf16``, ``int8`` or ``plain`` (see
            :func:`lmatlas.decode.fast_topk.pruned_topk`); all give the same rankings.
        progress: ``True`` (default: a bar on a terminal, a line every few seconds
            otherwise, on stderr; see :mod:`lmatlas.progress`), ``False``, or
            ``callback(done, total)`` in neuron-rankings.

    Returns:
        :class:`NeuronDecoding`.
    """
    lay = model.layout
    if layers is None:
        layers = list(range(lay.n_layers))
    elif isinstance(layers, int):
        layers = [layers]
    layers = [check_layer(int(l), lay) for l in layers]
    check_k(model, k)
    if method == "auto":
        method = auto_method(model.device)
    indexes: dict[int, TokenIndex] = {}  # tied embeddings share one index

    def run(rows: torch.Tensor, tokens: torch.Tensor, phase: int, n_phases: int, both: bool) -> PrunedTopK:
        index = None
        if method in SCORERS:
            if tokens.data_ptr() not in indexes:
                indexes[tokens.data_ptr()] = build_index(tokens, SCORERS[method], k)
            index = indexes[tokens.data_ptr()]

        def report(done: int, n: int) -> None:
            if callable(progress):
                progress(phase * n + done, n_phases * n)
            else:
                task.update(phase * n + done, total=n_phases * n)

        return pruned_topk(rows, tokens, k, bottom=both, method=method, index=index, progress=report)

    shown = bool(progress) and not callable(progress)
    with torch.no_grad(), progress_task(f"Decoding {len(layers) * lay.d_mlp:,} neurons", enabled=shown) as task:
        names = [name for name in input_directions(model, layers[0], norm) if inputs is True or name in (inputs or ())]
        n_phases = 1 + len(names)
        outputs = torch.cat([output_directions(model, l, norm) for l in layers])  # [rows, d_model]
        out = run(outputs, unembed_matrix(model).T, 0, n_phases, both=True)
        del outputs
        decoded_inputs = {}
        tokens = input_tokens(model, norm) if names else None
        for phase, name in enumerate(names, start=1):
            rows = torch.cat([input_directions(model, l, norm)[name] for l in layers])  # [rows, d_model]
            decoded_inputs[name] = run(rows, tokens, phase, n_phases, both=False).top
    return NeuronDecoding(
        layers=layers,
        d_mlp=lay.d_mlp,
        k=k,
        promoted=out.top,
        suppressed=out.bottom,
        inputs=decoded_inputs,
        method=out.method,
        rescored=out.rescored,
    )
