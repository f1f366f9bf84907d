"""K copies of one architecture as one module: every nn.Linear becomes a StackedLinear holding the K
copies' weights, and every layer type with a `stack(copies)` static method (a row layer of
models.hypervae) becomes what that returns, so the unchanged forward of a model built from such layers
and row-wise operations (cat, chunk, activations over the last dimension) runs the K copies at once on
(K, rows, features) inputs, one batched matmul per layer instead of K small ones."""
from __future__ import annotations

import copy

import torch
from torch import nn


class Stacked(nn.Module):
    """A layer holding K copies' parameters on a new first dimension; with `active` set (select_first),
    only the first `active` copies run: a view of the parameters, no copy."""

    active: int | None = None

    def first(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or self.active is None else t[:self.active]


class StackedLinear(Stacked):
    """K Linear layers: x (K, B, in) -> (K, B, out), weight (K, out, in), bias (K, out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.first(self.weight)
        if self.bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(self.first(self.bias).unsqueeze(1), x, weight.transpose(1, 2))


def stack_linear(copies: list[nn.Linear]) -> StackedLinear:
    return StackedLinear(torch.stack([c.weight.detach() for c in copies]),
                         None if copies[0].bias is None else torch.stack([c.bias.detach() for c in copies]))


def select_first(stacked: nn.Module, active: int | None) -> None:
    """Runs only the first `active` copies of every stacked layer (None: all of them). A caller that
    drops copies as it goes stacks them in the order they drop out last."""
    for m in stacked.modules():
        if isinstance(m, Stacked):
            m.active = active


def stacker(module: nn.Module):
    """How a layer is stacked: stack_linear for a Linear, its type's `stack` for a stackable layer, else None."""
    return stack_linear if isinstance(module, nn.Linear) else getattr(type(module), "stack", None)


def stack_modules(modules: list[nn.Module]) -> nn.Module:
    """One module whose parameter `name` is the K modules' `name` stacked on a new first dimension. The
    K modules' parameters become views of it (same storage): an update of module k (its own optimiser,
    its own state) is seen by the stacked forward, and the stacked module holds no copy to write back.
    `unshare` gives them their own storage again. The modules must share one architecture of stackable
    layers (Linear, or a type with `stack`) and parameter-free layers."""
    stacked = copy.deepcopy(modules[0])
    layers = [n for n, m in stacked.named_modules() if stacker(m) is not None]
    own = {n for n, _ in stacked.named_parameters()}
    covered = {f"{n}.{p}" if n else p for n in layers for p, _ in stacked.get_submodule(n).named_parameters(recurse=False)}
    if own - covered:
        raise TypeError(f"stack_modules handles Linear and stackable layers only, not {sorted(own - covered)}")
    for name in layers:
        parts = [m.get_submodule(name) for m in modules]
        parent, _, leaf = name.rpartition(".")
        setattr(stacked.get_submodule(parent) if parent else stacked, leaf, stacker(parts[0])(parts))
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
