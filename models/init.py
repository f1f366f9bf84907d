"""Seeded initialisation: torch's default Linear init, drawn from an explicit generator
(module constructors use the global RNG, which a run must never touch)."""
from __future__ import annotations

import math

import torch
from torch import nn


def init_linear_layers_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                if layer.bias is not None:
                    bound = 1 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0
                    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return module
