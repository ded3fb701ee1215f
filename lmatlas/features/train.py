"""Train a TopK SAE or a skip-transcoder on harvested activations: seeded, resumable, sparse backward.

The recipe follows Gao et al. 2024 ("Scaling and evaluating sparse autoencoders"):

* ``loss = FVU + auxk_alpha * AuxK`` (:mod:`lmatlas.features.objective`): FVU is the batch's
  squared error over its total variance; AuxK asks the top ``d/2`` *dead* latents (not fired
  for ``dead_tokens`` tokens) to predict the residual error, scaled down when few are dead
  (``min(dead / (d/2), 1)``).
* Outlier rows (norm over ``outlier_ratio`` x the median: attention sinks past position 0)
  are left out of the batches at read time; an SAE then gives one latent to them
  (:mod:`lmatlas.features.sinks`).
* An SAE: unit-norm decoder rows, renormalised after every step (the gradient's component
  along each row is removed first); ``b_dec`` starts at the mean of the data and ``W_enc``
  at ``W_dec.T``.
* A skip-transcoder starts its affine skip at the least-squares linear map from the MLP's
  input to its output, so the latents learn what the best linear map misses; its encoder
  bias centres every latent's pre-activation on the data (the input is not centred) and its
  decoder starts at zero with free norms (sparsify's start: a random decoder adds noise that
  Adam answers by pushing every encoder bias down, and the latents die in the first steps).
* Activations are scaled to unit mean squared (centred) norm per dimension while training
  and the scale is folded back into the weights at the end (exactly: the top-k selection
  does not change under a positive scale).
* The top-k selection runs in ``encoder_dtype`` (bfloat16 by default: 3x the float32
  matmul rate on CPUs with AMX or AVX512-BF16); the backward is sparse
  (:mod:`lmatlas.features.sparse`): only the ``k`` selected rows are touched.

Seeded (the initialisation and the data order depend only on ``seed``): the same call gives
bit-identical weights. ``out/checkpoint/`` (``state.safetensors`` + ``state.json``, never
pickle) is written every ``checkpoint_every`` steps; the same call resumes from it and
reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lmatlas.errors import DictionaryError
from lmatlas.features.checkpoint import load_checkpoint, save_checkpoint
from lmatlas.features.dictionary import Dictionary, DictionaryCard, build, check_sizes, split_site, transcoder_output
from lmatlas.features.harvest import Activations
from lmatlas.features.objective import heldout_fvu, step_loss
from lmatlas.features.outliers import NormLimit
from lmatlas.features.scaling import data_stats, fold_scales, initialise
from lmatlas.features.sinks import add_sink_latent
from lmatlas.progress import ProgressArg, progress_task

_SAMPLE = 65536  # rows used for the initial statistics (mean, scale, least squares)


@dataclass(frozen=True)
class TrainConfig:
    """How to train one dictionary (``n_latents``, ``k`` and the optimiser's settings).

    ``tokens``: training tokens to process (``None``: one pass over the harvest; more than
    the harvest holds means several epochs). ``lr``: Adam's rate (``None``:
    ``2e-3 / sqrt(n_latents / 16384)``, at most ``2e-3``, for an SAE, half of that for a
    transcoder: faster rates left more latents dead); ``warmup``/``decay``: fractions of the
    steps with a linear ramp up / down. ``dead_tokens``: a latent not fired for this many
    tokens is dead for AuxK (``None``: a fifth of the training tokens, at most 10M).
    ``auxk_alpha``: AuxK's weight (1/8: Gao et al. train for billions of tokens with 1/32; in a
    few hundred steps 1/8 left fewer latents dead, ``bench/features_recipe.py``); ``auxk_norm``:
    its denominator (:mod:`lmatlas.features.objective`). ``outlier_ratio``:
    rows whose norm is over this many times the median are left out of the batches
    (:mod:`lmatlas.features.outliers`; ``None`` keeps them). ``sink_latent``: an SAE whose
    sample held such rows gives its least used latent to them at the end
    (:mod:`lmatlas.features.sinks`). ``unit_decoder``: decoder rows kept at unit norm (``None``:
    for an SAE; a transcoder starts from a zero decoder and leaves its norms free, as sparsify).
    """

    n_latents: int = 16384
    k: int = 32
    transcoder: bool = False
    tokens: int | None = None
    batch_size: int = 4096
    lr: float | None = None
    warmup: float = 0.05
    decay: float = 0.2
    auxk_alpha: float = 1 / 8
    auxk_norm: str = "residual"
    dead_tokens: int | None = None
    outlier_ratio: float | None = 10.0
    sink_latent: bool = True
    unit_decoder: bool | None = None
    seed: int = 0
    encoder_dtype: str = "bfloat16"
    eval_every: int = 25
    checkpoint_every: int = 100

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        rate = min(2e-3, 2e-3 / math.sqrt(self.n_latents / 16384))
        return rate / 2 if self.transcoder else rate


@dataclass
class TrainResult:
    """The trained dictionary and how training went (``history``: one row per held-out evaluation)."""

    dictionary: Dictionary
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0


def sites_for(site: str, transcoder: bool) -> tuple[str, str]:
    """``(input site, output site)``: the same site for an SAE; ``L15.mlp.in`` -> ``L15.mlp.out`` for a transcoder."""
    layer, component = split_site(site)
    if not transcoder:
        return site, site
    if component in ("mlp.in", "mlp.out"):
        return f"L{layer}.mlp.in", transcoder_output(f"L{layer}.mlp.in")
    raise DictionaryError(
        f"A transcoder replaces an MLP: name its layer's MLP input or output (L{layer}.mlp.in or L{layer}.mlp.out), not {site}."
    )


def _fmt_seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


@dataclass(frozen=True)
class _Plan:
    """One run's checked shape: its sites, dictionary card and step schedule."""

    in_site: str
    out_site: str
    card: DictionaryCard
    steps_per_epoch: int
    total_steps: int
    dead_tokens: int


def _plan(acts: Activations, site: str, config: TrainConfig) -> _Plan:
    """Check ``site`` and ``config`` against the harvest (before any compute) and fix the schedule."""
    in_site, out_site = sites_for(site, config.transcoder)
    for name in {in_site, out_site}:
        if name not in acts.sites:
            raise DictionaryError(
                f"The harvest at {acts.path} has no {name}: harvest it ({', '.join(acts.sites)} only)."
            )
    d_in, d_out = acts.sites[in_site], acts.sites[out_site]
    if config.n_latents <= config.k:
        raise DictionaryError(f"k={config.k} must be below the {config.n_latents} latents.")
    steps_per_epoch = acts.n_tokens // config.batch_size
    if steps_per_epoch == 0:
        raise DictionaryError(
            f"The harvest holds {acts.n_tokens:,} tokens, less than one batch of {config.batch_size:,}: harvest more or lower --batch."
        )
    total_steps = max(1, (config.tokens or acts.n_tokens) // config.batch_size)
    dead_tokens = config.dead_tokens or min(10_000_000, max(config.batch_size, total_steps * config.batch_size // 5))
    card = DictionaryCard(
        "transcoder" if config.transcoder else "sae",
        in_site,
        d_in,
        config.n_latents,
        config.k,
        d_out=d_out,
        out_site=out_site,
        model=acts.meta.get("model", {}),
        seed=config.seed,
    )
    return _Plan(in_site, out_site, card, steps_per_epoch, total_steps, dead_tokens)


class _Trainer:
    """The state of one training run: the dictionary, Adam, the dead-latent counters and the history.

    Built in a fixed order (seed, build, statistics, initialisation, optimiser, resume) so
    the same call gives bit-identical weights; ``run`` steps through the seeded batches.
    """

    def __init__(
        self,
        acts: Activations,
        held: Activations | None,
        plan: _Plan,
        config: TrainConfig,
        out: str | Path | None,
        on_eval: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.acts, self.plan, self.config, self.on_eval = acts, plan, config, on_eval
        torch.manual_seed(config.seed)
        self.d = build(plan.card)
        x0, y0 = acts.rows(plan.in_site, _SAMPLE), acts.rows(plan.out_site, _SAMPLE)
        self.limit = NormLimit.fit([x0, y0] if config.transcoder else [x0], config.outlier_ratio)
        kept = self.limit.keep([x0, y0] if config.transcoder else [x0])
        self.sample_outliers, self.sample_ordinary = x0[~kept], x0[kept]
        x0, y0 = x0[kept], y0[kept]
        _, self.sx = data_stats(x0)
        _, self.sy = data_stats(y0) if config.transcoder else (None, self.sx)
        self.unit_decoder = config.unit_decoder if config.unit_decoder is not None else not config.transcoder
        initialise(self.d, plan.card, x0, y0, self.sx, self.sy, config.seed, self.unit_decoder)
        self.hx = self.hy = self.hkeep = None
        if held is not None:
            hx, hy = held.rows(plan.in_site, 16384), held.rows(plan.out_site, 16384)
            self.hkeep = self.limit.keep([hx, hy] if config.transcoder else [hx])
            self.hx, self.hy = hx * self.sx, hy * self.sy
        self.lr = config.learning_rate()
        self.opt = torch.optim.Adam(self.d.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
        self.warm = max(1, int(config.warmup * plan.total_steps))
        self.decay = max(1, int(config.decay * plan.total_steps))
        self.since = torch.zeros(config.n_latents, dtype=torch.int64)
        self.left_out = 0  # outlier rows left out of the batches so far (this call)
        self.history: list[dict[str, Any]] = []
        self.step, self.elapsed_before = 0, 0.0
        self.ckpt = Path(out) / "checkpoint" if out is not None else None
        self.config_json = asdict(config)
        self._resume()
        self.started, self.first_step = time.monotonic(), self.step
        self.running: list[float] = []
        kind = "Transcoder" if config.transcoder else "SAE"
        self.label = f"{kind} {plan.in_site}{'->' + plan.out_site if config.transcoder else ''}"

    def _resume(self) -> None:
        """Load ``out/checkpoint`` when it holds this run (another run's checkpoint is an error)."""
        ckpt = self.ckpt
        if ckpt is None or not (ckpt / "state.json").is_file():
            return
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("config") != self.config_json or state.get("site") != self.plan.in_site:
            raise DictionaryError(
                f"{ckpt} holds a checkpoint of another run ({state.get('site')}, {state.get('config')}): pass another --out or delete it."
            )
        self.since, state = load_checkpoint(ckpt, self.d, self.opt)
        self.step, self.history, self.elapsed_before = state["step"], state["history"], state["seconds"]

    def seconds(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def rate(self, step: int) -> float:
        """Adam's rate at ``step``: a linear warm-up, flat, then a linear decay to zero."""
        return self.lr * min(1.0, (step + 1) / self.warm, (self.plan.total_steps - step) / self.decay)

    def optimise(self, batch: list[torch.Tensor]) -> None:
        """One step on one batch (``[batch_size, d]`` per site): loss, sparse backward, Adam, renormalise."""
        config, d = self.config, self.d
        keep = self.limit.keep(batch)
        x = batch[0][keep] * self.sx
        y = batch[-1][keep] * self.sy
        for group in self.opt.param_groups:
            group["lr"] = self.rate(self.step)
        dead = self.since > self.plan.dead_tokens
        loss, fvu, indices, values = step_loss(
            d,
            x,
            y,
            dead if bool(dead.any()) else None,
            k=config.k,
            auxk_alpha=config.auxk_alpha,
            auxk_norm=config.auxk_norm,
            dtype=getattr(torch, config.encoder_dtype),
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.unit_decoder:
            with torch.no_grad():
                grad, W = d.W_dec.grad, d.W_dec
                grad -= (grad * W).sum(1, keepdim=True) * W
        self.opt.step()
        if self.unit_decoder:
            d.normalize_decoder()
        fired = torch.zeros(config.n_latents, dtype=torch.bool)
        fired[indices[values > 0]] = True
        self.since += len(x)
        self.since[fired] = 0
        self.left_out += len(keep) - len(x)
        self.running.append(float(fvu.detach()))
        self.step += 1

    def evaluate(self) -> dict[str, Any]:
        """One history row: the running train FVU, the dead fraction and (with a held-out set) FVU and L0."""
        row = {
            "step": self.step,
            "tokens": self.step * self.config.batch_size,
            "seconds": round(self.seconds(), 2),
            "train_fvu": round(sum(self.running) / max(1, len(self.running)), 5),
            "dead_fraction": round(float((self.since > self.plan.dead_tokens).float().mean()), 5),
        }
        if self.hx is not None:
            fvu, l0 = heldout_fvu(self.d, self.hx, self.hy)
            row.update(heldout_fvu=round(fvu, 5), l0=round(l0, 2))
            if not bool(self.hkeep.all()):
                kept, _ = heldout_fvu(self.d, self.hx[self.hkeep], self.hy[self.hkeep])
                row["heldout_fvu_without_outliers"] = round(kept, 5)
        self.running.clear()
        return row

    def report(self, task: Any) -> None:
        """Evaluate, keep the row, show it on the progress line and pass it to ``on_eval``."""
        row = self.evaluate()
        self.history.append(row)
        spent = row["seconds"] - self.elapsed_before
        eta = spent / max(1, self.step - self.first_step) * (self.plan.total_steps - self.step)
        shown = f"held-out FVU {row['heldout_fvu']:.3f}, " if "heldout_fvu" in row else ""
        task.update(
            self.step,
            description=f"Training {self.label}: {shown}train FVU {row['train_fvu']:.3f}, "
            f"dead {100 * row['dead_fraction']:.1f}%, ETA {_fmt_seconds(eta)}",
        )
        if self.on_eval is not None:
            self.on_eval(row)

    def checkpoint(self) -> None:
        """Write the weights, Adam's state, the counters and the history to ``out/checkpoint``."""
        state = {
            "step": self.step,
            "site": self.plan.in_site,
            "config": self.config_json,
            "history": self.history,
            "seconds": self.seconds(),
        }
        save_checkpoint(self.ckpt, self.d, self.opt, self.since, state)

    def run(self, task: Any, max_steps: int | None) -> None:
        """Step until the schedule ends (or ``max_steps``), resuming mid-epoch at the right batch."""
        config, plan = self.config, self.plan
        sites = [plan.in_site] if plan.in_site == plan.out_site else [plan.in_site, plan.out_site]
        task.update(self.step)
        epoch, stop = self.step // plan.steps_per_epoch, False
        while self.step < plan.total_steps and not stop:
            skip = self.step - epoch * plan.steps_per_epoch
            for i, batch in enumerate(self.acts.batches(sites, config.batch_size, seed=config.seed, epoch=epoch)):
                if i < skip:
                    continue
                if self.step >= plan.total_steps or (max_steps is not None and self.step >= max_steps):
                    stop = True
                    break
                self.optimise(batch)
                task.update(self.step)
                last = self.step == plan.total_steps
                if self.step % config.eval_every == 0 or last:
                    self.report(task)
                if self.ckpt is not None and (self.step % config.checkpoint_every == 0 or last):
                    self.checkpoint()
            else:
                epoch += 1

    def result(self) -> TrainResult:
        """Fold the scales back into the weights and record how training went on the card."""
        seconds, step = self.seconds(), self.step
        fold_scales(self.d, self.sx, self.sy)
        sink = None
        if self.config.sink_latent and not self.config.transcoder and len(self.sample_outliers):
            give_up = int(self.since.argmax())
            sink = add_sink_latent(self.d, self.sample_outliers, self.sample_ordinary, give_up)
        training = {
            **self.config_json,
            "lr": self.lr,
            "dead_tokens": self.plan.dead_tokens,
            "steps": step,
            "tokens_seen": step * self.config.batch_size,
            "harvest_tokens": self.acts.n_tokens,
            "seconds": round(seconds, 2),
            "scale_in": self.sx,
            "scale_out": self.sy,
            "outlier_norm_limits": list(self.limit.limits) if self.limit.ratio else None,
            "dead_fraction_train": float((self.since > self.plan.dead_tokens).float().mean()),
            "sink_latent": sink,
            "history": self.history,
            "finished": step >= self.plan.total_steps,
        }
        self.d.card = self.plan.card.replace(training=training)
        return TrainResult(self.d, self.history, seconds, step, step * self.config.batch_size)


def train(
    activations: Activations | str | Path,
    site: str,
    config: TrainConfig = TrainConfig(),
    *,
    heldout: Activations | str | Path | None = None,
    out: str | Path | None = None,
    progress: ProgressArg = True,
    max_steps: int | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train one dictionary on ``site`` of a harvest (``config.transcoder``: the MLP of ``site``'s layer).

    ``heldout``: a harvest of held-out windows for the metrics reported as training goes
    (``None``: the FVU on the training batches only). ``out``: checkpoints go to
    ``out/checkpoint`` and a run resumes from there. ``max_steps`` stops early (as an
    interrupt would; for tests of resuming).
    """
    check_sizes(config.n_latents, config.k)
    acts = activations if isinstance(activations, Activations) else Activations(activations)
    held = heldout if heldout is None or isinstance(heldout, Activations) else Activations(heldout)
    plan = _plan(acts, site, config)
    trainer = _Trainer(acts, held, plan, config, out, on_eval)
    with progress_task(f"Training {trainer.label}", total=plan.total_steps, enabled=progress) as task:
        trainer.run(task, max_steps)
    return trainer.result()
