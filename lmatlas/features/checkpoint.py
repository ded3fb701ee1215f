"""A training run's checkpoint: ``state.safetensors`` (parameters, Adam's moments, dead-latent counters) + ``state.json``.

Never pickle: tensors go through safetensors, the rest through JSON. The tensor file is
written to a temporary name and renamed, so an interrupted write leaves the old checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmatlas.features.dictionary import Dictionary


def _params(d: Dictionary) -> dict[str, torch.nn.Parameter]:
    return dict(d.named_parameters())


def save_checkpoint(path: Path, d: Dictionary, opt: torch.optim.Adam, since: torch.Tensor, state: dict) -> None:
    """Write ``d``'s parameters, Adam's moments and ``since`` ``[n_latents]`` to ``path/state.safetensors``, ``state`` to ``path/state.json``."""
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


def load_checkpoint(path: Path, d: Dictionary, opt: torch.optim.Adam) -> tuple[torch.Tensor, dict]:
    """Restore what :func:`save_checkpoint` wrote into ``d`` and ``opt``: ``(since [n_latents], state)``."""
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
