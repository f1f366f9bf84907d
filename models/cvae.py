"""Conditional VAE over embeddings (sizes of the DP-CVAE reference: 3 x 256 hidden, 100-d latent)."""
from __future__ import annotations

import torch
from torch import nn


def one_hot(y: torch.Tensor, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """F.one_hot without its data-dependent range check, so that it works under torch.func.vmap."""
    return (y.unsqueeze(-1) == torch.arange(n_classes, device=y.device)).to(dtype)


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU, **act_kwargs) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation(**act_kwargs))
    return nn.Sequential(*layers)


class CVAE(nn.Module):
    """q(z | x, y) and p(x | z, y); labels enter as one-hot vectors. The decoder output is linear:
    embeddings are modelled on their own scale (no per-client min-max scaling, which would leak
    single-record extremes)."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 256, latent: int = 100, depth: int = 3):
        super().__init__()
        self.n_classes, self.latent = n_classes, latent
        self.encoder = mlp([dim + n_classes, *[hidden] * depth, 2 * latent])
        self.decoder = mlp([latent + n_classes, *[hidden] * depth, dim])

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(torch.cat([x, one_hot(y, self.n_classes, x.dtype)], dim=-1))
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, one_hot(y, self.n_classes, z.dtype)], dim=-1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """eps ~ N(0, I) is an input, so that the loss is a deterministic function of its inputs
        (per-sample gradients under vmap, reproducible noise from an explicit generator)."""
        mu, logvar = self.encode(x, y)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z, y), mu, logvar


    def per_sample_loss(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, beta: float) -> torch.Tensor:
        """MSE (mean over features) + beta * KL(q || N(0, I)) (sum over latent dims), per sample.
        Averaged over the batch by the caller; the reference summed the KL over the batch (an
        effective beta of ~26)."""
        recon, mu, logvar = self(x, y, eps)
        mse = (recon - x).pow(2).mean(-1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
        return mse + beta * kl
