"""Well-conditioned one-shot DP statistics of embeddings, released in two stages by each client and
pooled by the server (federated/methods/dpgauss.py).

Stage 1, the centre. Each record's direction u = x / |x| (unit norm: no radius to choose) and its
clipped log-norm l = clip(log |x|, -L, L) / L. A client releases [sum u, count, sum l] + Gaussian noise
(one record moves it by at most sqrt(3) in L2). Pooled: the DP mean direction mu and mean log-norm.

Stage 2, the class statistics, centred and clipped to the spread. v = (u - mu) / r, clipped to |v| <= 1,
with r = k * sqrt(1 - |mu|^2): for unit vectors E|u - mu|^2 = 1 - |mu|^2, so the spread is a DP
estimate from stage 1 and k a dimensionless flag (no radius fitted to a database). A client releases
per class [sum v, a count, b sum l] and m times the second moment sum v v^T, + Gaussian noise (one record
moves its class row by sqrt(1 + a^2 + b^2) and the second moment by m: sensitivity sqrt(1 + a^2 + b^2 + m^2),
2 with the default weights a = b = m = 1). The weights (PartWeights) say where the noise goes: a part released
at weight w carries noise std / w once the server divides it out, so a small count weight spends little of
the budget on counts, which are large, and leaves more for the class sums, whose signal per coordinate is
small. b = 0 releases no class log-norms (each class takes the centre's). Pooled over the clients, before
any use.

From the pooled sums: class means, a shared within-class covariance and (DP-PCA, post-processing of the
noisy second moment) its top directions. The noise is isotropic over all D dimensions while the class
signal lives in a few, so the low-rank model projects the class means onto the top directions too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

CENTRE_SENSITIVITY = math.sqrt(3.0)  # L2 change of centre_sums when one record leaves (see above)


@dataclass(frozen=True)
class PartWeights:
    """Scales of the class statistics' parts inside their release (see above); the class sums' is 1."""
    count: float = 1.0
    norm: float = 1.0    # 0: no class log-norms are released
    moment: float = 1.0

    def __post_init__(self) -> None:
        if self.count <= 0 or self.moment <= 0 or self.norm < 0:
            raise ValueError(f"part weights must be > 0 (count, moment) and >= 0 (norm), got {self}")

    @property
    def sensitivity(self) -> float:
        """L2 change of class_sums when one record leaves."""
        return math.sqrt(1.0 + self.count ** 2 + self.norm ** 2 + self.moment ** 2)


def log_norms(x: torch.Tensor, log_range: float) -> torch.Tensor:
    """clip(log |x|, -L, L) / L, in [-1, 1]."""
    return x.double().norm(dim=1).clamp(min=1e-300).log().clamp(-log_range, log_range) / log_range


def centre_sums(x: torch.Tensor, log_range: float) -> torch.Tensor:
    """(D + 2,): sum of unit directions, count, sum of clipped log-norms / L."""
    u = F.normalize(x.double(), dim=1)
    count = torch.tensor([float(len(x))], dtype=torch.float64, device=x.device)
    return torch.cat([u.sum(0), count, log_norms(x, log_range).sum(0, keepdim=True)])


@dataclass
class Centre:
    mean: torch.Tensor      # (D,) DP mean of the unit directions (|mean| <= 1)
    log_norm: float         # DP mean log-norm of the embeddings
    radius: float           # clip radius of u - mean: k * the DP spread

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "log_norm": torch.tensor([self.log_norm]), "radius": torch.tensor([self.radius])}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Centre:
        return cls(state["mean"].double(), float(state["log_norm"]), float(state["radius"]))


def centre_of(pooled: torch.Tensor, log_range: float, clip_spread: float) -> Centre:
    d = len(pooled) - 2
    n = float(pooled[d].clamp(min=1.0))
    mean = pooled[:d].double() / n
    mean = mean / max(float(mean.norm()), 1.0)  # a mean of unit vectors lies in the unit ball
    spread = math.sqrt(max(1.0 - float(mean.norm()) ** 2, 1e-6))
    return Centre(mean, log_range * float(pooled[d + 1]) / n, clip_spread * spread)


def centred(x: torch.Tensor, centre: Centre) -> torch.Tensor:
    """v = (x / |x| - mean) / radius, clipped to the unit ball."""
    v = (F.normalize(x.double(), dim=1) - centre.mean.to(x.device)) / centre.radius
    return v / v.norm(dim=1, keepdim=True).clamp(min=1.0)


def class_sums(x: torch.Tensor, y: torch.Tensor, centre: Centre, n_classes: int, log_range: float,
               weights: PartWeights = PartWeights()) -> torch.Tensor:
    """(K (D + 2) + D^2,): per class [sum v, a count, b sum of clipped log-norms / L], then m times the
    second moment sum v v^T (a, b, m: the weights)."""
    v = centred(x, centre)
    rows = torch.cat([v, torch.full((len(v), 1), weights.count, dtype=v.dtype, device=v.device),
                      weights.norm * log_norms(x, log_range)[:, None]], dim=1)
    per_class = torch.zeros(n_classes, rows.shape[1], dtype=v.dtype, device=v.device).index_add_(0, y, rows)
    return torch.cat([per_class.flatten(), weights.moment * (v.T @ v).flatten()])


def class_sums_size(n_classes: int, dim: int) -> int:
    return n_classes * (dim + 2) + dim * dim


@dataclass
class ClassGaussians:
    """Class-conditional Gaussians over v with a shared covariance: v = mean_c + basis @ (chol @ z)
    + residual * (I - basis basis^T) z' (low rank), or v = mean_c + sqrt(diag) * z (diagonal)."""
    means: torch.Tensor     # (K, D) the model's class means
    class_means: torch.Tensor  # (K, D) the pooled DP class means, before any projection
    counts: torch.Tensor    # (K,) noisy
    log_norms: torch.Tensor  # (K,) each class's DP mean log-norm
    basis: torch.Tensor     # (D, k); k = 0 for the diagonal model
    chol: torch.Tensor      # (k, k) Cholesky factor of the covariance inside the basis
    scale: torch.Tensor     # (D,) the diagonal model's std per dimension, or the residual std (all equal)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in FIELDS}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> ClassGaussians:
        return cls(**{k: state[k].double() for k in FIELDS})

    def covariance(self) -> torch.Tensor:
        """The shared within-class covariance that `sample` draws from (D, D)."""
        d, k = self.means.shape[1], self.basis.shape[1]
        if k == 0:
            return torch.diag(self.scale.pow(2))
        rest = torch.eye(d, dtype=self.basis.dtype) - self.basis @ self.basis.T
        return self.basis @ self.chol @ self.chol.T @ self.basis.T + self.scale[:, None] * rest * self.scale[None, :]

    def variance(self) -> torch.Tensor:
        """The within-class variance per coordinate, trace(covariance()) / D, without forming the D x D
        matrix (the low-rank model's residual std is the same in every dimension)."""
        d, k = self.means.shape[1], self.basis.shape[1]
        if k == 0:
            return self.scale.pow(2).mean()
        return (self.chol.pow(2).sum() + self.scale.pow(2).sum() * (d - k) / d) / d

    def sample(self, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        d, k = self.means.shape[1], self.basis.shape[1]
        z = torch.randn(len(y), d, generator=gen, dtype=torch.float64)
        if k == 0:
            return self.means[y.cpu()] + self.scale * z
        inside = torch.randn(len(y), k, generator=gen, dtype=torch.float64) @ self.chol.T @ self.basis.T
        if k == d:  # an orthonormal basis of every direction leaves no rest (z is drawn all the same: one stream)
            return self.means[y.cpu()] + inside
        rest = self.scale * (z - (z @ self.basis) @ self.basis.T)
        return self.means[y.cpu()] + inside + rest


FIELDS = ("means", "class_means", "counts", "log_norms", "basis", "chol", "scale")


def class_gaussians(pooled: torch.Tensor, n_classes: int, dim: int, covariance: str, pca_dims: int,
                    log_range: float, centre: Centre, weights: PartWeights = PartWeights()) -> ClassGaussians:
    """The model of the pooled (noisy) class_sums released at these weights (a class with a noisy count
    under 1, or every class if no log-norms were released, takes the centre's log-norm)."""
    per_class = pooled[:n_classes * (dim + 2)].reshape(n_classes, dim + 2).double()
    second = pooled[n_classes * (dim + 2):].reshape(dim, dim).double() / weights.moment
    second = (second + second.T) / 2
    counts = per_class[:, dim] / weights.count
    n_c = counts.clamp(min=1.0)
    released = counts >= 1 if weights.norm > 0 else torch.zeros_like(counts, dtype=torch.bool)
    log_norms = torch.where(released, log_range * per_class[:, dim + 1] / max(weights.norm, 1e-300) / n_c,
                            centre.log_norm)
    means = class_means = per_class[:, :dim] / n_c[:, None]
    total = float(counts.clamp(min=0).sum().clamp(min=1.0))
    within = (second - (per_class[:, :dim].T / n_c) @ per_class[:, :dim]) / max(total - n_classes, 1.0)
    within = (within + within.T) / 2
    if covariance == "diagonal":
        empty = torch.zeros(dim, 0, dtype=torch.float64)
        return ClassGaussians(means, class_means, counts, log_norms, empty, torch.zeros(0, 0, dtype=torch.float64),
                              within.diagonal().clamp(min=0).sqrt())
    k = min(pca_dims, dim)
    _, vectors = torch.linalg.eigh(second / total)  # DP-PCA: top directions of the noisy second moment
    basis = vectors[:, -k:].flip(1)
    means = means @ basis @ basis.T  # the class signal lies in the top directions; the noise does not
    inside = basis.T @ within @ basis
    values, rot = torch.linalg.eigh((inside + inside.T) / 2)
    chol = rot * values.clamp(min=0).sqrt()  # a square root of the PSD part: chol @ chol.T
    residual = (within.trace() - inside.trace()).clamp(min=0) / max(dim - k, 1)
    return ClassGaussians(means, class_means, counts, log_norms, basis, chol, residual.sqrt().expand(dim).clone())


def release_quality(model: ClassGaussians, sum_noise_std: float) -> dict[str, list[float]]:
    """What each class's DP mean is worth, from the released statistics alone (post-processing), so that a
    researcher sees on their own data whether the release carries class information at all.
    sum_noise_std: the noise std per coordinate of a pooled class sum (sqrt(releasing clients) x sigma x
    sensitivity). With tau_c = sum_noise_std / n_c the noise std per coordinate of class c's DP mean and s^2
    the model's within-class variance per coordinate:
    - effective_records: how many real records' own mean would be as accurate per coordinate,
      s^2 / (s^2 / n_c + tau_c^2) (n_c itself without noise);
    - signal_to_noise: the squared norm of the model's class mean beyond its expected noise (k tau_c^2 in
      a k-direction basis, D tau_c^2 for the diagonal model), over that noise (None without noise).
    Its noise scales as D x clients x sigma^2 / n_c^2, so few records per class in many dimensions leave
    little even where the budget is large."""
    n_c = model.counts.clamp(min=1.0)
    dim, k = model.means.shape[1], model.basis.shape[1]
    within = model.variance()
    tau2 = (sum_noise_std / n_c) ** 2
    effective = within / (within / n_c + tau2)
    quality = {"effective_records": effective.tolist(), "signal_to_noise": None}
    if sum_noise_std > 0:
        noise = (k if k else dim) * tau2
        quality["signal_to_noise"] = ((model.means.pow(2).sum(1) - noise).clamp(min=0) / noise).tolist()
    return quality


def local_gaussians(x: torch.Tensor, y: torch.Tensor, centre: Centre, model: ClassGaussians, dims: int, *,
                    pool_means: bool = False, shared_weight: float = 0.0) -> ClassGaussians:
    """A client's own model for the synthetic records it trains on (it never leaves the client): the
    pooled DP class means projected on the top `dims` directions of its own centred data v, with its own
    within-class covariance (full rank). Its real data estimate the shape of the classes far better than
    the noisy shared second moment can; the DP means carry what it lacks, the classes it has few of.
    pool_means: each class's mean is the DP mean and the client's own mean weighted by their inverse
    per-coordinate variances: the own mean's is its within-class variance / its count, the DP mean's noise
    is estimated from its part outside the top directions (where the class signal is small and the noise,
    isotropic, is not).
    shared_weight: the covariance is (1 - w) x the client's own + w x the shared DP one (shrinkage towards
    the federation's shape where the client's own estimate is poor: few records, missing classes)."""
    v = centred(x, centre).cpu()
    y = y.cpu()
    n_classes, dim = model.class_means.shape
    counts = torch.bincount(y, minlength=n_classes)
    local = torch.zeros(n_classes, dim, dtype=torch.float64).index_add_(0, y, v) / counts.clamp(min=1)[:, None]
    residual = v - local[y]
    within = residual.T @ residual / max(len(v) - int((counts > 0).sum()), 1)
    _, vectors = torch.linalg.eigh(v.T @ v)
    top = vectors[:, -min(dims, dim):]
    means = model.class_means
    if pool_means:  # inverse-variance weights of the DP mean and the client's own mean, per class
        noise_var = (means - means @ top @ top.T).pow(2).sum(1) / max(dim - top.shape[1], 1)
        own_var = within.trace() / dim / counts.clamp(min=1)
        w_dp, w_own = 1 / noise_var.clamp(min=1e-12), torch.where(counts > 0, 1 / own_var.clamp(min=1e-12), 0.0)
        means = (w_dp[:, None] * means + w_own[:, None] * local) / (w_dp + w_own)[:, None]
    if shared_weight:
        within = (1 - shared_weight) * within + shared_weight * model.covariance()
    values, rot = torch.linalg.eigh((within + within.T) / 2)
    return ClassGaussians(means @ top @ top.T, model.class_means, model.counts, model.log_norms, rot,
                          torch.diag(values.clamp(min=0).sqrt()), torch.zeros(dim, dtype=torch.float64))


def embeddings(v: torch.Tensor, y: torch.Tensor, centre: Centre, model: ClassGaussians) -> torch.Tensor:
    """Back from v to the embedding space: direction mean + radius v, scaled to its class's DP mean norm."""
    u = F.normalize(centre.mean + centre.radius * v, dim=1)
    return (u * model.log_norms[y.cpu()].exp()[:, None]).float()
