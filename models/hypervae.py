"""FedHypeVAE's modules (Gupta et al.): a shared hypernetwork that generates each client's decoder
(row-scaled, Eq. 3) and class-conditional prior (Eq. 4) from a private client code v_i.

Every layer that holds a trainable parameter is an nn.Linear, a RowBias or a RowParameter applied once
per forward with rows grouped by sample, so that per-sample gradients of the whole objective (encoder,
code and hypernetwork together) can be clipped exactly by federated.privacy.clipped_grad_sum.
"""
from __future__ import annotations

import torch
from torch import nn

from models.cvae import mlp, one_hot
from models.stacked import Stacked


class RowParameter(nn.Module):
    """A learnable vector (the client code v_i) broadcast to n rows."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, n: int) -> torch.Tensor:
        return self.weight.expand(n, -1)

    @staticmethod
    def stack(copies: list[RowParameter]) -> StackedRowParameter:
        return StackedRowParameter(torch.stack([c.weight.detach() for c in copies]))


class StackedRowParameter(Stacked):
    """K RowParameters (models.stacked): weight (K, dim), broadcast to (K, n, dim)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, n: int) -> torch.Tensor:
        weight = self.first(self.weight)
        return weight.unsqueeze(1).expand(-1, n, -1)


class RowBias(nn.Module):
    """x + b, the base bias b_l of a generated layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias

    @staticmethod
    def stack(copies: list[RowBias]) -> StackedRowBias:
        return StackedRowBias(torch.stack([c.bias.detach() for c in copies]))


class StackedRowBias(Stacked):
    """K RowBiases (models.stacked): x (K, rows, dim) + bias (K, dim)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.first(self.bias).unsqueeze(1)


class SquaredDistance(torch.autograd.Function):
    """|a - b|^2 over the last dimension, broadcast over the others, with autograd's own floats but half
    its backward passes over the broadcast (..., D) differences: the gradient 2 g (a - b) is formed once
    and reduced to each input's shape, the negation applied after the reduction (exact either way). The
    differences are a second, non-differentiable output, kept for the backward."""

    generate_vmap_rule = True  # torch.func (the per-sample-gradient reference) maps it like any function

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = a - b
        return diff.pow(2).sum(-1), diff

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(output[1])
        ctx.shapes = inputs[0].shape, inputs[1].shape
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled (..., D) gradient for the differences

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: None) -> tuple[torch.Tensor, torch.Tensor]:
        (diff,) = ctx.saved_tensors
        scaled = diff * (2 * grad).unsqueeze(-1)  # = grad * (2 diff): doubling is exact
        shape_a, shape_b = ctx.shapes
        return scaled.sum_to_size(shape_a), scaled.sum_to_size(shape_b).neg_()


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidths: tuple[float, ...]) -> torch.Tensor:
    """Multi-kernel Gaussian k(a, b) = mean_s exp(-|a - b|^2 / (2 s D)), broadcast over leading dims;
    bandwidths s are relative to the dimension D (squared distances grow with D)."""
    sq, _ = SquaredDistance.apply(a, b)
    return torch.stack([torch.exp(-sq / (2 * s * a.shape[-1])) for s in bandwidths]).mean(0)


class HyperNetwork(nn.Module):
    """Phi = {Phi_theta, Phi_omega}: base decoder weights W_l, b_l; h_theta(v) -> (d_l, delta b_l);
    h_omega(v) and a label embedding e(y) -> g_omega -> (mu_y, log sigma_y)."""

    def __init__(self, dim: int, n_classes: int, latent: int = 100, hidden: int = 256, depth: int = 3,
                 code_dim: int = 16, hyper_hidden: int = 64, prior_hidden: int = 64, label_dim: int = 16):
        super().__init__()
        self.n_classes, self.latent = n_classes, latent
        sizes = [latent + n_classes, *[hidden] * depth, dim]
        self.rows = sizes[1:]
        self.base = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:]))
        self.base_bias = nn.ModuleList(RowBias(b) for b in self.rows)
        self.h_theta = mlp([code_dim, hyper_hidden, 2 * sum(self.rows)])
        self.h_omega = mlp([code_dim, hyper_hidden, prior_hidden])
        self.label_embedding = nn.Linear(n_classes, label_dim, bias=False)
        self.g_omega = mlp([prior_hidden + label_dim, prior_hidden, 2 * latent])

    def hyper_layers(self) -> list[nn.Linear]:
        """The hypernetwork's own layers (spectral control applies to these)."""
        return [m for net in (self.h_theta, self.h_omega, self.g_omega) for m in net if isinstance(m, nn.Linear)]

    def modulation(self, codes: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Row scales d_l = 1 + h(v) and bias shifts delta b_l for each decoder layer."""
        out = self.h_theta(codes)
        scales, shifts = out.split(sum(self.rows), dim=-1)
        return ([1 + s for s in scales.split(self.rows, dim=-1)], list(shifts.split(self.rows, dim=-1)))

    def decode(self, z: torch.Tensor, y: torch.Tensor, scales: list[torch.Tensor], shifts: list[torch.Tensor]) -> torch.Tensor:
        """x = decoder_{theta(v)}(z, y) with W_l(v) = diag(d_l(v)) W_l, b_l(v) = b_l + delta b_l(v)."""
        h = torch.cat([z, one_hot(y, self.n_classes, z.dtype)], dim=-1)
        for layer, (base, bias) in enumerate(zip(self.base, self.base_bias)):
            h = bias(scales[layer] * base(h)) + shifts[layer]
            if layer < len(self.base) - 1:
                h = torch.relu(h)
        return h

    def prior_features(self, codes: torch.Tensor) -> torch.Tensor:
        return self.h_omega(codes)

    def prior(self, y: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_{v,y}, log var_{v,y}) of p_omega(z | y) from the prior features h_omega(v)."""
        e = self.label_embedding(one_hot(y, self.n_classes, features.dtype))
        mu, log_sigma = self.g_omega(torch.cat([features, e], dim=-1)).chunk(2, dim=-1)
        return mu, 2 * log_sigma


class HyperClient(nn.Module):
    """What one client trains: its encoder psi_i and code v_i (both private) and its copy of Phi."""

    def __init__(self, dim: int, n_classes: int, *, latent: int, hidden: int, code_dim: int, hyper_hidden: int,
                 prior_hidden: int, label_dim: int, depth: int = 3):
        super().__init__()
        self.n_classes = n_classes
        self.encoder = mlp([dim + n_classes, *[hidden] * depth, 2 * latent])
        self.code = RowParameter(code_dim)
        self.hyper = HyperNetwork(dim, n_classes, latent, hidden, depth, code_dim, hyper_hidden, prior_hidden, label_dim)

    def per_sample_loss(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, zeta: torch.Tensor, *,
                        beta: float, lambda_mmd: float, bandwidths: tuple[float, ...]) -> torch.Tensor:
        """-ELBO (Eq. 1, with the hyper-generated prior) + lambda_MMD * MMD^2 (Eq. 6), per sample.

        eps (B, latent) reparameterises q(z|x,y); zeta (B, K, latent) draws K decoded samples from the
        client's own prior with the record's label. The per-record MMD term
        mean_{k != k'} k(xh_k, xh_k') - 2 mean_k k(x, xh_k) involves that record alone, so the
        objective stays a sum over records (what per-sample clipping needs); its mean over records
        is the unbiased class-conditional MMD^2 up to the parameter-free E k(x, x')."""
        b, k = zeta.shape[-3], zeta.shape[-2]   # any leading dimensions: K stacked clients (models.stacked)
        mu_q, logvar_q = self.encoder(torch.cat([x, one_hot(y, self.n_classes, x.dtype)], -1)).chunk(2, -1)
        z = mu_q + torch.exp(0.5 * logvar_q) * eps
        codes = self.code(b)                                 # one row per record
        mu_p, logvar_p = self.hyper.prior(y, self.hyper.prior_features(codes))
        kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1).sum(-1)
        z_prior = mu_p.unsqueeze(-2) + torch.exp(0.5 * logvar_p).unsqueeze(-2) * zeta
        zz = torch.cat([z.unsqueeze(-2), z_prior], -2).flatten(-3, -2)
        scales, shifts = self.hyper.modulation(codes)          # decoder rows: (1 + K) per record
        scales, shifts = ([t.repeat_interleave(1 + k, dim=-2) for t in ts] for ts in (scales, shifts))
        out = self.hyper.decode(zz, y.repeat_interleave(1 + k, dim=-1), scales, shifts).unflatten(-2, (b, 1 + k))
        recon, generated = out[..., 0, :], out[..., 1:, :]
        mse = (recon - x).pow(2).mean(-1)
        kgg = gaussian_kernel(generated.unsqueeze(-2), generated.unsqueeze(-3), bandwidths)   # (B, K, K)
        self_term = (kgg.sum((-2, -1)) - kgg.diagonal(dim1=-2, dim2=-1).sum(-1)) / (k * (k - 1))
        cross = gaussian_kernel(x.unsqueeze(-2), generated, bandwidths).mean(-1)
        return mse + beta * kl + lambda_mmd * (self_term - 2 * cross)
