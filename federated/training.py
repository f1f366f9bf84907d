"""Minibatch training of small models on in-memory tensors (index tensors, no DataLoader)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from data.io import UserError
from federated.clients import shuffled_batches
from models.classifier import LinearClassifier
from models.init import init_linear_layers_

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.5
    weight_decay: float = 5e-4
    batch_size: int = 128       # 0 = full batch
    epochs: int = 5


def downstream_default() -> OptimConfig:
    """The downstream linear classifier's training (Adam 1e-3, batch 128, 100 epochs): on the real
    OrganAMNIST embeddings it converges, where the published code's full-batch 100 epochs did not."""
    return OptimConfig(optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0, batch_size=128, epochs=100)


def make_optimizer(params, cfg: OptimConfig, *, foreach: bool | None = None) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=foreach)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach)
    raise UserError(f"optimizer {cfg.optimizer!r} is unknown; valid: {', '.join(OPTIMIZERS)}")


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: OptimConfig,
                 gen: torch.Generator, *, optimizer: torch.optim.Optimizer | None = None,
                 penalty: Callable[[nn.Module], torch.Tensor] | None = None) -> float:
    """cfg.epochs epochs of shuffled minibatch cross-entropy (+ penalty(model)); mean loss."""
    optimizer = optimizer or make_optimizer(model.parameters(), cfg)
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


def fit_classifiers(datasets: list[tuple[torch.Tensor, torch.Tensor]], n_classes: int, cfg: OptimConfig,
                    gens: list[torch.Generator]) -> list[LinearClassifier]:
    """One linear classifier per (x, y), trained as train_epochs would train each alone -- its own
    generator for the initialisation and every epoch's shuffle, a step only when it has a batch --
    but with one batched forward/backward and one multi-tensor optimiser step for all models per
    iteration: small models are dominated by per-step overhead, so K clients cost about one.
    (Optimisers skip parameters without a gradient, which is how a model with no batch sits out.)"""
    models = [new_classifier(x.shape[1], n_classes, g, x.device) for (x, _), g in zip(datasets, gens)]
    optimizer = make_optimizer([p for m in models for p in m.parameters()], cfg, foreach=False)
    x_all = torch.cat([x for x, _ in datasets])
    y_all = torch.cat([y for _, y in datasets])
    sizes = [len(y) for _, y in datasets]
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
    for m in models:
        m.train()
    for _ in range(cfg.epochs):
        epoch = [[b + off for b in shuffled_batches(n, cfg.batch_size or n, g)] if n else []
                 for n, off, g in zip(sizes, offsets, gens)]
        for t in range(max(map(len, epoch))):
            active = [k for k, batches in enumerate(epoch) if t < len(batches)]
            rows = [epoch[k][t] for k in active]
            width = max(map(len, rows))
            idx = torch.stack([F.pad(r, (0, width - len(r))) for r in rows]).to(x_all.device)
            valid = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).to(x_all)
            with torch.no_grad():  # closed-form cross-entropy gradient: no autograd graph per step
                weight = torch.stack([models[k].weight for k in active])
                bias = torch.stack([models[k].bias for k in active])
                x = x_all[idx]
                probs = torch.softmax(torch.baddbmm(bias[:, None], x, weight.transpose(1, 2)), -1)
                probs[torch.arange(len(active))[:, None], torch.arange(width)[None], y_all[idx]] -= 1
                g = probs * (valid / valid.sum(1, keepdim=True))[..., None]  # d(batch-mean CE)/d logits
                grad_w, grad_b = torch.bmm(g.transpose(1, 2), x), g.sum(1)
            optimizer.zero_grad(set_to_none=True)
            for j, k in enumerate(active):
                models[k].weight.grad, models[k].bias.grad = grad_w[j], grad_b[j]
            optimizer.step()
    return models


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.softmax(model(x), dim=-1)
