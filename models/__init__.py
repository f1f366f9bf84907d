"""Plain nn.Modules: no argparse, no file I/O, no training loops."""
from torch import nn


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
