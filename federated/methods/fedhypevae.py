"""FedHypeVAE (Gupta et al., Algorithm 1, Eqs. 1-13) in the anonymizer round loop.

Client i trains its encoder psi_i and code v_i (private, never sent) and a copy of the shared
hypernetwork Phi on -ELBO (hyper-generated prior) + lambda_MMD MMD^2 + lambda_v |v_i|^2 + lambda_Lip
R_Lip, with |v_i| <= r projected after every step. Each step is DP-SGD over the joint per-record
gradient of (psi_i, v_i, Phi): the paper privatises only grad_Phi, but psi_i and v_i are functions
of the data that shape grad_Phi, so leaving their updates unprivatised would void the guarantee.
The regularisers involve no record and get their exact gradient. Per round the client sends only
the change of its Phi copy, i.e. the (learning-rate scaled) sum of its privatised Phi gradients;
the server applies the n-weighted average (Eq. 10) and projects the hypernetwork's layers to
spectral norm <= 1 (Lipschitz control besides R_Lip).

After training, every client releases DP-noisy per-class sums of clipped embeddings, their squares
and counts (Gaussian mechanism, accounted in the same budget); the server fits a neutral meta-code
v_o, or a mixture of K codes (Eq. 13), matching those class means and (diagonal) variances (Eq. 11),
and the clients synthesise x ~ p_theta_o(x | z, y), z ~ p_omega_o(z | y) (Eq. 12).

--meta-targets dpstats replaces those targets with DP-Gauss's well-conditioned statistics
(federated/dpstats.py): the raw sums are clipped at a radius around the norms (~40 for ViT-S/14) while the
classes differ by far less, so their noise buries the class means. Instead each client releases a DP centre,
then class sums centred on the pooled centre and clipped to a multiple of its DP spread; the server pools
them into the low-rank DP class model and fits the meta-code to that model's class means and variances.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from data.flags import setting
from federated import dpstats
from data.io import UserError
from federated.clients import make_generator
from federated.methods.anonymizer import Anonymizer
from federated.methods.dpcvae import DPCVAEConfig
from federated.methods.base import INIT, META, SERVER, RunContext
from federated.training import OPTIMIZERS, OptimConfig, make_optimizer
from models import count_parameters
from models.hypervae import HyperClient, HyperNetwork
from models.init import init_linear_layers_


@dataclass(frozen=True)
class FedHypeVAEConfig(DPCVAEConfig):  # the CVAE's width, latent size and KL weight are DP-CVAE's flags
    # dp-tuned: DP-CVAE's dp-tuned plan with Adam on the hypernetwork, and the meta-code fitted on DP-Gauss's
    # statistics, chosen on the tuning split (--split-seed 7, alpha 0.3, epsilon 1) by the clients' mean
    # validation BACC over two seeds (experiments/organamnist/tune_fedhypevae.sh;
    # assets/results_organamnist/tuning/fedhypevae_ranking.json): dpstats at --stats-noise 5 gave 82.96, dpstats at
    # 20 82.91, the papers' sums 82.59 (TSTR 9-13 % throughout: the meta-code cannot steer a DP-trained decoder).
    PRESETS: ClassVar[dict] = {
        "dp-tuned": {"rounds": 10, "gen_local_epochs": 1, "gen_batch_size": 1024, "gen_lr": 3e-3,
                     "privacy_max_grad_norm": 0.5, "hyper_optimizer": "adam", "hyper_lr": 3e-3,
                     "meta_targets": "dpstats", "stats_noise": 5.0, "downstream_recipe": "balanced"}}

    code_dim: int = setting(16, "client code dimension d_v", metavar="D", minimum=1)
    code_radius: float = setting(5.0, "bound r on |v_i| (projected after each step)", metavar="R")
    hyper_hidden: int = setting(64, "hypernetwork hidden width (h_theta, h_omega)", metavar="N", minimum=1)
    prior_hidden: int = setting(64, "prior network width (h_omega output, g_omega)", metavar="N", minimum=1)
    label_dim: int = setting(16, "label embedding e(y) dimension", metavar="D", minimum=1)
    hyper_lr: float = setting(1e-3, "learning rate of the hypernetwork (eta_Phi)", metavar="LR")
    hyper_optimizer: str = setting("sgd", "each client's optimiser of its hypernetwork copy (the paper: SGD)",
                                   choices=OPTIMIZERS)
    lambda_mmd: float = setting(0.1, "weight of the MMD alignment term", metavar="W", minimum=0)
    lambda_lip: float = setting(1e-3, "weight of R_Lip (squared spectral norms)", metavar="W", minimum=0)
    lambda_v: float = setting(1e-3, "weight of |v_i|^2", metavar="W", minimum=0)
    mmd_bandwidths: tuple[float, ...] = setting((0.5, 1.0, 2.0, 4.0), "Gaussian kernel bandwidths s "
                                                "(k = exp(-|a-b|^2 / (2 s D)), comma-separated)", metavar="S,S,..")
    mmd_samples: int = setting(4, "decoded prior samples per record for the MMD", metavar="N", minimum=1)
    spectral_norm: bool = setting(True, "skip the server's spectral-norm projection of the hypernetwork layers")
    meta_codes: int = setting(1, "K meta-codes (K > 1: the mixture of Eq. 13)", metavar="K", minimum=1)
    meta_steps: int = setting(300, "Adam steps fitting the meta-code(s)", metavar="N", minimum=0)
    meta_lr: float = setting(1e-2, "learning rate of the meta-code fit", metavar="LR")
    meta_beta: float = setting(1.0, "weight of the variance term of Eq. 11", metavar="W", minimum=0)
    meta_samples: int = setting(64, "decoded samples per class in the meta-code fit", metavar="N", minimum=1)
    stats_clip: float = setting(50.0, "L2 clip R of embeddings in the DP class statistics (ViT-S/14 norms lie in "
                                "36-48)", metavar="R")
    stats_noise: float = setting(20.0, "noise multiplier of the DP class statistics (accounted in the same budget; "
                                 "with --meta-targets dpstats that of the centre and statistics releases together, "
                                 "split 1:3 in 1/sigma^2 as DP-Gauss's)", metavar="SIGMA")
    meta_targets: str = setting("sums", "targets of the meta-code fit: sums (the paper's: class sums of embeddings "
                                "clipped to --stats-clip, their squares and counts) or dpstats (DP-Gauss's centred "
                                "statistics clipped to their DP spread, pooled into a low-rank DP class model; "
                                "federated/dpstats.py)", choices=("sums", "dpstats"))
    meta_clip_spread: float = setting(0.5, "dpstats: clip radius of the centred unit embeddings in units of their DP "
                                      "spread (DP-Gauss's --clip-spread)", metavar="K")
    meta_pca_dims: int = setting(64, "dpstats: DP-PCA directions of the class model (DP-Gauss's --pca-dims)",
                                 metavar="K", minimum=1)
    meta_part_weights: tuple[float, ...] = setting(
        (0.1, 0.0, 0.5), "dpstats: weights of the counts, log-norms and second moment inside the class-statistics "
        "release (DP-Gauss's --count-weight, --norm-weight, --moment-weight)", metavar="A,B,M")


META_CODES, META_WEIGHTS, META_LOSS = "meta.codes", "meta.weights", "meta.fit_loss"  # keys of the final broadcast
CENTRE, STATS = "centre", "class_stats"  # the releases (and their ledger entries)
CENTRE_SHARE, LOG_NORM_RANGE = 0.25, 10.0  # dpstats: DP-Gauss's defaults (budget split; log-norm clip, any backbone)
TARGET_SAMPLES = 1024  # dpstats: draws per class from the DP class model behind each class's target moments


def project_(v: torch.Tensor, radius: float) -> None:
    with torch.no_grad():
        v.mul_((radius / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0))


def spectral_norm(weight: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """sigma_max(W) by power iteration from a fixed start (differentiable: d sigma = u v^T)."""
    with torch.no_grad():
        v = torch.ones(weight.shape[1], device=weight.device) / weight.shape[1] ** 0.5
        for _ in range(iters):
            u = torch.nn.functional.normalize(weight @ v, dim=0)
            v = torch.nn.functional.normalize(weight.T @ u, dim=0)
    return u @ weight @ v


def lipschitz_penalty(hyper: HyperNetwork) -> torch.Tensor:
    """R_Lip: sum of squared spectral norms of the hypernetwork's layers."""
    return sum(spectral_norm(m.weight).pow(2) for m in hyper.hyper_layers())


def class_stat_sums(x: torch.Tensor, y: torch.Tensor, n_classes: int, clip: float) -> torch.Tensor:
    """(n_classes, 2D + 1): per class the sums of u = clip(x)/R, of u^2, and the count; one record
    changes one class block by at most sqrt(3) in L2 (|u| <= 1, |u^2| <= 1, 1)."""
    u = x / (x.norm(dim=1, keepdim=True) / clip).clamp(min=1.0) / clip
    rows = torch.cat([u, u.pow(2), torch.ones(len(u), 1, device=u.device)], dim=1)
    return torch.zeros(n_classes, rows.shape[1], device=u.device).index_add_(0, y, rows)


def class_stats_noise(shape: torch.Size, noise_multiplier: float, gen: torch.Generator) -> torch.Tensor:
    """The Gaussian mechanism's noise for one client's class_stat_sums (L2 sensitivity sqrt(3))."""
    return noise_multiplier * math.sqrt(3) * torch.randn(shape, generator=gen)


def class_moments(sums: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean and diagonal variance of the (clipped) embeddings from (summed, noisy) sums."""
    d = (sums.shape[1] - 1) // 2
    counts = sums[:, -1].clamp(min=1.0)
    mean = clip * sums[:, :d] / counts[:, None]
    var = (clip ** 2 * sums[:, d:2 * d] / counts[:, None] - mean.pow(2)).clamp(min=0)
    return mean, var


class FedHypeVAE(Anonymizer):
    name = "fedhypevae"
    Config = FedHypeVAEConfig
    STACKED = True

    def __init__(self, ctx: RunContext, cfg: FedHypeVAEConfig) -> None:
        if cfg.mmd_samples < 2:
            raise UserError(f"--mmd-samples must be >= 2 (the unbiased MMD needs pairs), got {cfg.mmd_samples}")
        if cfg.meta_codes < 1 or cfg.code_radius <= 0 or cfg.stats_clip <= 0 or cfg.meta_clip_spread <= 0:
            raise UserError("--meta-codes must be >= 1, --code-radius, --stats-clip and --meta-clip-spread > 0")
        if len(cfg.meta_part_weights) != 3:
            raise UserError(f"--meta-part-weights takes three weights A,B,M, got {cfg.meta_part_weights}")
        try:
            self_weights = dpstats.PartWeights(*cfg.meta_part_weights)
        except ValueError as e:
            raise UserError(f"--meta-part-weights: {e}") from None
        super().__init__(ctx, cfg)
        sizes = dict(latent=cfg.latent, hidden=cfg.hidden, code_dim=cfg.code_dim, hyper_hidden=cfg.hyper_hidden,
                     prior_hidden=cfg.prior_hidden, label_dim=cfg.label_dim)
        self.global_hyper = self.new_hyper(make_generator(ctx.seed, SERVER, INIT))
        self.models = []
        for c in ctx.clients:
            gen = make_generator(ctx.seed, c.id, INIT)
            model = init_linear_layers_(HyperClient(ctx.dim, ctx.n_classes, **sizes), gen).to(ctx.device)
            with torch.no_grad():  # v_i ~ N(0, I) (Algorithm 1), within the radius
                model.code.weight.copy_(torch.randn(cfg.code_dim, generator=gen))
            project_(model.code.weight, cfg.code_radius)
            self.models.append(model)
        self.receive(self.global_hyper.state_dict())
        self.local_opts = [torch.optim.Adam([*m.encoder.parameters(), m.code.weight], lr=cfg.gen.lr, foreach=True) for m in self.models]
        # Each client's optimiser of its Phi copy only sees privatised gradients, so its state (Adam's
        # moments) is post-processing and costs no privacy.
        hyper_optim = OptimConfig(optimizer=cfg.hyper_optimizer, lr=cfg.hyper_lr, momentum=0.0, weight_decay=0.0)
        self.hyper_opts = [make_optimizer(m.hyper.parameters(), hyper_optim, foreach=True) for m in self.models]
        self.meta_codes: torch.Tensor | None = None
        self.meta_weights: torch.Tensor | None = None
        self.meta_fit_loss: float | None = None
        self.part_weights = self_weights
        self.centre: dpstats.Centre | None = None  # dpstats: the pooled DP centre, broadcast between the releases

    def new_hyper(self, gen: torch.Generator) -> HyperNetwork:
        cfg = self.cfg
        hyper = init_linear_layers_(HyperNetwork(self.ctx.dim, self.ctx.n_classes, cfg.latent, cfg.hidden, 3, cfg.code_dim,
                                                 cfg.hyper_hidden, cfg.prior_hidden, cfg.label_dim), gen)
        with torch.no_grad():  # start from d_l = 1, delta b_l = 0: the base decoder itself
            hyper.h_theta[-1].weight.zero_()
            hyper.h_theta[-1].bias.zero_()
        return hyper.to(self.ctx.device)

    @property
    def release_stages(self) -> int:
        return 2 if self.cfg.meta_targets == "dpstats" else 1

    def stats_sigmas(self) -> tuple[float, ...]:
        """The noise multipliers of the post-training releases."""
        s = self.cfg.stats_noise
        return (s / math.sqrt(CENTRE_SHARE), s / math.sqrt(1 - CENTRE_SHARE)) if self.release_stages == 2 else (s,)

    def planned_history(self, sigma: float, sample_rate: float, steps: int) -> list[tuple[float, float, int]]:
        return [(sigma, sample_rate, steps), *((s, 1.0, 1) for s in self.stats_sigmas())]

    # --- one round on one client ----------------------------------------------------------------
    def local_train(self, i: int, rnd: int) -> tuple[dict[str, torch.Tensor], float]:
        model = self.models[i]
        start = self.hyper_state(i)
        total, steps = 0.0, 0
        for step in range(self.local_steps(i)):
            self.schedule_lr(i, rnd, step, *self.optimizers_of(i))
            idx = self.poisson_indices(i, self.batch_gens[i]).to(self.ctx.device)
            batch = self.draw(i, idx)
            grads, loss = self.private_gradients(i, model, lambda: self.loss_of(model, *batch), len(idx))
            self.apply_gradients(i, model, grads, self.optimizers_of(i))
            if loss is not None:
                total, steps = total + loss, steps + 1
        return self.hyper_update(i, start), total / max(steps, 1)

    def optimizers_of(self, i: int) -> list[torch.optim.Optimizer]:
        return [self.local_opts[i], self.hyper_opts[i]]

    def draw(self, i: int, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Client i's step inputs for its Poisson batch idx: records, labels, the encoder's noise eps and
        the prior samples' zeta (its latent stream), drawn in this order by the sequential and the stacked
        step alike."""
        client, gen, cfg = self.ctx.clients[i], self.latent_gens[i], self.cfg
        x, y = client.x_train[idx], client.y_train[idx]
        eps = torch.randn(len(idx), cfg.latent, generator=gen).to(x)
        return x, y, eps, torch.randn(len(idx), cfg.mmd_samples, cfg.latent, generator=gen).to(x)

    def loss_of(self, model: HyperClient, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                zeta: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return model.per_sample_loss(x, y, eps, zeta, beta=cfg.beta, lambda_mmd=cfg.lambda_mmd, bandwidths=cfg.mmd_bandwidths)

    def hyper_state(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.models[i].hyper.state_dict().items()}

    def hyper_update(self, i: int, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What client i sends: its hypernetwork's change over the round, start - now."""
        return {k: start[k] - v.detach() for k, v in self.models[i].hyper.state_dict().items()}

    def apply_gradients(self, i: int, model: HyperClient, grads: dict[str, torch.Tensor],
                        optimizers: list[torch.optim.Optimizer]) -> None:
        """The private gradients plus the record-free regularisers' exact ones (Eq. 5: no privacy cost),
        then the steps and the projection of the code onto its ball."""
        cfg = self.cfg
        reg_params = [model.code.weight, *[m.weight for m in model.hyper.hyper_layers()]]
        reg = cfg.lambda_v * model.code.weight.pow(2).sum() + cfg.lambda_lip * lipschitz_penalty(model.hyper)
        reg_grads = dict(zip(map(id, reg_params), torch.autograd.grad(reg, reg_params)))
        super().apply_gradients(i, model, {name: grads[name] + reg_grads[id(p)] if id(p) in reg_grads else grads[name]
                                           for name, p in model.named_parameters()}, optimizers)
        project_(model.code.weight, cfg.code_radius)

    def stacked_round(self, indices: list[int], rnd: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        starts = {i: self.hyper_state(i) for i in indices}
        losses = self.train_stacked(indices, rnd, self.models, [self.optimizers_of(i) for i in range(len(self.models))],
                                    self.draw, self.loss_of)
        return [(self.hyper_update(i, starts[i]), loss) for i, loss in zip(indices, losses)]

    def aggregate(self, payloads: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Phi <- Phi - sum_i w_i * (client i's privatised update), then spectral projection."""
        step = super().aggregate(payloads, weights)
        hyper = self.global_hyper
        with torch.no_grad():
            for k, v in hyper.state_dict().items():
                v.sub_(step[k])
            if self.cfg.spectral_norm:
                for layer in hyper.hyper_layers():
                    layer.weight.div_(torch.linalg.matrix_norm(layer.weight, ord=2).clamp(min=1.0))
        return hyper.state_dict()

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.global_hyper.state_dict().items()}

    def receive(self, shared: dict[str, torch.Tensor]) -> None:
        self.global_hyper.load_state_dict(shared)
        for m in self.models:
            m.hyper.load_state_dict(shared)

    # --- post-training: DP class statistics and the meta-code ------------------------------------
    def release_class_stats(self, i: int) -> torch.Tensor:
        """class_stat_sums of this client's training records, plus Gaussian noise under DP."""
        c = self.ctx.clients[i]
        sums = class_stat_sums(c.x_train, c.y_train, self.ctx.n_classes, self.cfg.stats_clip)
        if self.privacy.enabled:
            sums = sums + class_stats_noise(sums.shape, self.cfg.stats_noise, self.noise_gens[i]).to(sums)
            self.accountants[i].release(STATS, self.cfg.stats_noise)
        return sums

    def release_dpstats(self, i: int, stage: int) -> dict[str, torch.Tensor]:
        """dpstats: the DP centre sums (stage 0), then the centred class sums (stage 1)."""
        c, (sigma_centre, sigma_stats) = self.ctx.clients[i], self.stats_sigmas()
        if stage == 0:
            sums = dpstats.centre_sums(c.x_train, LOG_NORM_RANGE)
            return {CENTRE: self.gaussian_release(i, sums, CENTRE, sigma_centre, dpstats.CENTRE_SENSITIVITY)}
        sums = dpstats.class_sums(c.x_train, c.y_train, self.centre, self.ctx.n_classes, LOG_NORM_RANGE,
                                  self.part_weights)
        return {STATS: self.gaussian_release(i, sums, STATS, sigma_stats, self.part_weights.sensitivity)}

    def dpstats_targets(self, pooled: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """dpstats: class means, diagonal variances (in embedding space) and noisy counts of the pooled DP
        class model, from draws of it (post-processing)."""
        k, d = self.ctx.n_classes, self.ctx.dim
        model = dpstats.class_gaussians(pooled.double(), k, d, "lowrank", self.cfg.meta_pca_dims, LOG_NORM_RANGE,
                                        self.centre, self.part_weights)
        y = torch.arange(k).repeat_interleave(TARGET_SAMPLES)
        x = dpstats.embeddings(model.sample(y, gen), y, self.centre, model).double().reshape(k, TARGET_SAMPLES, d)
        return x.mean(1).float(), x.var(1).float(), model.counts.float()

    def fit_meta_codes(self, stats: torch.Tensor) -> None:
        """Eq. 11 (Eq. 13 for K > 1): codes whose decoded class means/variances match the released ones."""
        cfg, d, hyper = self.cfg, self.ctx.dim, self.global_hyper
        gen = make_generator(self.ctx.seed, SERVER, META)
        if cfg.meta_targets == "dpstats":
            mean, var, counts = self.dpstats_targets(stats, gen)
        else:
            (mean, var), counts = class_moments(stats, cfg.stats_clip), stats[:, -1]
        mean, var = mean.to(self.ctx.device), var.to(self.ctx.device)
        classes = torch.nonzero(counts >= 20).squeeze(1)  # classes the federation (noisily) has
        codes = nn.Parameter(torch.randn(cfg.meta_codes, cfg.code_dim, generator=gen).to(self.ctx.device))
        logits = nn.Parameter(torch.zeros(cfg.meta_codes, device=self.ctx.device))
        project_(codes.data, cfg.code_radius)
        zeta = torch.randn(len(classes), cfg.meta_samples, cfg.latent, generator=gen).to(self.ctx.device)
        opt = torch.optim.Adam([codes, logits], lr=cfg.meta_lr)
        hyper.requires_grad_(False)
        y = classes.repeat_interleave(cfg.meta_samples)
        for _ in range(cfg.meta_steps):
            x = self.decode_from_codes(codes, torch.softmax(logits, 0), y, zeta.reshape(len(y), -1))
            x = x.reshape(len(classes), cfg.meta_samples, d)
            loss = ((x.mean(1) - mean[classes]).pow(2).sum(-1)
                    + cfg.meta_beta * (x.var(1) - var[classes]).pow(2).sum(-1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            project_(codes.data, cfg.code_radius)
        hyper.requires_grad_(True)
        self.meta_codes, self.meta_weights = codes.detach(), torch.softmax(logits.detach(), 0)
        self.meta_fit_loss = float(loss.detach())

    def decode_from_codes(self, codes: torch.Tensor, weights: torch.Tensor, y: torch.Tensor,
                          noise: torch.Tensor) -> torch.Tensor:
        """x = decoder_{theta_mix}(z, y), z ~ p_{omega_mix}(z | y): theta_mix, omega_mix the pi-weighted
        hypernetwork outputs of the codes (Eq. 13; one code: Eq. 12)."""
        hyper = self.global_hyper
        scales_k, shifts_k = hyper.modulation(codes)
        scales = [(weights[:, None] * s).sum(0).expand(len(y), -1) for s in scales_k]
        shifts = [(weights[:, None] * s).sum(0).expand(len(y), -1) for s in shifts_k]
        features = (weights[:, None] * hyper.prior_features(codes)).sum(0).expand(len(y), -1)
        mu, logvar = hyper.prior(y, features)
        z = mu + torch.exp(0.5 * logvar) * noise
        return hyper.decode(z, y, scales, shifts)

    def client_release(self, i: int, stage: int = 0) -> dict[str, torch.Tensor]:
        if self.cfg.meta_targets == "dpstats":
            return self.release_dpstats(i, stage)
        return {STATS: self.release_class_stats(i)}

    def release_spec(self) -> dict[str, tuple[int, ...]]:
        k, d = self.ctx.n_classes, self.ctx.dim
        if self.cfg.meta_targets == "dpstats":
            return {CENTRE: (d + 2,), STATS: (dpstats.class_sums_size(k, d),)}
        return {STATS: (k, 2 * d + 1)}

    def absorb(self, stage: int, releases: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """dpstats: the pooled DP centre, broadcast before the class statistics."""
        pooled = torch.stack([r[CENTRE].double() for r in releases]).sum(0)
        broadcast = dpstats.centre_of(pooled, LOG_NORM_RANGE, self.cfg.meta_clip_spread).state()
        self.receive_stage(stage, broadcast)  # the server fits on the centre exactly as the clients receive it
        return broadcast

    def receive_stage(self, stage: int, broadcast: dict[str, torch.Tensor]) -> None:
        self.centre = dpstats.Centre.from_state(broadcast)

    def finalize(self, releases: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The summed class statistics -> meta-code(s); broadcast with the final hypernetwork."""
        self.fit_meta_codes(torch.stack([r[STATS] for r in releases]).sum(0))
        return {**self.shared_state(), META_CODES: self.meta_codes, META_WEIGHTS: self.meta_weights,
                META_LOSS: torch.tensor(self.meta_fit_loss, dtype=torch.float64)}

    def receive_final(self, final: dict[str, torch.Tensor]) -> None:
        final = dict(final)
        self.meta_codes, self.meta_weights = final.pop(META_CODES), final.pop(META_WEIGHTS)
        self.meta_fit_loss = float(final.pop(META_LOSS))
        self.receive(final)

    def sample(self, i: int, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = self.latent_noise(len(y), self.cfg.latent, gen)
        return self.decode_from_codes(self.meta_codes, self.meta_weights, y, noise)

    # --- state and report -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"models": [m.state_dict() for m in self.models], "hyper": self.global_hyper.state_dict(),
                "local_opts": [o.state_dict() for o in self.local_opts],
                "hyper_opts": [o.state_dict() for o in self.hyper_opts], **self.dp_state()}

    def load_state_dict(self, state: dict) -> None:
        for m, s in zip(self.models, state["models"]):
            m.load_state_dict(s)
        for o, s in zip([*self.local_opts, *self.hyper_opts], [*state["local_opts"], *state["hyper_opts"]]):
            o.load_state_dict(s)
        self.global_hyper.load_state_dict(state["hyper"])
        self.load_dp_state(state)

    def shared_parameters(self) -> dict:
        return {"shared": count_parameters(self.global_hyper), "total": count_parameters(self.models[0]),
                "shared_model": "hypernetwork",
                "private_per_client": count_parameters(self.models[0].encoder) + self.cfg.code_dim}

    def report(self) -> dict:
        out = super().report()
        out["meta_code"] = {"k": self.cfg.meta_codes, "weights": [] if self.meta_weights is None else self.meta_weights.tolist(),
                            "fit_loss": self.meta_fit_loss, "targets": self.cfg.meta_targets,
                            "stats_noise_multipliers": list(self.stats_sigmas())}
        return out
