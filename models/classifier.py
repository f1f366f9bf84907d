"""The downstream model of both papers: one linear layer over frozen embeddings."""
from torch import nn


class LinearClassifier(nn.Linear):
    def __init__(self, dim: int, n_classes: int):
        super().__init__(dim, n_classes)
