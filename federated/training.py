"""Minibatch training of small models on in-memory tensors (index tensors, no DataLoader)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from data.flags import setting
from data.io import UserError
from federated.clients import shuffled_batches
from federated.solvers import SOLVERS, Problem
from models.classifier import LinearClassifier
from models.init import init_linear_layers_

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = setting("sgd", "optimiser", choices=OPTIMIZERS)
    lr: float = setting(1e-3, "learning rate (constant)", metavar="LR")
    momentum: float = setting(0.5, "SGD momentum", metavar="M")
    weight_decay: float = setting(5e-4, "weight decay", metavar="WD")
    batch_size: int = setting(128, "batch size (0 = full batch)", metavar="N", minimum=0)
    epochs: int = setting(5, "epochs", metavar="N", minimum=1)


RECIPES = ("paper", "balanced")


@dataclass(frozen=True)
class ClassifierConfig(OptimConfig):
    """The downstream classifier: the papers' recipe (the optimiser settings) or the strong one."""
    recipe: str = setting("paper", "paper: the optimiser settings of this group, as the papers; balanced: "
                          "L2-normalised embeddings, class-balanced multinomial logistic regression fitted by "
                          "full-batch L-BFGS, its L2 penalty chosen per client on its own validation BACC",
                          choices=RECIPES)
    c_grid: tuple[float, ...] = setting((1.0, 10.0, 100.0, 1000.0), "balanced recipe: inverse L2 penalties C "
                                        "searched on validation data", metavar="C,C,..")
    max_iter: int = setting(500, "balanced recipe: L-BFGS iterations at most, per C", metavar="N", minimum=1)
    synthetic_weights: tuple[float, ...] = setting((0.0, 0.1, 0.3, 1.0), "balanced recipe of an anonymizer: weights "
                                                   "of a synthetic record relative to a real one, searched with C on "
                                                   "the client's validation BACC (0 = ignore the synthetic data)",
                                                   metavar="W,W,..")
    solver: str = setting("lbfgs", "balanced recipe: lbfgs on the weights as they are (Table 1's; its weak-penalty fits "
                          "often stop unconverged at --downstream-max-iter), or preconditioned (the same problem in "
                          "whitened coordinates: converges in fewer iterations, robust to float rounding; "
                          "federated/solvers.py)", choices=tuple(SOLVERS))

    def __post_init__(self) -> None:  # checked when the flags are read, before anything is written
        if self.solver not in SOLVERS:
            raise UserError(f"--downstream-solver {self.solver!r} is unknown; valid: {', '.join(SOLVERS)}")
        if self.solver != "lbfgs" and self.recipe != "balanced":
            raise UserError(f"--downstream-solver {self.solver}: only the balanced recipe has a solver; add "
                            "--downstream-recipe balanced (or a balanced preset)")


def downstream_default() -> ClassifierConfig:
    """The downstream linear classifier's training (Adam 1e-3, batch 128, 100 epochs): on the real
    OrganAMNIST embeddings it converges, where the published code's full-batch 100 epochs did not."""
    return ClassifierConfig(optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0, batch_size=128, epochs=100)


def check_optimizer(cfg: OptimConfig) -> None:
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer {cfg.optimizer!r} is unknown; valid: {', '.join(OPTIMIZERS)}")


def make_optimizer(params, cfg: OptimConfig, *, foreach: bool | None = None) -> torch.optim.Optimizer:
    check_optimizer(cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=foreach)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach)


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: OptimConfig,
                 gen: torch.Generator, *, penalty: Callable[[nn.Module], torch.Tensor] | None = None) -> float:
    """cfg.epochs epochs of shuffled minibatch cross-entropy (+ penalty(model)) with a fresh optimiser;
    mean loss. The straightforward one-model loop that train_classifiers is tested against."""
    optimizer = make_optimizer(model.parameters(), cfg)
    batch = cfg.batch_size or len(y)
    total, steps = 0.0, 0
    model.train()
    for _ in range(cfg.epochs):
        for idx in shuffled_batches(len(y), batch, gen):
            idx = idx.to(x.device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1)


def new_classifier(dim: int, n_classes: int, gen: torch.Generator, device: torch.device) -> LinearClassifier:
    return init_linear_layers_(LinearClassifier(dim, n_classes), gen).to(device)


def fit_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: OptimConfig,
                   gen: torch.Generator) -> LinearClassifier:
    return fit_classifiers([(x, y)], n_classes, cfg, [gen])[0]


Data = tuple[torch.Tensor, torch.Tensor]


def fit_downstream(datasets: list[Data], vals: list[Data], n_classes: int, cfg: ClassifierConfig,
                   gens: list[torch.Generator], *, synthetic: list[Data] | None = None,
                   synthetic_scales: list[torch.Tensor | None] | None = None) -> list[LinearClassifier]:
    """One downstream classifier per client: trained on datasets[i] (+ synthetic[i], an anonymizer's
    samples), by cfg.recipe: the papers' (the batched trainer, real and synthetic records alike) or the
    balanced one, which chooses its penalty and the synthetic records' weight on vals[i] (the
    client's own validation split, never a test set); synthetic_scales[i] (balanced recipe only) scales that
    weight per class."""
    synthetic = synthetic or [None] * len(datasets)
    scales = synthetic_scales or [None] * len(datasets)
    if cfg.recipe == "balanced":
        return [fit_balanced(x, y, xv, yv, n_classes, cfg, synthetic=syn, synthetic_scale=scale)
                for (x, y), (xv, yv), syn, scale in zip(datasets, vals, synthetic, scales)]
    if any(scale is not None for scale in scales):
        raise UserError("per-class synthetic weights need the balanced recipe (--downstream-recipe balanced)")
    return fit_classifiers(datasets, n_classes, cfg, gens, appended=synthetic)


def fit_balanced(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, n_classes: int,
                 cfg: ClassifierConfig, *, synthetic: Data | None = None,
                 synthetic_scale: torch.Tensor | None = None) -> LinearClassifier:
    """Class-balanced multinomial logistic regression on L2-normalised embeddings, trained to convergence
    (full-batch L-BFGS, deterministic): minimises sum_i s_i CE_i + |W|^2 / (2C) with scikit-learn's
    'balanced' weights s_i = n / (K_present n_{y_i}) and an unpenalised bias. With synthetic records, a
    synthetic record counts w times a real one (in n and in n_c too, so a class keeps its total weight), or
    w x synthetic_scale[c] for one of class c.
    Searched: each w of cfg.synthetic_weights (0 = the real data alone), and for each, each C of
    cfg.c_grid in increasing order, warm-started from the last; kept: the best balanced accuracy on
    (x_val, y_val), ties to the smaller w, then the smaller C. A class without training weight keeps a
    logit of -1e4. cfg.solver fits each (w, C) (federated/solvers.py). model.chosen names the pick and its
    fit's L-BFGS iterations, and whether they reached cfg.max_iter (or its evaluation budget) before a
    tolerance stopped them: such a fit is not converged, and under the lbfgs solver its metrics then move
    with float rounding (docs/results.md, 2026-12-06).
    Why it is fast: the features are centred (exact, as the bias is unpenalised, and far better
    conditioned), the loss and gradient are closed-form (no autograd) and float32 (float64 chose the
    same C on real clients at 2-3x the cost)."""
    from federated.evaluation import client_metrics
    from models.classifier import NormalizedLinearClassifier
    has_syn = synthetic is not None and len(synthetic[1]) > 0
    x_all = torch.cat([x, synthetic[0]]) if has_syn else x
    y_all = torch.cat([y, synthetic[1]]) if has_syn else y
    xs = F.normalize(x_all.float(), dim=-1)
    centre = xs[:len(y)].mean(0) if len(y) else xs.mean(0)
    xs = xs - centre
    xv = F.normalize(x_val.float(), dim=-1) - centre
    onehot = F.one_hot(y_all, n_classes).float()
    is_syn = torch.arange(len(y_all), device=y_all.device) >= len(y)
    best: tuple[float, torch.Tensor, torch.Tensor, float, float, int, bool] | None = None
    for w in sorted(cfg.synthetic_weights) if has_syn else (0.0,):
        # w = 0: the synthetic rows (after the real ones) would only add zero terms, so they are left out
        rows = slice(None) if w > 0 else slice(0, len(y))
        xs_w, onehot_w, y_w = xs[rows], onehot[rows], y_all[rows]
        syn_mass = w if synthetic_scale is None else w * synthetic_scale.to(xs)[y_w]
        mass = torch.where(is_syn[rows], syn_mass, 1.0)
        class_mass = torch.zeros(n_classes, device=xs.device).index_add_(0, y_w, mass)
        present = class_mass > 0
        # per-record weight s_i / n of the mean objective (sums to 1); the penalty 1 / (C n) on that scale
        record_weight = mass * torch.where(present, 1.0 / (present.sum() * class_mass.clamp(min=1e-12)), 0.0)[y_w]
        n = float(mass.sum())
        offset = torch.where(present, 0.0, -1e4).to(xs)
        weight = torch.zeros(n_classes, x.shape[1], device=x.device)
        bias = torch.zeros(n_classes, device=x.device)
        classes_present = int(present.sum())
        for c in sorted(cfg.c_grid):
            iterations, at_limit = 0, False
            if classes_present > 1:
                problem = Problem(xs_w, onehot_w, record_weight, offset, 1.0 / (c * n), classes_present)
                iterations, at_limit = SOLVERS[cfg.solver](weight, bias, problem, cfg.max_iter)
            pred = torch.addmm(bias + offset, xv, weight.T).argmax(1)
            score = client_metrics(y_val, pred)["bacc"] if len(y_val) else 0.0
            if best is None or score > best[0]:
                best = (score, weight.clone(), bias + offset - weight @ centre, w, c, iterations, at_limit)
    model = NormalizedLinearClassifier(x.shape[1], n_classes).to(x.device)
    with torch.no_grad():
        model.weight.copy_(best[1]), model.bias.copy_(best[2])
    model.chosen = {"synthetic_weight": best[3], "C": best[4], "val_bacc": best[0], "lbfgs_iterations": best[5],
                    "reached_max_iter": best[6]}
    return model


def fit_classifiers(datasets: list[Data], n_classes: int, cfg: OptimConfig, gens: list[torch.Generator], *,
                    appended: list[Data | None] | None = None) -> list[LinearClassifier]:
    """One new linear classifier per (x, y) (+ appended[i], as train_classifiers), initialised from and
    shuffled by its own generator."""
    models = [new_classifier(x.shape[1], n_classes, g, x.device) for (x, _), g in zip(datasets, gens)]
    train_classifiers(models, datasets, cfg, gens, appended=appended, with_losses=False)
    return models


class StackedOptimizer:
    """torch's SGD (momentum, weight decay) or Adam update, element-wise as torch.optim writes it, on one
    stacked tensor (K, ...) of K models' parameters: step(grad, a, corrections) moves the first a models
    (views updated in place), each with its own state, as its own optimiser would at its step count
    (1 on its first step; the caller knows them, so no step needs a lookup or a sync)."""

    def __init__(self, params: torch.Tensor, cfg: OptimConfig) -> None:
        check_optimizer(cfg)
        self.params, self.cfg = params, cfg
        self.first = torch.zeros_like(params)   # SGD momentum buffer / Adam exp_avg
        self.second = torch.zeros_like(params)  # Adam exp_avg_sq
        self.prefixes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def prefix(self, a: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first a models' parameters and states: views made once per a (a step is small enough that
        slicing would be a visible part of it)."""
        if a not in self.prefixes:
            self.prefixes[a] = (self.params[:a], self.first[:a], self.second[:a])
        return self.prefixes[a]

    def corrections(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(-lr / (1 - b1^t), sqrt(1 - b2^t)) for each step count t (float64, then float32 as applied), with
        torch.optim.Adam's defaults b1, b2: computed for a whole epoch at once, shaped counts.shape + (1, ...)
        to broadcast over a model's parameters, indexed per step."""
        t = counts.double()
        shape = counts.shape + (1,) * (self.params.dim() - 1)
        return (-self.cfg.lr / (1 - 0.9 ** t)).float().view(shape), ((1 - 0.999 ** t) ** 0.5).float().view(shape)

    def step(self, grad: torch.Tensor, a: int, corrections: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """corrections: the first a models' rows of corrections(counts) (Adam only)."""
        cfg = self.cfg
        param, first, second = self.prefix(a)
        if cfg.weight_decay:
            grad = grad.add(param, alpha=cfg.weight_decay)
        if cfg.optimizer == "sgd":
            if cfg.momentum:
                grad = first.mul_(cfg.momentum).add_(grad)  # torch's first step: buf = grad, the same
            param.add_(grad, alpha=-cfg.lr)
            return
        b1, b2 = 0.9, 0.999  # torch.optim.Adam's defaults
        neg_step_size, bc2_sqrt = corrections
        m = first.lerp_(grad, 1 - b1)
        v = second.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = v.sqrt().div_(bc2_sqrt).add_(1e-8)
        param.addcdiv_(m * neg_step_size, denom)  # p - (lr_t m) / denom, bit for bit: negation is exact


def epoch_batches(sizes: list[int], batch: int, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of every model's shuffled batches (each generator draws as shuffled_batches would), as
    (T, K, batch) row indices into the concatenated data and their (T, K, 1, batch) weights 1/|batch|
    (0 on padding and past a model's last batch): step t's are idx[t], contiguous."""
    counts = [-(-n // batch) for n in sizes]
    idx = torch.zeros(max(counts, default=0), len(sizes), batch, dtype=torch.long)
    weight = torch.zeros(idx.shape)
    offset = 0
    for k, (n, g) in enumerate(zip(sizes, gens)):
        if n:
            flat = torch.cat([torch.randperm(n, generator=g) + offset, torch.zeros(counts[k] * batch - n, dtype=torch.long)])
            idx[:counts[k], k] = flat.view(counts[k], batch)
            lengths = torch.full((counts[k],), batch)
            lengths[-1] = n - (counts[k] - 1) * batch
            weight[:counts[k], k] = (torch.arange(batch)[None] < lengths[:, None]) / lengths[:, None]
        offset += n
    return idx, weight[:, :, None]


StackedPenalty = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def train_classifiers(models: list[nn.Linear], datasets: list[Data], cfg: OptimConfig, gens: list[torch.Generator],
                      *, penalty: StackedPenalty | None = None, appended: list[Data | None] | None = None,
                      with_losses: bool = True) -> list[float] | None:
    """Trains each linear model on its own (x, y) as train_epochs would train it alone (its generator
    shuffles every epoch; it steps only when it has a batch; a fresh optimiser), but stacked: one
    batched forward/backward and one optimiser update for all models per iteration. Small models are
    dominated by per-step overhead, so K clients cost about one. The cross-entropy gradient is closed-form;
    penalty({"weight": (A, C, D), "bias": (A, C)}) -> (A,) adds a term per model, the same function of
    each model's own parameters (e.g. FedProx's proximal term), differentiated by autograd. Returns each
    model's mean step loss (with its penalty), or None with with_losses=False (the loss is four small kernels
    a step, 10-15 % of a step's fixed cost, that a caller discarding it skips). appended[i] (e.g. an
    anonymizer's synthetic records) trains model i as if concatenated after datasets[i], without the copy."""
    device = models[0].weight.device
    parts = [[d] if extra is None else [d, extra] for d, extra in zip(datasets, appended or [None] * len(datasets))]
    # the models are stacked longest-first, so that the models still training at step t are a prefix of
    # the stack: every step works on views, with no copies in or out (a model's arithmetic is its own)
    sizes = [sum(len(y) for _, y in p) for p in parts]
    batch = cfg.batch_size or max(sizes, default=1)
    order = sorted(range(len(models)), key=lambda k: -sizes[k])
    # weight and bias as one (K, C, D + 1) tensor against records with a trailing 1: one matrix product
    # gives the logits, one the gradients of both, and the update is one pass over all parameters
    stack = torch.stack([torch.cat([models[k].weight.detach(), models[k].bias.detach()[:, None]], 1) for k in order])
    dim = stack.shape[2] - 1
    optimizer = StackedOptimizer(stack, cfg)
    # every model's records, one after another, with the trailing 1: written once (the gathers below
    # read rows of it at random, so it is the run's largest memory stream)
    rows = [p for k in order for p in parts[k]]
    x_all = torch.empty(sum(sizes), dim + 1, dtype=stack.dtype, device=device)
    x_all[:, dim] = 1
    offset = 0
    for x, _ in rows:
        x_all[offset:offset + len(x), :dim] = x
        offset += len(x)
    y_all = torch.cat([y for _, y in rows])
    sizes = [sizes[k] for k in order]
    counts = [-(-n // batch) for n in sizes]
    n_active = [sum(c > t for c in counts) for t in range(max(counts, default=0))]  # non-increasing in t
    totals = torch.zeros(len(models), dtype=torch.float64, device=device)
    minus_one = torch.full((len(models), 1, batch), -1.0, device=device)
    # model j takes its steps t < counts[j] of every epoch, so its step count at (epoch e, step t) is
    # e counts[j] + t + 1
    per_epoch = torch.tensor(counts, device=device)
    first_counts = torch.arange(1, len(n_active) + 1, device=device)[:, None].expand(-1, len(counts))
    # each epoch's per-step pieces are cut by a few whole-epoch calls (the models stepping at t are the
    # first n_active[t]), as a step is small enough that indexing per step would be a visible part of it
    active = torch.arange(len(models), device=device)[None] < torch.tensor(n_active, device=device)[:, None]
    step_rows = [a * batch for a in n_active]
    # step t's records are gathered into the first n_active[t] slots of one buffer: its views are made once
    x_buffer = torch.empty(len(models), batch, dim + 1, dtype=stack.dtype, device=device)
    prefixes = {a: (optimizer.prefix(a)[0], x_buffer[:a].view(-1, dim + 1), x_buffer[:a],
                    x_buffer[:a].transpose(1, 2), minus_one[:a], totals[:a]) for a in set(n_active)}
    for epoch in range(cfg.epochs):
        idx, weight = (t.to(device) for t in epoch_batches(sizes, batch, [gens[k] for k in order]))
        neg_step, bc2 = (c[active].split(n_active) for c in optimizer.corrections(first_counts + epoch * per_epoch))
        ids = idx[active]  # (sum of n_active, batch): the active models' batches, step after step
        steps = zip(n_active, ids.view(-1).split(step_rows), y_all[ids].unsqueeze(1).split(n_active),
                    weight[active].split(n_active), neg_step, bc2)
        for a, ids_t, y, w, neg_step_t, bc2_t in steps:
            params, rows_t, x, x_t, minus, total = prefixes[a]
            torch.index_select(x_all, 0, ids_t, out=rows_t)
            # classes x records (W x^T, not x W^T): with few classes, BLAS is about twice as fast this way
            logp = torch.log_softmax(torch.bmm(params, x_t), 1)
            if with_losses:
                loss_sum = logp.gather(1, y).mul_(w).sum((1, 2))  # minus the loss
            g = logp.exp_().scatter_add_(1, y, minus).mul_(w)
            grad = torch.bmm(g, x)
            if penalty is not None:
                leaves = {"weight": params[..., :dim].detach().requires_grad_(),
                          "bias": params[..., dim].detach().requires_grad_()}
                value = penalty(leaves)
                extra_w, extra_b = torch.autograd.grad(value.sum(), list(leaves.values()))
                grad[..., :dim] += extra_w
                grad[..., dim] += extra_b
                if with_losses:
                    loss_sum = (value.detach() - loss_sum).neg_()  # -(loss + penalty), as before
            optimizer.step(grad, a, (neg_step_t, bc2_t))
            if with_losses:
                total -= loss_sum
    with torch.no_grad():
        for j, k in enumerate(order):
            models[k].weight.copy_(stack[j, :, :dim]), models[k].bias.copy_(stack[j, :, dim])
    if not with_losses:
        return None
    losses = (totals / (per_epoch * cfg.epochs).clamp(min=1)).tolist()
    return [losses[order.index(k)] for k in range(len(models))]


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.softmax(model(x), dim=-1)
