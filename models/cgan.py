"""Conditional GAN over embeddings (sizes of the DP-CGAN reference)."""
from __future__ import annotations

import torch
from torch import nn

from models.cvae import mlp, one_hot


class Generator(nn.Module):
    def __init__(self, dim: int, n_classes: int, latent: int = 100, hidden: tuple[int, ...] = (512, 1024)):
        super().__init__()
        self.n_classes, self.latent = n_classes, latent
        self.net = mlp([latent + n_classes, *hidden, dim], nn.LeakyReLU, negative_slope=0.2)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, one_hot(y, self.n_classes, z.dtype)], dim=-1))


class Discriminator(nn.Module):
    """Outputs logits; the BCE is taken with logits (the reference's sigmoid + BCE, stably)."""

    def __init__(self, dim: int, n_classes: int, hidden: tuple[int, ...] = (1024, 512)):
        super().__init__()
        self.n_classes = n_classes
        self.net = mlp([dim + n_classes, *hidden, 1], nn.LeakyReLU, negative_slope=0.2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, one_hot(y, self.n_classes, x.dtype)], dim=-1)).squeeze(-1)
