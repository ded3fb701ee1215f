"""Train a TopK SAE or a skip-transcoder on harvested activations: seeded, resumable, sparse backward.

The recipe follows Gao et al. 2024 ("Scaling and evaluating sparse autoencoders"):

* ``loss = FVU + auxk_alpha * AuxK``: FVU is the batch's squared error over its total
  variance; AuxK asks the top ``d/2`` *dead* latents (not fired for ``dead_tokens`` tokens) to
  predict the residual error, scaled down when few are dead (``min(dead / (d/2), 1)``).
* Unit-norm decoder rows, renormalised after every step (the gradient's component along
  each row is removed first); ``b_dec`` starts at the mean of the data (an SAE) and
  ``W_enc`` at ``W_dec.T``.
* A skip-transcoder starts its affine skip at the least-squares linear map from the MLP's
  input to its output, so the latents learn what the best linear map misses.
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
from lmatlas.features.dictionary import Dictionary, DictionaryCard, build, check_sizes, split_site, transcoder_output
from lmatlas.features.harvest import Activations
from lmatlas.features.sparse import sparse_decode, topk_encode
from lmatlas.progress import ProgressArg, progress_task

_SAMPLE = 65536  # rows used for the initial statistics (mean, scale, least squares)


@dataclass(frozen=True)
class TrainConfig:
    """How to train one dictionary (``n_latents``, ``k`` and the optimiser's settings).

    ``tokens``: training tokens to process (``None``: one pass over the harvest; more than
    the harvest holds means several epochs). ``lr``: Adam's rate (``None``:
    ``2e-3 / sqrt(n_latents / 16384)``, capped at ``4e-3``); ``warmup``/``decay``: fractions of the
    steps with a linear ramp up / down. ``dead_tokens``: a latent not fired for this many
    tokens is dead for AuxK (``None``: a fifth of the training tokens, at most 10M).
    """

    n_latents: int = 16384
    k: int = 32
    transcoder: bool = False
    tokens: int | None = None
    batch_size: int = 4096
    lr: float | None = None
    warmup: float = 0.05
    decay: float = 0.2
    auxk_alpha: float = 1 / 32
    dead_tokens: int | None = None
    seed: int = 0
    encoder_dtype: str = "bfloat16"
    eval_every: int = 25
    checkpoint_every: int = 100

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else min(4e-3, 2e-3 / math.sqrt(self.n_latents / 16384))


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


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean ``[d]`` and the scale that gives the centred data unit mean square per dimension."""
    mean = x.mean(0)
    var = (x - mean).pow(2).sum(-1).mean()
    return mean, float(math.sqrt(x.shape[1] / max(float(var), 1e-12)))


def _init(d: Dictionary, card: DictionaryCard, x: torch.Tensor, y: torch.Tensor, sx: float, sy: float, seed: int):
    """Initialise ``d`` in the scaled space (``x * sx``, ``y * sy``)."""
    gen = torch.Generator().manual_seed(seed)
    n = card.n_latents
    with torch.no_grad():
        W_dec = torch.randn(n, card.d_out, generator=gen)
        d.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        d.b_enc.zero_()
        xs, ys = x * sx, y * sy
        if card.kind == "sae":
            d.W_enc.copy_(d.W_dec.t())
            d.b_dec.copy_(xs.mean(0))
        else:
            xc, yc = xs - xs.mean(0), ys - ys.mean(0)
            gram = xc.t() @ xc
            ridge = 1e-4 * gram.diagonal().mean() * torch.eye(gram.shape[0])
            W_skip = torch.linalg.solve(gram + ridge, xc.t() @ yc)
            d.W_skip.copy_(W_skip)
            d.b_dec.copy_(ys.mean(0) - xs.mean(0) @ W_skip)
            d.W_enc.copy_(torch.randn(card.d_in, n, generator=gen) * (0.1 / math.sqrt(card.d_in)))


def _fold(d: Dictionary, sx: float, sy: float) -> None:
    """Turn a dictionary trained on ``x * sx -> y * sy`` into one on ``x -> y`` (latents divided by ``sy``)."""
    with torch.no_grad():
        d.W_enc.mul_(sx / sy)
        d.b_enc.div_(sy)
        d.b_dec.div_(sy)
        if hasattr(d, "W_skip"):
            d.W_skip.mul_(sx / sy)


def step_loss(d: Dictionary, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor | None, config: TrainConfig):
    """One batch: ``(loss, fvu, indices of the kept latents [B, k], their values [B, k])`` in the scaled space."""
    dtype = getattr(torch, config.encoder_dtype)
    xin = d.encoder_input(x)
    values, indices, pre = topk_encode(xin, d.W_enc, d.b_enc, config.k, dtype=dtype)
    out = sparse_decode(values, indices, d.W_dec) + d.b_dec
    if hasattr(d, "W_skip"):
        out = out + x @ d.W_skip
    error = y - out
    total = (y - y.mean(0)).pow(2).sum()
    fvu = error.pow(2).sum() / total
    loss = fvu
    if dead is not None and config.auxk_alpha > 0:
        dead_idx = dead.nonzero().squeeze(1)
        if len(dead_idx):
            k_aux = min(y.shape[1] // 2, len(dead_idx))
            scale = min(len(dead_idx) / (y.shape[1] // 2), 1.0)
            aux_values, aux_indices, _ = topk_encode(xin, d.W_enc, d.b_enc, k_aux, among=dead_idx, pre=pre)
            e_hat = sparse_decode(aux_values, aux_indices, d.W_dec)
            loss = loss + config.auxk_alpha * scale * (e_hat - error.detach()).pow(2).sum() / total
    return loss, fvu, indices, values


@torch.no_grad()
def heldout_fvu(d: Dictionary, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> tuple[float, float]:
    """``(FVU, L0)`` of ``d`` on ``x -> y`` (float32 selection, as in use)."""
    err = l0 = 0.0
    for lo in range(0, len(x), chunk):
        out, latents = d(x[lo : lo + chunk])
        err += float((y[lo : lo + chunk] - out).pow(2).sum())
        l0 += float((latents > 0).sum())
    return err / float((y - y.mean(0)).pow(2).sum()), l0 / len(x)


def _params(d: Dictionary) -> dict[str, torch.nn.Parameter]:
    return dict(d.named_parameters())


def _save_checkpoint(path: Path, d: Dictionary, opt: torch.optim.Adam, since: torch.Tensor, state: dict) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v.detach().contiguous() for k, v in _params(d).items()}
    for name, param in _params(d).items():
        st = opt.state.get(param)
        if st:
            tensors[f"adam.{name}.exp_avg"] = st["exp_avg"].contiguous()
            tensors[f"adam.{name}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            tensors[f"adam.{name}.step"] = st["step"].reshape(1).float()
    tensors["since_fired"] = since
    save_file(tensors, str(path / "state.safetensors.tmp"))
    (path / "state.safetensors.tmp").replace(path / "state.safetensors")
    (path / "state.json").write_text(json.dumps(state, indent=1))


def _load_checkpoint(path: Path, d: Dictionary, opt: torch.optim.Adam) -> tuple[torch.Tensor, dict]:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "state.safetensors"))
    with torch.no_grad():
        for name, param in _params(d).items():
            param.copy_(tensors[f"param.{name}"])
            if f"adam.{name}.exp_avg" in tensors:
                opt.state[param] = {
                    "step": tensors[f"adam.{name}.step"].reshape(()).clone(),
                    "exp_avg": tensors[f"adam.{name}.exp_avg"].clone(),
                    "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].clone(),
                }
    return tensors["since_fired"].clone(), json.loads((path / "state.json").read_text())


def _fmt_seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


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
    torch.manual_seed(config.seed)
    d = build(card)
    x0, y0 = acts.rows(in_site, _SAMPLE), acts.rows(out_site, _SAMPLE)
    _, sx = _stats(x0)
    _, sy = _stats(y0) if config.transcoder else (None, sx)
    _init(d, card, x0, y0, sx, sy, config.seed)
    hx = hy = None
    if held is not None:
        hx, hy = held.rows(in_site, 16384) * sx, held.rows(out_site, 16384) * sy
    lr = config.learning_rate()
    opt = torch.optim.Adam(d.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    warm, decay = max(1, int(config.warmup * total_steps)), max(1, int(config.decay * total_steps))

    def rate(step: int) -> float:
        return lr * min(1.0, (step + 1) / warm, (total_steps - step) / decay)

    since = torch.zeros(config.n_latents, dtype=torch.int64)
    history: list[dict[str, Any]] = []
    step, elapsed_before = 0, 0.0
    ckpt = Path(out) / "checkpoint" if out is not None else None
    config_json = asdict(config)
    if ckpt is not None and (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("config") != config_json or state.get("site") != in_site:
            raise DictionaryError(
                f"{ckpt} holds a checkpoint of another run ({state.get('site')}, {state.get('config')}): pass another --out or delete it."
            )
        since, state = _load_checkpoint(ckpt, d, opt)
        step, history, elapsed_before = state["step"], state["history"], state["seconds"]
    started, first_step = time.monotonic(), step
    running: list[float] = []

    def evaluate_now() -> dict[str, Any]:
        row = {
            "step": step,
            "tokens": step * config.batch_size,
            "seconds": round(elapsed_before + time.monotonic() - started, 2),
            "train_fvu": round(sum(running) / max(1, len(running)), 5),
            "dead_fraction": round(float((since > dead_tokens).float().mean()), 5),
        }
        if hx is not None:
            fvu, l0 = heldout_fvu(d, hx, hy)
            row.update(heldout_fvu=round(fvu, 5), l0=round(l0, 2))
        running.clear()
        return row

    sites = [in_site] if in_site == out_site else [in_site, out_site]
    label = f"{'Transcoder' if config.transcoder else 'SAE'} {in_site}{'->' + out_site if config.transcoder else ''}"
    with progress_task(f"Training {label}", total=total_steps, enabled=progress) as task:
        task.update(step)
        epoch, stop = step // steps_per_epoch, False
        while step < total_steps and not stop:
            skip = step - epoch * steps_per_epoch
            for i, batch in enumerate(acts.batches(sites, config.batch_size, seed=config.seed, epoch=epoch)):
                if i < skip:
                    continue
                if step >= total_steps or (max_steps is not None and step >= max_steps):
                    stop = True
                    break
                x = batch[0] * sx
                y = batch[-1] * sy
                for group in opt.param_groups:
                    group["lr"] = rate(step)
                dead = since > dead_tokens
                loss, fvu, indices, values = step_loss(d, x, y, dead if bool(dead.any()) else None, config)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    grad, W = d.W_dec.grad, d.W_dec
                    grad -= (grad * W).sum(1, keepdim=True) * W
                opt.step()
                d.normalize_decoder()
                fired = torch.zeros(config.n_latents, dtype=torch.bool)
                fired[indices[values > 0]] = True
                since += config.batch_size
                since[fired] = 0
                running.append(float(fvu.detach()))
                step += 1
                task.update(step)
                if step % config.eval_every == 0 or step == total_steps:
                    row = evaluate_now()
                    history.append(row)
                    spent = row["seconds"] - elapsed_before
                    eta = spent / max(1, step - first_step) * (total_steps - step)
                    shown = f"held-out FVU {row['heldout_fvu']:.3f}, " if "heldout_fvu" in row else ""
                    task.update(
                        step,
                        description=f"Training {label}: {shown}train FVU {row['train_fvu']:.3f}, "
                        f"dead {100 * row['dead_fraction']:.1f}%, ETA {_fmt_seconds(eta)}",
                    )
                    if on_eval is not None:
                        on_eval(row)
                if ckpt is not None and (step % config.checkpoint_every == 0 or step == total_steps):
                    seconds = elapsed_before + time.monotonic() - started
                    _save_checkpoint(
                        ckpt,
                        d,
                        opt,
                        since,
                        {"step": step, "site": in_site, "config": config_json, "history": history, "seconds": seconds},
                    )
            else:
                epoch += 1
                continue
    seconds = elapsed_before + time.monotonic() - started
    _fold(d, sx, sy)
    training = {
        **config_json,
        "lr": lr,
        "dead_tokens": dead_tokens,
        "steps": step,
        "tokens_seen": step * config.batch_size,
        "harvest_tokens": acts.n_tokens,
        "seconds": round(seconds, 2),
        "scale_in": sx,
        "scale_out": sy,
        "history": history,
        "finished": step >= total_steps,
    }
    d.card = card.replace(training=training)
    return TrainResult(d, history, seconds, step, step * config.batch_size)
