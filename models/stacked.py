"""K copies of one architecture as one module: every nn.Linear becomes a StackedLinear holding the K
copies' weights, so the unchanged forward of a model built from Linear layers and row-wise operations
(cat, chunk, activations over the last dimension) runs the K copies at once on (K, B, features) inputs,
one batched matmul per layer instead of K small ones."""
from __future__ import annotations

import copy

import torch
from torch import nn


class StackedLinear(nn.Module):
    """K Linear layers: x (K, B, in) -> (K, B, out), weight (K, out, in), bias (K, out). With `active` set
    (select_first), only the first `active` copies run, x (active, B, in): a view of the weights, no copy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.active is None else self.weight[:self.active]
        if self.bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        bias = self.bias if self.active is None else self.bias[:self.active]
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def select_first(stacked: nn.Module, active: int | None) -> None:
    """Runs only the first `active` copies of every StackedLinear (None: all of them). A caller that
    drops copies as it goes stacks them in the order they drop out last."""
    for m in stacked.modules():
        if isinstance(m, StackedLinear):
            m.active = active


def stack_modules(modules: list[nn.Module]) -> nn.Module:
    """One module whose parameter `name` is the K modules' `name` stacked on a new first dimension. The
    K modules' parameters become views of it (same storage): an update of module k (its own optimiser,
    its own state) is seen by the stacked forward, and the stacked module holds no copy to write back.
    `unshare` gives them their own storage again. The modules must share one architecture of Linear
    layers and parameter-free layers."""
    stacked = copy.deepcopy(modules[0])
    linears = [n for n, m in stacked.named_modules() if isinstance(m, nn.Linear)]
    own = {n for n, _ in stacked.named_parameters()}
    covered = {f"{n}.{p}" for n in linears for p in ("weight", "bias")}
    if own - covered:
        raise TypeError(f"stack_modules handles Linear layers only, not {sorted(own - covered)}")
    for name in linears:
        parts = [dict(m.named_modules())[name] for m in modules]
        weight = torch.stack([p.weight.detach() for p in parts])
        bias = None if parts[0].bias is None else torch.stack([p.bias.detach() for p in parts])
        parent, _, leaf = name.rpartition(".")
        setattr(stacked.get_submodule(parent) if parent else stacked, leaf, StackedLinear(weight, bias))
    params = dict(stacked.named_parameters())
    for k, m in enumerate(modules):
        for name, p in m.named_parameters():
            p.data = params[name].data[k]
    return stacked


def unshare(modules: list[nn.Module]) -> None:
    """Gives the modules of stack_modules their own storage again (a checkpoint of a view would hold
    the whole stack)."""
    for m in modules:
        for p in m.parameters():
            p.data = p.data.clone()
