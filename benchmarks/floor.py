"""A floor under a run's wall time: its matrix products and Gaussian draws, replayed alone at their own shapes.

The FLOP bound (round_loop.py) prices every matrix product at a large square matmul's rate and does not count
the DP noise at all. KernelLog records, while some work runs, each product (mm, addmm, bmm, baddbmm) and each
draw of Gaussian noise (randn, normal_) with its shapes, strides and scalars. replay_seconds() then runs each
distinct call alone on fresh inputs of the same layout, on this machine, and sums count x its best time. That
is what those same kernels take at the run's own small, skinny or batched shapes, with warm caches and nothing
between them. Any implementation of the same arithmetic and the same noise stream pays at least this much;
what the wall spends above it is the element-wise, dispatch and memory work around those kernels.

    with KernelLog() as log:
        work()
    print(log.replay_seconds(), "s of products and draws in", sum(log.calls.values()), "calls")
"""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
KERNELS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,  # the products
           aten.normal_.default, aten.randn.default, aten.randn.generator}                # the Gaussian draws


def spec(value: Any) -> tuple:
    """A hashable description of one argument, from which replay builds a stand-in of the same layout."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type)
    if isinstance(value, torch.Generator):
        return ("generator",)
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(spec(v) for v in value))
    return ("value", value)


def build(description: tuple, gen: torch.Generator) -> Any:
    kind = description[0]
    if kind == "tensor":
        _, shape, stride, dtype, device = description
        # one storage that every index of the (possibly transposed, expanded or sliced) layout lands in
        size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        flat = torch.randn(size, generator=gen).to(dtype) if dtype.is_floating_point else torch.zeros(size, dtype=dtype)
        return flat.to(device).as_strided(shape, stride)
    if kind == "generator":
        return gen
    if kind == "seq":
        return [build(d, gen) for d in description[1]]
    return description[1]


class KernelLog(TorchDispatchMode):
    """Counts the products and Gaussian draws run inside it, by their arguments' layout."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in KERNELS:
            self.calls[func, spec(args), tuple(sorted((k, spec(v)) for k, v in kwargs.items()))] += 1
        return func(*args, **kwargs)

    def replay_seconds(self, repeats: int = 5) -> float:
        """Sum over the distinct calls of count x the best of `repeats` timings of the call alone."""
        gen = torch.Generator().manual_seed(0)
        total = 0.0
        for (func, args, kwargs), count in self.calls.items():
            inputs, options = build(args, gen), {k: build(v, gen) for k, v in kwargs}
            func(*inputs, **options)  # warm-up: caches, and the BLAS's first-call set-up
            best = math.inf
            for _ in range(repeats):
                tic = time.perf_counter()
                func(*inputs, **options)
                best = min(best, time.perf_counter() - tic)
            total += count * best
        return total
