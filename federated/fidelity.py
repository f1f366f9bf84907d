"""How faithful synthetic embeddings are to real held-out ones: precision / recall / density / coverage
(Naeem et al. 2020, as the `prdc` package defines them), unbiased Gaussian-kernel MMD^2 and the Frechet distance,
overall and per class, plus a 2-D projection for plots.

Pairwise-distance metrics are quadratic in the sample size, so each side is subsampled (seeded) to
at most `max_samples` overall and `max_per_class` per class; the sizes used are reported. Per pair, one
distance matrix of the pooled samples (float32, as the embeddings) serves the bandwidth, MMD and PRDC;
sums that cancel (MMD^2, the Frechet distance) are taken in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from data.flags import setting


@dataclass(frozen=True)
class ReleaseEvalConfig:
    """Fidelity and membership-audit settings of an anonymizer run (federated.audit uses the last two)."""
    enabled: bool = setting(True, "skip the fidelity metrics, TSTR and membership audit of the synthetic data",
                            flag="--no-release-eval")
    max_samples: int = setting(2000, "samples per side for the overall fidelity metrics and per attack set",
                               flag="--eval-max-samples", metavar="N", minimum=2)
    max_per_class: int = setting(500, "samples per side and class for the per-class fidelity metrics",
                                 flag="--eval-max-per-class", metavar="N", minimum=2)
    nearest_k: int = setting(5, "k of precision / recall / density / coverage", flag="--eval-nearest-k", metavar="K",
                             minimum=1)
    projection_per_class: int = setting(50, "points per class and side kept for the 2-D projection picture",
                                        flag="--eval-projection-per-class", metavar="N", minimum=0)
    density_dims: int = setting(16, "whitened PCA dimensions of the density-ratio (DOMIAS) attack's KDEs",
                                flag="--audit-density-dims", metavar="D", minimum=1)


def subsample(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """At most k of range(n), uniformly without replacement, in increasing order."""
    if n <= k:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:k].sort().values


def sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_i - y_j|^2 in x's dtype, as one matrix product (|x|^2 + |y|^2 - 2 x.y, clamped at 0): the
    quadratic pass is BLAS's, with no square roots over the whole matrix."""
    return torch.addmm(x.pow(2).sum(1, keepdim=True), x, y.T, alpha=-2).add_(y.pow(2).sum(1)).clamp_(min=0)


def pooled_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances within and between two samples (in their dtype): every pairwise metric of a pair
    reads its blocks, so the quadratic pass is made once."""
    pooled = torch.cat([x, y])
    return sq_distances(pooled, pooled).fill_diagonal_(0.0).sqrt_()


def median_bandwidth(d: torch.Tensor) -> float:
    """The median heuristic: the (lower) median pairwise distance of the pooled samples, as torch.median.
    Read off the whole symmetric matrix, with no copy of its upper triangle: after the n zeros of the
    diagonal, every distance of the triangle appears twice, so its k-th smallest is the (n + 2k)-th
    (numpy's introselect: the same value as torch's kthvalue, in half its time)."""
    n = len(d)
    k = (n * (n - 1) // 2 + 1) // 2
    return float(np.partition(d.reshape(-1).numpy(), n + 2 * k - 1)[n + 2 * k - 1])


def gaussian_gram(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """k(a_i, b_j) = exp(-|a_i - b_j|^2 / (2 h^2))."""
    return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth ** 2))


def mmd2_of_gram(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> float:
    """Unbiased MMD^2 from the Gram blocks (Gretton et al. 2012, Eq. 3)."""
    n, m = len(kxx), len(kyy)
    if n < 2 or m < 2:
        return float("nan")
    def total(k):  # float64 sums: MMD^2 is a small difference of large ones
        return k.sum(dtype=torch.float64)
    return float((total(kxx) - kxx.diagonal().sum(dtype=torch.float64)) / (n * (n - 1))
                 + (total(kyy) - kyy.diagonal().sum(dtype=torch.float64)) / (m * (m - 1)) - 2 * total(kxy) / kxy.numel())


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """Unbiased MMD^2 under kernel(a, b) -> Gram matrix, in float64."""
    x, y = x.double(), y.double()
    return mmd2_of_gram(kernel(x, x), kernel(y, y), kernel(x, y))


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2)) of the Gaussians fitted to x and y, in float64.
    With X, Y the centred samples, S_x S_y has the eigenvalues of (X Y^T)(X Y^T)^T / ((n_x - 1)(n_y - 1)), so
    tr (S_x S_y)^(1/2) is the sum of the singular values of X Y^T, equally of R_x R_y^T for X = Q_x R_x and
    Y = Q_y R_y: one small decomposition per pair, and no covariance is squared."""
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    a, b = x.double(), y.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    a_c, b_c = a - mean_a, b - mean_b
    r_a, r_b = torch.linalg.qr(a_c, mode="r").R, torch.linalg.qr(b_c, mode="r").R
    cross = torch.linalg.svdvals(r_a @ r_b.T).sum() / math.sqrt((len(a) - 1) * (len(b) - 1))
    diff = mean_a - mean_b
    return float(diff @ diff + a_c.pow(2).sum() / (len(a) - 1) + b_c.pow(2).sum() / (len(b) - 1) - 2 * cross)


def prdc_metrics(real: torch.Tensor, fake: torch.Tensor, nearest_k: int, d: torch.Tensor | None = None) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) as the `prdc` package defines them (its
    compute_prdc is the reference of the tests), from the pooled distance matrix d (computed if not given)."""
    n = len(real)
    if min(n, len(fake)) < nearest_k + 2:  # k-th neighbour radii need k + 1 records besides the point itself
        return {k: float("nan") for k in ("precision", "recall", "density", "coverage")}
    d = pooled_distances(real, fake) if d is None else d
    # the (k+1)-th smallest per row (the point itself is the first): topk's last, the same value as kthvalue's,
    # ~8x faster for small k
    real_radii = d[:n, :n].topk(nearest_k + 1, dim=1, largest=False).values[:, -1]
    fake_radii = d[n:, n:].topk(nearest_k + 1, dim=1, largest=False).values[:, -1]
    cross = d[:n, n:]
    inside_real = cross < real_radii[:, None]
    return {"precision": float(inside_real.any(0).double().mean()),
            "recall": float((cross < fake_radii[None]).any(1).double().mean()),
            "density": float(inside_real.sum(0).double().mean() / nearest_k),
            "coverage": float((cross.min(1).values < real_radii).double().mean())}


def compare(real: torch.Tensor, fake: torch.Tensor, nearest_k: int) -> dict[str, float]:
    """Every fidelity metric between two samples (CPU tensors), the pairwise ones from one distance matrix."""
    d, n = pooled_distances(real, fake), len(real)
    h = median_bandwidth(d)
    gram = d.pow(2).div_(-2 * h ** 2).exp_()
    return {**prdc_metrics(real, fake, nearest_k, d), "mmd2": mmd2_of_gram(gram[:n, :n], gram[n:, n:], gram[:n, n:]),
            "mmd_bandwidth": h,
            "frechet": frechet_distance(real, fake), "n_real": len(real), "n_synthetic": len(fake)}


def projection(real: torch.Tensor, real_y: torch.Tensor, fake: torch.Tensor, fake_y: torch.Tensor,
               per_class: int, gen: torch.Generator) -> dict:
    """2-D PCA coordinates (axes fitted on the real sample) of up to per_class points per class and side."""
    mean = real.double().mean(0)
    _, _, v = torch.linalg.svd(real.double() - mean, full_matrices=False)
    axes = v[:2].T

    def keep(x, y):
        idx = torch.cat([torch.nonzero(y == c).squeeze(1)[subsample(int((y == c).sum()), per_class, gen)]
                         for c in torch.unique(y)]) if len(y) else torch.zeros(0, dtype=torch.long)
        xy = ((x[idx].double() - mean) @ axes).numpy().round(4)
        return {"xy": xy.tolist(), "y": y[idx].tolist()}
    return {"real": keep(real, real_y), "synthetic": keep(fake, fake_y)}


def fidelity_report(real: torch.Tensor, real_y: torch.Tensor, fake: torch.Tensor, fake_y: torch.Tensor,
                    n_classes: int, cfg: ReleaseEvalConfig, gen: torch.Generator) -> dict:
    """Overall and per-class metrics of synthetic (fake) against real held-out embeddings."""
    real, real_y, fake, fake_y = real.cpu().float(), real_y.cpu(), fake.cpu().float(), fake_y.cpu()
    r, f = subsample(len(real), cfg.max_samples, gen), subsample(len(fake), cfg.max_samples, gen)
    per_class = []
    for c in range(n_classes):
        xr, xf = real[real_y == c], fake[fake_y == c]
        if len(xr) == 0 or len(xf) == 0:
            continue
        xr = xr[subsample(len(xr), cfg.max_per_class, gen)]
        xf = xf[subsample(len(xf), cfg.max_per_class, gen)]
        per_class.append({"class": c, **compare(xr, xf, cfg.nearest_k)})
    return {"overall": compare(real[r], fake[f], cfg.nearest_k), "per_class": per_class,
            "projection": projection(real, real_y, fake, fake_y, cfg.projection_per_class, gen)}
