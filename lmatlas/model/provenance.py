"""Where a model came from: the source, the weights file and its hash, stamped on every result."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path


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
