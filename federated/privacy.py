"""Differential privacy: noise calibration over the whole run, per-client accountants, and the DP-SGD
step (Poisson sampling, per-sample clipping, Gaussian noise) with Opacus's semantics.

Per-sample clipping is computed exactly without materialising per-sample gradients for models whose
trainable parameters all sit in nn.Linear layers applied once to (B, features) inputs: for such a
layer the per-sample gradient is the outer product g_i a_i^T, whose norm is |g_i| |a_i|, and the
clipped sum is one matmul (G * f)^T A ("ghost clipping"). `per_sample_grads_vmap` is the
straightforward torch.func reference it is tested against (and against Opacus's GradSampleModule).

Accounting: one Opacus accountant per client, kept across rounds, stepped once per noisy step
actually taken, plus one entry per other release (e.g. a noisy sample count). The noise multiplier
is calibrated so that the *planned* history of the whole run (every step of every local epoch of
every round, and every release) meets the target; the report is the epsilon actually spent.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from data.flags import setting
from data.io import UserError
from models.stacked import Stacked, StackedLinear

ACCOUNTANTS = ("prv", "rdp")
ROW_LAYERS = ("RowBias", "RowParameter")  # models.hypervae: a parameter added to / broadcast over rows
MAX_SIGMA = 1e4


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = setting(True, "train without DP (ablation)", flag="--no-dp")
    target_epsilon: float = setting(1.0, "target epsilon for each client over the whole run", flag="--epsilon",
                                    metavar="EPS")
    delta: float = setting(1e-4, "target delta", flag="--delta", metavar="DELTA")
    max_grad_norm: float = setting(1.5, "per-sample clipping bound C", flag="--max-grad-norm", metavar="C")
    accountant: str = setting("prv", "Opacus accountant used to calibrate and report epsilon", flag="--accountant",
                              choices=ACCOUNTANTS)
    count_noise: float = setting(100.0, "std of the Gaussian noise on the client size released for aggregation "
                                 "weights", flag="--count-noise", metavar="STD")

    def __post_init__(self) -> None:  # checked when the flags are read, before anything is written
        if self.accountant not in ACCOUNTANTS:
            raise UserError(f"--accountant {self.accountant!r} is unknown; valid: {', '.join(ACCOUNTANTS)}")
        if self.enabled:
            if not self.target_epsilon > 0:
                raise UserError(f"--epsilon must be > 0, got {self.target_epsilon} (or pass --no-dp to train without DP)")
            if not 0 < self.delta < 1:
                raise UserError(f"--delta must lie in (0, 1), got {self.delta}")
            if not self.max_grad_norm > 0 or not self.count_noise > 0:
                raise UserError(f"--max-grad-norm and --count-noise must be > 0, got {self.max_grad_norm}, {self.count_noise}")


History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps), Opacus's format


INTEGER_ORDERS = list(range(2, 64))  # RDP at integer orders only: fast, a (slightly looser) upper bound


def create_accountant(mechanism: str):
    from opacus.accountants import create_accountant as opacus_accountant  # here: `train.py --help` needs no opacus
    memoise_rdp_orders()
    return opacus_accountant(mechanism=mechanism)


def memoise_rdp_orders() -> None:
    """Memoises Opacus's RDP of one subsampled-Gaussian step at one order, _compute_rdp(q, sigma, alpha),
    a pure function of three floats (so every figure is bitwise the same). Every PRV epsilon sizes its
    domain with RDP at Opacus's 151 default orders, 99 of them fractional (a slow series each), for each
    entry of the ledger; a run asks the same (q, sigma) again for its epsilon so far, its report and the
    other accountant's figure: seconds each time, now once."""
    from opacus.accountants.analysis import rdp
    if not hasattr(rdp._compute_rdp, "cache_info"):
        rdp._compute_rdp = functools.lru_cache(maxsize=1 << 16)(rdp._compute_rdp)


def epsilon_of(history: History, delta: float, accountant: str, *, fast: bool = False) -> float:
    """Epsilon of a history, from a fresh Opacus accountant (fast: RDP at integer orders). Memoised: the
    clients of a run share plans and releases, and the report asks each ledger under two accountants."""
    return _epsilon(tuple(tuple(h) for h in history), delta, accountant, fast)


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple, delta: float, accountant: str, fast: bool) -> float:
    acc = create_accountant(mechanism="rdp" if fast else accountant)
    acc.history = [h for h in history if h[2] > 0]
    if not acc.history:
        return 0.0
    with warnings.catch_warnings():  # numerical notes of the PRV/RDP internals, not user-facing
        warnings.simplefilter("ignore")
        if fast:
            return float(acc.get_epsilon(delta=delta, alphas=INTEGER_ORDERS))
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(plan: Callable[[float], History], cfg: PrivacyConfig, tolerance: float = 0.01) -> float:
    """A noise multiplier sigma with target - tolerance < epsilon(plan(sigma)) <= target.

    The fast RDP accountant brackets sigma (a bisection, as opacus.accountants.utils.get_noise_multiplier).
    The chosen accountant then refines by secant steps on log epsilon against log sigma (epsilon is close
    to a power of sigma), aimed at the middle of the tolerance band and kept inside the
    feasible/infeasible bracket. Only a feasible sigma is ever returned."""
    target = cfg.target_epsilon
    aim = target - tolerance / 2

    def eps(sigma: float, fast: bool = False) -> float:
        return epsilon_of(plan(sigma), cfg.delta, cfg.accountant, fast=fast)
    low, high = 0.0, 1.0
    while eps(high, fast=True) > target:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise UserError(f"--epsilon {target}: unreachable even with noise multiplier {MAX_SIGMA} "
                            "(the fixed releases alone may exceed it); raise --epsilon")
    while high - low > 0.05 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if eps(mid, fast=True) <= target else (mid, high)
    guess = high  # integer-order RDP bounds the chosen accountant, so this is (almost always) feasible
    # the fast accountant's log-slope is the chosen one's to ~1 %: the first secant step needs no second point
    e_hi, e_lo = eps(guess, fast=True), eps(0.9 * guess, fast=True)
    rdp_slope = math.log(e_lo / e_hi) / math.log(0.9) if e_hi > 0 and e_lo > 0 else -1.0
    feasible: tuple[float, float] | None = None   # (sigma, epsilon) of the smallest feasible sigma seen
    infeasible: tuple[float, float] | None = None  # ... and of the largest infeasible one
    last: tuple[float, float] | None = None
    sigma = guess
    for _ in range(40):
        e = eps(sigma)
        if e <= target and (feasible is None or sigma < feasible[0]):
            feasible = (sigma, e)
        elif e > target and (infeasible is None or sigma > infeasible[0]):
            infeasible = (sigma, e)
        if feasible is not None and target - feasible[1] <= tolerance:
            return feasible[0]
        slope = rdp_slope if rdp_slope < -0.05 else -1.0  # until two points of the chosen accountant measure it
        if last is not None and last[0] != sigma and e > 0 and last[1] > 0:
            measured = math.log(e / last[1]) / math.log(sigma / last[0])
            slope = measured if measured < -0.05 else slope
        last = (sigma, e)
        if e <= 0:  # sigma large enough that nothing is spent: come down fast
            step = sigma / 2
        else:
            step = sigma * (aim / e) ** (1 / slope)
        if feasible is not None and infeasible is not None and not infeasible[0] < step < feasible[0]:
            step = math.sqrt(infeasible[0] * feasible[0])
        if step > MAX_SIGMA:
            raise UserError(f"--epsilon {target}: unreachable even with noise multiplier {MAX_SIGMA} "
                            "(the fixed releases alone may exceed it); raise --epsilon")
        sigma = step
    if feasible is None:
        raise RuntimeError(f"noise calibration found no sigma with epsilon <= {target}")
    return feasible[0]


class ClientAccountant:
    """One client's privacy ledger across the whole run (saved in checkpoints)."""

    def __init__(self, cfg: PrivacyConfig) -> None:
        self.cfg = cfg
        self.accountant = create_accountant(mechanism=cfg.accountant)
        self.releases: list[dict] = []
        self.steps = 0  # DP-SGD steps taken (releases not included)
        self._spent: tuple[tuple, float] | None = None  # (history, its epsilon): PRV takes ~0.3 s

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """One noisy training step."""
        self.steps += 1
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def release(self, what: str, noise_multiplier: float) -> None:
        """A Gaussian-mechanism release of a sensitivity-bounded statistic: one step with q = 1."""
        self.releases.append({"what": what, "noise_multiplier": noise_multiplier})
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)

    @property
    def history(self) -> History:
        return [tuple(h) for h in self.accountant.history]

    def epsilon(self) -> float:
        history = tuple(self.history)
        if self._spent is None or self._spent[0] != history:
            self._spent = history, epsilon_of(list(history), self.cfg.delta, self.cfg.accountant)
        return self._spent[1]

    def state_dict(self) -> dict:
        return {"history": self.history, "releases": self.releases, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.history = [tuple(h) for h in state["history"]]
        self.releases = list(state["releases"])
        self.steps = state["steps"]


# ----------------------------------------------------------------------------- per-sample clipping

def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's flat clipping


def recorded_layers(layers: dict[str, nn.Module], per_sample_loss: Callable[[], torch.Tensor], *, dims: int
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], dict[str, torch.Tensor]]:
    """per_sample_loss() with every layer's input (a matrix layer's; None for a row layer) and output
    recorded, for ghost clipping: each layer applied once, to `dims`-dimensional (..., rows, features)."""
    inputs: dict[str, torch.Tensor | None] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, out):
            if name in outputs or out.dim() != dims:
                raise TypeError(f"{name}: each layer must be applied once, to {dims}-d (..., rows, features)")
            matrix = isinstance(module, (nn.Linear, StackedLinear))
            inputs[name] = args[0].detach() if matrix else None
            outputs[name] = out
        return record
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        losses = per_sample_loss()
    finally:
        for h in handles:
            h.remove()
    return losses, inputs, outputs


def add_record_sq_norms_(sq_norms: torch.Tensor, g: torch.Tensor, a: torch.Tensor | None, *, with_bias: bool) -> None:
    """Adds one layer's terms of each record's squared gradient norm to sq_norms (..., B), from the layer's
    output gradients g (..., B, T, out) and inputs a (..., B, T, in; None for a row layer, whose parameter's
    gradient is sum_t g_t). A matrix layer's record gradient is sum_t g_t a_t^T, of squared norm
    sum_{t,t'} (g_t.g_t')(a_t.a_t'); with one row a record (T = 1) that is |g|^2 |a|^2, and |g|^2 also serves
    the bias's term (g.sum over T is g[..., 0, :])."""
    g_sq = g[..., 0, :].pow(2).sum(-1) if g.shape[-2] == 1 else None
    if a is not None:
        if g_sq is not None:
            sq_norms += a[..., 0, :].pow(2).sum(-1) * g_sq
        else:
            sq_norms += (torch.einsum("...ti,...si->...ts", a, a) * torch.einsum("...to,...so->...ts", g, g)).sum((-2, -1))
    if with_bias:
        sq_norms += g_sq if g_sq is not None else g.sum(-2).pow(2).sum(-1)


def clipped_grad_sum(model: nn.Module, per_sample_loss: Callable[[], torch.Tensor],
                     max_grad_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """sum_i clip(grad_i, C) over the B records of a batch, for every trainable parameter of `model`,
    and the per-record gradient norms, without materialising per-record gradients.

    Each parameter must sit in a layer applied once per forward: nn.Linear on (B*T, in) rows, or a
    module with a `bias`-like parameter added to / broadcast over rows (RowBias, RowParameter), with
    rows grouped by record (T consecutive rows each; T may differ between layers). For a Linear the
    record's gradient is sum_t g_t a_t^T, whose squared norm is sum_{t,t'} (g_t.g_t')(a_t.a_t')."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, nn.Linear) or type(m).__name__ in ROW_LAYERS}
    def qualified(module: str, param: str) -> str:  # a layer that is the model itself has the name ""
        return f"{module}.{param}" if module else param
    covered = {qualified(n, p) for n, m in layers.items() for p, q in m.named_parameters(recurse=False) if q.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable - covered:
        raise TypeError(f"clipped_grad_sum handles Linear/RowBias/RowParameter parameters, not {sorted(trainable - covered)}")
    losses, inputs, outputs = recorded_layers(layers, per_sample_loss, dims=2)
    n_records = len(losses)
    if n_records == 0:  # an empty Poisson batch: a zero sum (the caller adds the noise, as Opacus does)
        return ({n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad},
                torch.zeros(0, device=losses.device))
    names = [n for n in layers if n in outputs and any(p.requires_grad for p in layers[n].parameters(recurse=False))]
    out_grads = dict(zip(names, torch.autograd.grad(losses.sum(), [outputs[n] for n in names], allow_unused=True)))
    sq_norms = torch.zeros(n_records, device=losses.device)
    grouped = {}
    for n in names:
        g = out_grads[n]
        if g is None:
            continue
        g = g.reshape(n_records, -1, g.shape[-1])            # (B, T, out)
        a = None if inputs[n] is None else inputs[n].reshape(n_records, -1, inputs[n].shape[-1])
        grouped[n] = (g, a)
        add_record_sq_norms_(sq_norms, g, a, with_bias=a is None or layers[n].bias is not None)
    norms = sq_norms.clamp(min=0).sqrt()
    factors = clip_factors(norms, max_grad_norm)
    grads = {}
    for n, (g, a) in grouped.items():
        scaled = g * factors[:, None, None]
        if a is not None:
            grads[qualified(n, "weight")] = torch.einsum("bto,bti->oi", scaled, a)
            if layers[n].bias is not None:
                grads[qualified(n, "bias")] = scaled.sum((0, 1))
        else:
            (pname, _), = layers[n].named_parameters(recurse=False)
            grads[qualified(n, pname)] = scaled.sum((0, 1))
    for n, p in model.named_parameters():  # layers the loss never used get zero gradient
        if p.requires_grad and n not in grads:
            grads[n] = torch.zeros_like(p)
    return grads, norms


def clipped_grad_sums_stacked(model: nn.Module, per_sample_loss: Callable[[], torch.Tensor], mask: torch.Tensor,
                              max_grad_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """clipped_grad_sum for K models at once (models.stacked): per_sample_loss() is (K, B), the K
    clients' Poisson batches padded to one length B, and mask (K, B) marks the real records (padding
    contributes nothing). Every trainable parameter must sit in a stacked layer (StackedLinear, or a
    stacked row layer) applied once per forward to (K, B*T, features) rows grouped by record (T rows
    each; K: the copies that ran, models.stacked.select_first). Returns {name: (K, *shape)} sums of
    clipped per-record gradients and the (K, B) norms."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Stacked)}
    losses, inputs, outputs = recorded_layers(layers, per_sample_loss, dims=3)
    names = [n for n in layers if n in outputs]
    out_grads = torch.autograd.grad((losses * mask).sum(), [outputs[n] for n in names])
    k, b = mask.shape
    sq_norms = torch.zeros(mask.shape, device=mask.device)
    grouped = {}
    for n, g in zip(names, out_grads):
        g3 = g.reshape(k, b, -1, g.shape[-1])           # (K, B, T, out)
        a3 = None if inputs[n] is None else inputs[n].reshape(k, b, -1, inputs[n].shape[-1])
        add_record_sq_norms_(sq_norms, g3, a3, with_bias=a3 is None or layers[n].bias is not None)
        grouped[n] = g3, inputs[n]
    norms = sq_norms.clamp(min=0).sqrt()
    factors = clip_factors(norms, max_grad_norm) * mask
    grads = {}
    for n, (g3, a) in grouped.items():
        scaled = (g3 * factors[..., None, None]).flatten(1, 2)  # (K, B*T, out), as the layer's rows
        if a is not None:
            grads[f"{n}.weight"] = torch.bmm(scaled.transpose(1, 2), a)
        if a is None or layers[n].bias is not None:
            pname = "bias" if a is not None else next(p for p, _ in layers[n].named_parameters(recurse=False))
            grads[f"{n}.{pname}"] = scaled.sum(1)
    missing = {n for n, _ in model.named_parameters()} - set(grads)
    if missing:
        raise TypeError(f"clipped_grad_sums_stacked: the loss does not use {sorted(missing)}")
    return grads, norms


def per_sample_grads_vmap(model: nn.Module, loss_one: Callable, *batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients {name: (B, *shape)} by torch.func: vmap over grad of the loss of one
    sample, loss_one(outputs_fn, *sample) where outputs_fn = lambda *inputs: model(*inputs)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of(p, *sample):
        one = [s.unsqueeze(0) for s in sample]
        return loss_one(lambda *inputs: functional_call(model, (p, buffers), inputs), *one)
    return vmap(grad(loss_of), in_dims=(None, *[0] * len(batch)))(params, *batch)


def clip_and_sum(per_sample: dict[str, torch.Tensor], max_grad_norm: float) -> tuple[dict, torch.Tensor]:
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    factors = clip_factors(norms, max_grad_norm)
    return {n: torch.einsum("b,b...->...", factors, g) for n, g in per_sample.items()}, norms


def add_noise(summed: dict[str, torch.Tensor], *, noise_multiplier: float, max_grad_norm: float,
              expected_batch_size: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """(sum of clipped grads + N(0, sigma^2 C^2)) / expected batch size, as Opacus's DPOptimizer."""
    std = noise_multiplier * max_grad_norm
    # in place on the fresh noise: (std n + g) / B, the same floats as (g + std n) / B, with no temporaries
    return {n: torch.randn(g.shape, generator=generator).to(g).mul_(std).add_(g).div_(expected_batch_size)
            for n, g in summed.items()}
