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


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    model = new_classifier(x.shape[1], n_classes, gen, x.device)
    train_epochs(model, x, y, cfg, gen)
    return model


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.softmax(model(x), dim=-1)
