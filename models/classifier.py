"""The downstream model of both papers: one linear layer over frozen embeddings."""
from torch import nn
from torch.nn import functional as F


class LinearClassifier(nn.Linear):
    def __init__(self, dim: int, n_classes: int):
        super().__init__(dim, n_classes)


class NormalizedLinearClassifier(LinearClassifier):
    """A linear layer over L2-normalised embeddings (the balanced downstream recipe's model)."""

    def forward(self, x):
        return super().forward(F.normalize(x, dim=-1))
