"""Where a model came from: the source, the weights file and its hash, stamped on every result."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmatlas.model.handle import Model


def weights_fingerprint(module) -> str:
    """Short SHA-256 over a sample of every parameter (first and last 64 values of each, in order).

    Cheap (no full pass over the weights) and different for any two checkpoints that
    differ in practice; used where a model has no weights file to hash (tiny or
    in-memory models).
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in module.named_parameters():
            flat = param.detach().reshape(-1)
            sample = torch.cat([flat[:64], flat[-64:]]).float().cpu()
            digest.update(name.encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``block``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Provenance:
    """Where a model came from, stamped on every result."""

    source: str
    file: str | None = None  # the weights file hashed (a .gguf or the first safetensors shard)
    revision: str | None = None
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str | None:
        """SHA-256 of ``file`` (computed once, on first use)."""
        if self._sha256 is None and self.file:
            self._sha256 = sha256_file(self.file)
        return self._sha256


#: The card fields that say which model a file was made for: family, sizes and the weights.
IDENTITY = ("model_type", "layers", "query_heads", "kv_heads", "neurons_per_layer", "vocab")


def identity(model: "Model") -> dict[str, Any]:
    """What a file lmatlas writes records of its model: the card's :data:`IDENTITY` fields, the source,
    the weights file's SHA-256 and a weights fingerprint (:func:`weights_fingerprint`)."""
    card = model.card()
    return {
        "source": card.get("source"),
        **{key: card.get(key) for key in IDENTITY},
        "file_sha256": card.get("file_sha256"),
        "weights": weights_fingerprint(model.hf),
    }


def differences(recorded: dict[str, Any], model: "Model") -> dict[str, tuple[Any, Any]]:
    """``{field: (recorded, this model's)}`` for every identity field that differs (see :func:`card_differences`)."""
    return card_differences(recorded, identity(model))


def card_differences(recorded: dict[str, Any], mine: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (recorded, mine)}`` for every identity field of two model records that differs.

    A field either side lacks is not compared (older files record fewer). The weights are
    compared by the file's SHA-256 when both sides have one (the same checkpoint in another
    dtype is the same model), else by the weights fingerprint when both have one (in-memory
    and tiny models).
    """
    out = {
        key: (recorded[key], mine[key])
        for key in IDENTITY
        if recorded.get(key) is not None and mine.get(key) is not None and recorded[key] != mine[key]
    }
    if recorded.get("file_sha256") and mine.get("file_sha256"):
        if recorded["file_sha256"] != mine["file_sha256"]:
            out["file_sha256"] = (recorded["file_sha256"][:12], mine["file_sha256"][:12])
    elif recorded.get("weights") and mine.get("weights") and recorded["weights"] != mine["weights"]:
        out["weights"] = (recorded["weights"], mine["weights"])
    return out


def check_made_for(recorded: dict[str, Any], model: "Model", what: str, error: type[Exception], fix: str) -> None:
    """Refuse a file made for another model: ``what`` names the file, ``fix`` says what to do instead.

    The one check behind atlases, edits, draft heads and the explorer (see :func:`differences`).
    """
    mismatch = differences(recorded, model)
    if mismatch:
        raise error(
            f"{what} was made for another model ({recorded.get('source')!r}, not {model.provenance.source!r}; "
            f"differences, recorded vs this model: {mismatch}): {fix}"
        )
