"""DuoAttention-style gates: one number per KV head mixing full and sink + recent attention, learned on the frozen model.

Xiao et al. (2024), "DuoAttention": give every KV head a gate ``g`` in [0, 1] and run

    out_h = g * full_attention_h + (1 - g) * windowed_attention_h     (every query head of the KV group)

where the windowed attention sees only the first ``sink`` and the ``recent`` latest keys, the
query's own included (a :class:`~lmatlas.model.window.Window`, the rule of :mod:`lmatlas.infer.plan`). With the model frozen, the gates are trained so
that the gated model's last hidden states on the answer tokens of long prompts (passkeys
hidden in natural text) stay close to the full model's, while an L1 term pushes every
gate toward 0. Heads whose gate stays high need the whole context; the plan keeps the
top fraction full (:func:`gate_plan`).

* :class:`GateCache` — a transformers cache that makes every full-attention layer run the
  gated attention with the gates of a ``[layer, kv_head]`` tensor (differentiable: the
  gates may require gradients). At gate 1 a head computes the model's own attention, at
  gate 0 exactly what a windowed head of :class:`~lmatlas.infer.cache.HeadwiseCache`
  computes (the tests check both against plain PyTorch).
* :class:`GatePlan` — trained gates as a KV-policy value (``lmatlas.generate(kv=GatePlan.of(result))``).
* :func:`train_gates` — the optimisation (Adam, gates clamped to [0, 1] after each step).
* :func:`gate_plan` — a :class:`~lmatlas.infer.plan.KVPlan` from ``[layer, kv_head]`` scores.

The windowed part is computed ``CHUNK`` query rows at a time over the keys each chunk can
see (:func:`lmatlas.infer.attention.windowed_attention`), so its memory grows with
``pos x (sink + recent)``, not ``pos x pos``; the full part is the model's own kernel
(SDPA's causal path needs no ``pos x pos`` mask).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from transformers.cache_utils import DynamicLayer

from lmatlas.errors import LmatlasError
from lmatlas.infer import choose
from lmatlas.infer.attention import CUSTOM, windowed_attention
from lmatlas.infer.cache import _InstalledCache, _layers
from lmatlas.infer.layer import WindowedCall
from lmatlas.infer.plan import KVPlan, choosable_layers
from lmatlas.model.window import Window
from lmatlas.progress import ProgressArg, progress_task

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


@dataclass
class GateCall:
    """The gated attention of one layer: ``gates`` ``[n_kv]`` (0 = windowed, 1 = full)."""

    gates: torch.Tensor
    window: Window
    q_start: int

    def attend(self, run_base, module, query, key, value, attention_mask, *args, **kwargs):
        """``g * base(query, key, value) + (1 - g) * windowed``, per KV head; returns ``([batch, n, head, d_v], None)``."""
        full, _ = run_base(module, query, key, value, attention_mask, *args, **kwargs)
        n_kv = key.shape[1]
        positions = torch.arange(key.shape[2], device=key.device)
        call = WindowedCall((), tuple(range(n_kv)), None, None, key, value, positions, self.q_start, self.window)
        scaling = kwargs.get("scaling")
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        windowed = windowed_attention(query, call, scaling, kwargs.get("softcap")).transpose(1, 2)  # [b, n, h, d]
        rep = query.shape[1] // n_kv
        gate = self.gates.to(full.dtype).repeat_interleave(rep)[None, None, :, None]  # [1, 1, head, 1]
        return gate * full + (1 - gate) * windowed.to(full.dtype), None


class GateLayer(DynamicLayer):
    """A full-attention cache layer that keeps every entry and marks its keys with a :class:`GateCall`."""

    def __init__(self, gates: torch.Tensor, window: Window):
        super().__init__()
        self.gates, self.window = gates, window

    def update(self, key_states, value_states, *args, **kwargs):
        start = self.get_seq_length() if self.is_initialized else 0
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        keys = keys.view_as(keys)  # a fresh tensor object (same storage, same graph) to carry the payload
        setattr(keys, CUSTOM, GateCall(self.gates, self.window, start))
        return keys, values


class GateCache(_InstalledCache):
    """Every full-attention layer gated by ``gates[layer]`` (``[n_layers, n_kv_heads]``); others the model's window."""

    def __init__(self, model: "Model", gates: torch.Tensor, sink: int = 4, recent: int = 256):
        window = Window(sink, recent)
        lay = model.layout
        if tuple(gates.shape) != (lay.n_layers, lay.n_kv_heads):
            raise LmatlasError(
                f"Gates of shape {tuple(gates.shape)} do not fit this model: one per KV head, "
                f"[{lay.n_layers}, {lay.n_kv_heads}]."
            )
        super().__init__(model, _layers(model, lambda index: GateLayer(gates[index], window)))


@dataclass(frozen=True)
class GatePlan:
    """A KV policy: every full-attention layer gated by ``gates`` (``[n_layers][n_kv_heads]`` in [0, 1]).

    The value behind ``--kv gates``: trained gates (:func:`train_gates`, ``GateResult.gates``)
    or any hand-made ones; ``window`` is the windowed part's :class:`~lmatlas.model.window.Window`.
    Every entry is kept (the gates mix two attentions; nothing is evicted).
    """

    gates: tuple[tuple[float, ...], ...]
    window: Window = Window()

    @classmethod
    def of(cls, gates, window: Window = Window()) -> "GatePlan":
        """A plan from a ``[n_layers, n_kv_heads]`` tensor, nested list or :class:`GateResult`."""
        rows = gates.gates if isinstance(gates, GateResult) else torch.as_tensor(gates).tolist()
        return cls(tuple(tuple(float(g) for g in row) for row in rows), window)

    def describe(self) -> dict:
        flat = [g for row in self.gates for g in row]
        return {"method": "gates", **self.window.describe(), "mean_gate": round(sum(flat) / max(1, len(flat)), 4)}

    def make_cache(self, model: "Model") -> "GateCache":
        """A fresh :class:`GateCache` for one sequence (the KV-policy protocol)."""
        cache = GateCache(model, torch.tensor(self.gates), self.window.sink, self.window.recent)
        cache.plan = self
        return cache


@dataclass(frozen=True)
class GateTrial:
    """One training prompt: ``input_ids`` (prompt followed by the answer) and the answer's ``[start, stop)``."""

    input_ids: tuple[int, ...]
    answer: tuple[int, int]


@dataclass(frozen=True)
class GateResult:
    """Trained gates ``[n_layers, n_kv_heads]`` (as a nested list), the loss per step and the cost."""

    gates: list[list[float]]
    losses: list[float]
    seconds: float
    steps: int
    settings: dict = field(default_factory=dict)

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.gates)


def answer_hidden(model: "Model", ids: torch.Tensor, span: tuple[int, int], cache=None) -> torch.Tensor:
    """The last hidden state ``[n_answer, d_model]`` at the positions predicting the answer tokens.

    The answer occupies ``[start, stop)`` of ``ids`` ``[1, pos]``; the positions that predict
    it are ``start - 1 ... stop - 2``.
    """
    start, stop = span
    out = model.hf(ids[:, : stop - 1], past_key_values=cache, use_cache=cache is not None, output_hidden_states=True)
    return out.hidden_states[-1][0, start - 1 : stop - 1]


def gate_loss(model: "Model", gates, trial: GateTrial, sink: int, recent: int, l1: float, reference=None):
    """``(loss, distance)``: relative squared distance of gated from full answer hidden states + ``l1 * mean(gates)``."""
    ids = torch.tensor([trial.input_ids])
    if reference is None:
        with torch.no_grad():
            reference = answer_hidden(model, ids, trial.answer)
    gated = answer_hidden(model, ids, trial.answer, GateCache(model, gates, sink, recent))
    distance = (gated - reference).pow(2).sum(-1).mean() / reference.pow(2).sum(-1).mean()
    layers = choosable_layers(model)
    return distance + l1 * gates[layers].mean(), distance


def train_gates(
    model: "Model",
    trials: Sequence[GateTrial],
    steps: int,
    sink: int = 4,
    recent: int = 256,
    lr: float = 0.02,
    l1: float = 0.05,
    seed: int = 0,
    progress: ProgressArg = True,
) -> GateResult:
    """Train one gate per KV head (model frozen) on ``trials``, drawn at random for ``steps`` steps."""
    if not trials:
        raise LmatlasError("train_gates needs at least one trial.")
    lay = model.layout
    gates = torch.ones(lay.n_layers, lay.n_kv_heads, requires_grad=True)
    optimiser = torch.optim.Adam([gates], lr=lr)
    rng = random.Random(seed)
    losses: list[float] = []
    start = time.perf_counter()
    with progress_task("Training KV-head gates", total=steps, enabled=progress) as task:
        for _ in range(steps):
            trial = trials[rng.randrange(len(trials))]
            loss, distance = gate_loss(model, gates, trial, sink, recent, l1)
            optimiser.zero_grad()
            loss.backward(inputs=[gates])  # the model's weights get no gradient: it stays frozen
            optimiser.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            losses.append(round(float(distance.detach()), 6))
            task.advance()
    settings = {"sink": sink, "recent": recent, "lr": lr, "l1": l1, "seed": seed, "trials": len(trials)}
    return GateResult(gates.detach().tolist(), losses, time.perf_counter() - start, steps, settings)


def gate_plan(
    model: "Model", kv_scores: torch.Tensor, budget: float, sink: int = 4, recent: int = 256, method: str = "gates"
) -> KVPlan:
    """Keep the ``budget`` fraction of KV heads with the highest ``[layer, kv_head]`` scores full."""
    lay = model.layout
    if tuple(kv_scores.shape) != (lay.n_layers, lay.n_kv_heads):
        raise LmatlasError(f"KV-head scores must be [{lay.n_layers}, {lay.n_kv_heads}], got {tuple(kv_scores.shape)}.")
    return choose.from_scores(model, kv_scores.repeat_interleave(lay.group_size, dim=1), budget, sink, recent, method)
