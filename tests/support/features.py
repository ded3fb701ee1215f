"""A tiny TopK sparse autoencoder for the feature-site tests (seeded, no training)."""

from __future__ import annotations

import torch


class TinyTopK(torch.nn.Module):
    """A random TopK SAE of the dictionary interface: ``encode [..., d_in] -> [..., n_latents]``, ``decode``."""

    def __init__(self, d_in: int, n_latents: int, k: int, seed: int = 0, d_out: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n_latents, self.k, self.d_in = n_latents, k, d_in
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, n_latents, generator=g) / d_in**0.5)
        self.b_enc = torch.nn.Parameter(torch.randn(n_latents, generator=g) * 0.1)
        self.W_dec = torch.nn.Parameter(torch.randn(n_latents, d_out or d_in, generator=g) / n_latents**0.5)
        self.b_dec = torch.nn.Parameter(torch.randn(d_out or d_in, generator=g) * 0.1)

    def encode(self, x):
        pre = torch.relu(x @ self.W_enc + self.b_enc)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec
